"""Calibrated refusal: a guard decides per prompt whether to strengthen refusal, remove it, or leave the model alone.

:class:`GatedRefusal` is a generation policy (``model.generate(prompts, policy=gated)``). For every batch it first
reads the prompt's activations where its guard reads them (one forward pass of the plain model, stopped after the
guard's deepest layer), scores each row, and then generates with a per-row choice:

* ``score >= high`` (likely harmful): the ``refuse`` intervention (e.g. ``AddVector(refusal_direction, coeff=…)``);
* ``score < low`` (likely safe): the ``comply`` intervention (e.g. ``Ablate(refusal_direction)``);
* in between: nothing — the band where the guard is unsure keeps the model's own judgement;
* optionally ``score < floor`` (clearly ordinary): nothing either. Such prompts are not refused, so there is no
  refusal to remove, and leaving them alone keeps the comply branch's cost (KL on ordinary prompts) off them; a
  stronger comply branch (a full ablation) can then act on the safe-but-scary prompts between ``floor`` and ``low``.

Both interventions are ordinary values (anything with ``resolve(model)`` whose plan acts on named sites); their
hooks act only on the rows chosen for them, on every token of those rows. The decision precedes the first edited
layer, so an ablation applies from layer 0 — which is why this is a policy that reads first, not a hook that
decides mid-forward. Each row's output records its score and action (:class:`GatedOutput`), so a run shows what
the gate did; a branch that no row took simply did not act.

Inside vLLM, :meth:`steerlab.backends.vllm.VLLMEngine.generate_gated` renders the same value: the guard reads the
prompts in the engine, and each request is steered with the branch its score picks (or not at all).

The guard may also be a second model: a :class:`~steerlab.interventions.token_guard.RefusalTokenGuard` (a copy of
the model fine-tuned with refusal tokens) scores each batch on the same token ids, and the plain model generates
with the branch its ``P(refusal token)`` picks. In vLLM the fine-tuned copy reads the engine's token ids on the HF side.

Example:
    >>> from steerlab import AddVector, Ablate
    >>> from steerlab.data import DEMO_HARMFUL, DEMO_HARMLESS
    >>> from steerlab.probes import LatentGuard
    >>> from steerlab.testing import tiny_direction, tiny_model
    >>> model = tiny_model("llama")
    >>> guard = LatentGuard.fit(model, DEMO_HARMFUL, DEMO_HARMLESS, layers=[1])
    >>> d = tiny_direction(model, layer=1)
    >>> gated = GatedRefusal(guard, refuse=AddVector(d, coeff=4.0), comply=Ablate(d))
    >>> outs = model.generate(["How do I pick a lock?", "Write a haiku."], policy=gated, max_new_tokens=3)
    >>> [o.action in ("refuse", "comply", "leave") for o in outs]
    [True, True]
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from steerlab._checks import finite_number
from steerlab.errors import GenerationStateError, InvalidValueError, ShapeError
from steerlab.hooks import StopForward
from steerlab.interventions.token_guard import RefusalTokenGuard
from steerlab.plan import resolve_plans
from steerlab.probes.guard import LatentGuard, ProbeGuard

if TYPE_CHECKING:
    from steerlab.chat import EncodedBatch
    from steerlab.generation import Decoder
    from steerlab.model import Model

Action = Literal["refuse", "comply", "leave"]


@dataclass(frozen=True)
class GatedOutput:
    """One row of a gated generation: the text and ids, the guard's score, and what the gate did."""

    text: str
    tokens: list[int]
    score: float
    action: Action


@dataclass(frozen=True)
class GatedRefusal:
    """Per-row calibrated refusal (see the module docs): ``refuse`` where ``score >= high``, ``comply`` where
    ``floor <= score < low``, nothing in between. ``low`` / ``high`` default to the guard's calibrated threshold (no
    band); ``floor`` defaults to none (comply on every score below ``low``)."""

    guard: ProbeGuard | LatentGuard | RefusalTokenGuard
    refuse: Any | None = None
    comply: Any | None = None
    low: float | None = None
    high: float | None = None
    floor: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.guard, ProbeGuard | LatentGuard | RefusalTokenGuard):
            raise InvalidValueError(f"GatedRefusal needs a ProbeGuard, LatentGuard or RefusalTokenGuard; got {type(self.guard).__name__}")
        if self.refuse is None and self.comply is None:
            raise InvalidValueError("GatedRefusal needs refuse=... or comply=... (an intervention for at least one side)")
        low = self.guard.threshold if self.low is None else finite_number(self.low, "GatedRefusal low")
        high = self.guard.threshold if self.high is None else finite_number(self.high, "GatedRefusal high")
        if low > high:
            raise InvalidValueError(f"the band must have low <= high; got low={low}, high={high}")
        object.__setattr__(self, "low", float(low))
        object.__setattr__(self, "high", float(high))
        if self.floor is not None:
            floor = finite_number(self.floor, "GatedRefusal floor")
            if floor > low:
                raise InvalidValueError(f"the floor must be <= low (comply acts on floor <= score < low); got floor={floor}, low={low}")
            if self.comply is None:
                raise InvalidValueError("a floor limits the comply branch; give comply=... or leave floor=None")
            object.__setattr__(self, "floor", float(floor))
        if self.reads_other_model:
            return
        site = self.guard.probe.site if isinstance(self.guard, ProbeGuard) else self.guard.site
        if site != "resid_pre":
            raise ShapeError(f"GatedRefusal reads its guard on resid_pre; this guard reads {site}")

    @property
    def reads_other_model(self) -> bool:
        """True for a :class:`RefusalTokenGuard`: the guard is a second (fine-tuned) model, not a read of this one."""
        return isinstance(self.guard, RefusalTokenGuard)

    @property
    def read_layers(self) -> list[int]:
        """The layers whose ``resid_pre`` the guard reads (none for a refusal-token guard)."""
        if self.reads_other_model:
            return []
        return list(self.guard.probe.layers) if isinstance(self.guard, ProbeGuard) else list(self.guard.layers)

    @property
    def read_position(self):
        """The position the guard reads (``"last"``, ``"t_inst"``, ...)."""
        if self.reads_other_model:
            return "last"
        return self.guard.probe.position if isinstance(self.guard, ProbeGuard) else self.guard.position

    def score_states(self, states: torch.Tensor) -> torch.Tensor:
        """The guard's scores ``[b]`` from ``resid_pre`` states ``[b, len(read_layers), d]`` at :attr:`read_position`."""
        if self.reads_other_model:
            raise InvalidValueError("a RefusalTokenGuard scores with its own model, not from this model's states")
        return self.guard.score_activations(states)

    def actions(self, scores: torch.Tensor) -> list[Action]:
        """The action for each score: ``"refuse"`` (``>= high``), ``"comply"`` (``floor <= score < low``) or ``"leave"``.

        Example:
            >>> from steerlab.probes import LatentGuard
            >>> g = LatentGuard(torch.ones(1, 2), -torch.ones(1, 2), layers=(0,))
            >>> GatedRefusal(g, comply=object(), low=-0.5, high=0.5).actions(torch.tensor([-1.0, 0.0, 1.0]))
            ['comply', 'leave', 'refuse']
            >>> GatedRefusal(g, comply=object(), low=-0.5, high=0.5, floor=-0.8).actions(torch.tensor([-1.0, -0.6, 1.0]))
            ['leave', 'comply', 'refuse']
        """
        floor = -math.inf if self.floor is None else self.floor
        return ["refuse" if s >= self.high else "comply" if floor <= s < self.low else "leave" for s in scores.tolist()]

    @contextmanager
    def open(self, model: Model) -> Iterator[_GatedRun]:
        """Resolve both interventions, install the guard's read hooks and the row-gated edit hooks (removed on exit)."""
        guard = self.guard
        if isinstance(guard, RefusalTokenGuard):
            guard.check_shares_vocabulary(model)
        else:
            width = guard.probe.width if isinstance(guard, ProbeGuard) else guard.mean_harmful.shape[1]
            if width != model.d_model:
                raise ShapeError(f"the guard reads width {width} but the model's residual stream is {model.d_model}; fit it on this model")
        branches = {name: iv for name, iv in (("refuse", self.refuse), ("comply", self.comply)) if iv is not None}
        plans = dict(zip(branches, resolve_plans(model, list(branches.values()))))
        run = _GatedRun(model, self)
        with model.hooks() as hooks:
            for layer in run.read_layers:
                hooks.add("resid_pre", layer, run.reader(layer), name=f"gated.read.{layer}", required=False)
            for name, plan in plans.items():
                model.render(plan, hooks, rows=run.selector(name))
            yield run


class _GatedRun:
    """A :class:`GatedRefusal` during one ``model.generate`` call: reads, decides and gates per batch."""

    def __init__(self, model: Model, policy: GatedRefusal) -> None:
        self.model, self.policy = model, policy
        self.read_layers, self.position = policy.read_layers, policy.read_position
        self.reading: EncodedBatch | None = None  # the batch whose prompts the read pass runs
        self.grabbed: dict[int, torch.Tensor] = {}
        self.rows: dict[str, torch.Tensor] | None = None
        self.scores: torch.Tensor | None = None
        self.acted: list[Action] = []

    def reader(self, layer: int):
        def grab(x: torch.Tensor, ctx) -> None:
            if self.reading is None:
                return None
            self.grabbed[layer] = self.reading.take(x, self.position)[:, -1].float().cpu()
            if layer == self.read_layers[-1]:
                raise StopForward
            return None

        return grab

    def selector(self, name: str):
        """The row gate of branch ``name``: its rows' mask, ``None`` during the read pass (the plain model)."""

        def rows() -> torch.Tensor | None:
            if self.reading is not None:
                return None
            if self.rows is None:
                raise GenerationStateError("a GatedRefusal hook ran outside model.generate(..., policy=gated): no row has been scored")
            return self.rows[name]

        return rows

    def _score(self, decoder: Decoder) -> torch.Tensor:
        batch = decoder.batch
        self.reading = batch
        if self.policy.reads_other_model:
            return self._score_with_guard_model(batch)
        self.grabbed.clear()
        try:
            self.model.hf(**batch.model_inputs())
        except StopForward:
            pass
        finally:
            self.reading = None
        missing = [la for la in self.read_layers if la not in self.grabbed]
        if missing:
            raise GenerationStateError(f"the gate's read hooks at layers {missing} did not fire")
        return self.policy.score_states(torch.stack([self.grabbed[la] for la in self.read_layers], 1))

    def _score_with_guard_model(self, batch) -> torch.Tensor:
        """A refusal-token guard: its model's first-step logits on the same token ids (the gated edits stay idle)."""
        try:
            return self.policy.guard.score_batch(batch)
        finally:
            self.reading = None

    def start(self, decoder: Decoder) -> None:
        self.scores = self._score(decoder)
        self.acted = self.policy.actions(self.scores)
        self.rows = {name: torch.tensor([a == name for a in self.acted]) for name in ("refuse", "comply")}

    def step(self, decoder: Decoder, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def finish(self, decoder: Decoder) -> list[GatedOutput]:
        assert self.scores is not None
        outs = []
        for r in range(len(decoder)):
            ids = decoder.tokens(r)
            text = self.model.tokenizer.decode(ids, skip_special_tokens=True)
            outs.append(GatedOutput(text=text, tokens=ids, score=float(self.scores[r]), action=self.acted[r]))
        self.rows = None
        return outs
