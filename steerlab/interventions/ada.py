"""Any-Depth Alignment (ADA, METHODS 4): re-insert the assistant header during generation and ask again.

:class:`ADAGuard` is a generation policy (:mod:`steerlab.generation`): ``model.generate(prompts,
policy=guard)`` decodes greedily and, every ``every`` generated tokens (and at depth 0, right after
the prompt and any prefilled response), appends the model's own assistant-header tokens (ChatML:
``<|im_end|>\\n<|im_start|>assistant\\n``) to each row on a branch of the loop's KV cache, reads the
model's judgement there, and crops the cache back (the main sequence never changes and the cache is
never copied). Two readers:

* ``ADA-LP`` (``mode="probe"``): a logistic probe on ``resid_pre`` at one layer, at the last header
  token; ``P(harmful) >= threshold`` stops the row. The forward pass stops at the probe's layer.
  A probe over several layers reads them as one classifier, ``sigmoid(mean of the per-layer logits)``
  (:meth:`~steerlab.probes.probe.Probe.ensemble_proba`, as a multi-layer ``ProbeGuard``; an extension of the
  paper's one-layer reader).
* ``ADA-RK`` (``mode="rethink"``): a short greedy look-ahead after the header, judged by the
  refusal-phrase judge; a refusal stops the row.

Rows stop independently; a stopped row's answer is ``refusal_text``; each row's result is an
:class:`ADAOutput`. Active ``model.apply`` interventions apply to the generation (and to the checks).

Example:
    >>> import torch
    >>> from steerlab.probes import Probe
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> probe = Probe(weights=torch.zeros(1, model.d_model), bias=torch.tensor([-5.0]), layers=(1,))
    >>> outs = model.generate(["Hi"], policy=ADAGuard(probe=probe, every=2), max_new_tokens=4)
    >>> outs[0].stopped, [c.depth for c in outs[0].checks][:2]
    (False, [0, 2])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import torch

from steerlab.errors import EmptyInputError, InvalidValueError, ShapeError, SteerlabError
from steerlab.eval import is_refusal
from steerlab.hooks import StopForward
from steerlab.probes.probe import Probe

if TYPE_CHECKING:
    from steerlab.generation import Decoder
    from steerlab.model import Model

REFUSAL_TEXT = "I'm sorry, but I can't help with that."


@dataclass(frozen=True)
class ADAGuard:
    """How and when to check: a probe on the header state (ADA-LP; several layers: sigmoid of the mean
    logit) or a look-ahead judge (ADA-RK). A generation policy: ``model.generate(..., policy=guard)``.

    ``record_layers`` keeps the header states at those layers in every check (``check.states``): with
    ``threshold=float("inf")`` one run gives what any probe would read at every check.
    """

    probe: Probe | None = None
    mode: Literal["probe", "rethink"] = "probe"
    every: int = 25
    threshold: float = 0.5
    lookahead: int = 20
    header_ids: tuple[int, ...] | None = None  # default: the chat template's post-instruction span
    refusal_text: str = REFUSAL_TEXT
    record_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("probe", "rethink"):
            raise InvalidValueError(f"mode must be 'probe' (ADA-LP) or 'rethink' (ADA-RK); got {self.mode!r}")
        if self.mode == "probe":
            if self.probe is None:
                raise ShapeError("ADA-LP needs a probe: ADAGuard(probe=probe.select(layer))")
            if self.probe.site != "resid_pre":
                raise ShapeError(f"ADA-LP reads resid_pre at the header; got a {self.probe.site} probe (fit it on resid_pre states)")
        if self.every < 1:
            raise InvalidValueError(f"every must be at least 1 token; got {self.every}")

    @contextmanager
    def open(self, model: Model) -> Iterator[_ADARun]:
        """The policy's run for one ``model.generate`` call: checks the probe's width, installs the header
        hooks (removed on exit); see :mod:`steerlab.generation`."""
        if self.probe is not None and self.probe.width != model.d_model:
            raise ShapeError(f"the probe has width {self.probe.width} but the model's residual stream is {model.d_model} wide; fit it on this model")
        recorded = model.layer_indices(list(self.record_layers)) if self.record_layers is not None else []
        read = list(self.probe.layers) if self.mode == "probe" else []
        tap = _HeaderTap(read + recorded, stop=self.mode == "probe")
        with model.hooks() as hooks:
            tap.install(hooks, name="ada.header")
            yield _ADARun(model, self, tap, recorded)


@dataclass(frozen=True)
class ADACheck:
    """One checkpoint of one row: depth (tokens generated before it), the score read there and, with
    ``ADAGuard(record_layers=...)``, the header states ``[n_layers, d]`` (float32)."""

    depth: int
    score: float
    states: torch.Tensor | None = None


@dataclass(frozen=True)
class ADAOutput:
    """A row's result: the answer (``refusal_text`` if stopped), the partial generation, what fired where."""

    text: str
    stopped: bool
    fired_at: int | None
    partial: str
    checks: tuple[ADACheck, ...] = field(default=())
    token_ids: tuple[int, ...] = field(default=())  # generated ids (up to EOS or the firing check)


def _header(model: Model, guard: ADAGuard) -> torch.Tensor:
    ids = guard.header_ids if guard.header_ids is not None else model.chat().header_ids
    if not ids:
        raise ShapeError("the assistant header is empty; pass header_ids=... explicitly")
    return torch.tensor(ids, dtype=torch.long, device=model.device)


class _HeaderTap:
    """``resid_pre`` hooks that grab the last position of a header pass at some layers and stop the
    pass after the deepest of them (the rest of the forward is not needed)."""

    def __init__(self, layers: Sequence[int], *, stop: bool = True) -> None:
        self.layers = tuple(sorted({int(la) for la in layers}))
        self.stop = stop
        self.active = False
        self.grabbed: dict[int, torch.Tensor] = {}

    def hook(self, layer: int):
        def grab(x: torch.Tensor, ctx) -> None:
            if self.active:
                self.grabbed[layer] = x[:, -1].float().cpu()
                if self.stop and layer == self.layers[-1]:
                    raise StopForward

        return grab

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Grab during the enclosed forward pass; the early stop after the deepest layer ends it quietly."""
        self.active = True
        try:
            yield
        except StopForward:
            pass
        finally:
            self.active = False

    def install(self, hooks, *, name: str) -> None:
        for layer in self.layers:
            hooks.add("resid_pre", layer, self.hook(layer), name=f"{name}.{layer}", required=False)

    def take(self) -> torch.Tensor:
        """The grabbed states ``[b, n_layers, d]`` (in ``self.layers`` order); raises if a hook did not fire."""
        missing = [la for la in self.layers if la not in self.grabbed]
        if missing:
            raise SteerlabError(f"the ADA header hooks at layers {missing} did not fire during the header pass")
        states = torch.stack([self.grabbed[la] for la in self.layers], 1)
        self.grabbed.clear()
        return states


def checkpoint_states(
    model: Model,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    layer: int | Sequence[int],
    depths: Sequence[int],
    header_ids: Sequence[int] | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What an ADA-LP check reads, for training its probe: ``resid_pre`` at ``layer`` at the last token of
    ``prompt + response[:depth tokens] + header``, for every prompt and depth.

    Returns (states ``[n_prompts * n_depths, d]``, or ``[n_prompts * n_depths, n_layers, d]`` when
    ``layer`` is a list, depth of each row); depths longer than a response are clipped to its length.
    Rows are prompt-major (all depths of prompt 0 first).
    """
    from tqdm.auto import tqdm

    layers = model.layer_indices([layer] if isinstance(layer, int) else sorted(set(layer)))
    if not layers:
        raise EmptyInputError("no layers to read: pass layer=<int> or a non-empty list")
    prompts, responses = list(prompts), list(responses)
    if not prompts or len(prompts) != len(responses):
        raise EmptyInputError(f"need one response per prompt; got {len(prompts)} prompts and {len(responses)} responses")
    fmt = model.chat()
    header = list(header_ids) if header_ids is not None else list(fmt.header_ids)
    rows, used = [], []
    for prompt, response in zip(prompts, responses):
        base = fmt.tokenize([prompt])[0][0]
        ids = model.tokenizer(response, add_special_tokens=False).input_ids
        for depth in depths:
            d = min(int(depth), len(ids))
            rows.append(base + ids[:d] + header)
            used.append(d)
    states = torch.empty(len(rows), len(layers), model.d_model)
    tap = _HeaderTap(layers)
    with model.hooks() as hooks, torch.inference_mode():
        tap.install(hooks, name="ada.states")
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
        for start in tqdm(range(0, len(order), batch_size), desc="ADA header states", unit="batch", disable=not progress):
            idx = order[start : start + batch_size]
            width = max(len(rows[i]) for i in idx)
            ids = torch.tensor([[pad] * (width - len(rows[i])) + rows[i] for i in idx], device=model.device)
            mask = torch.tensor([[0] * (width - len(rows[i])) + [1] * len(rows[i]) for i in idx], device=model.device)
            with tap.reading():
                model.hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=False)
            states[torch.tensor(idx)] = tap.take()
    return (states[:, 0] if isinstance(layer, int) else states), torch.tensor(used)


class _ADARun:
    """An :class:`ADAGuard` during one ``model.generate(..., policy=guard)`` call: the header tap, and
    per batch the checks of each row (a :class:`~steerlab.generation.PolicyRun`)."""

    def __init__(self, model: Model, guard: ADAGuard, tap: _HeaderTap, recorded: list[int]) -> None:
        self.model, self.guard, self.tap = model, guard, tap
        self.header = _header(model, guard)
        self.probe_rows = [tap.layers.index(la) for la in (guard.probe.layers if guard.mode == "probe" else ())]
        self.record_rows = [tap.layers.index(la) for la in recorded]
        self.checks: list[list[ADACheck]] = []

    def start(self, decoder: Decoder) -> None:
        self.checks = [[] for _ in range(len(decoder))]

    def step(self, decoder: Decoder, logits: torch.Tensor) -> torch.Tensor:
        """At depth 0 and every ``guard.every`` tokens: score the header on a branch of the cache, stop rows."""
        if decoder.depth % self.guard.every:
            return logits
        live = decoder.live.cpu()
        if self.guard.mode == "probe":
            with decoder.branch(), self.tap.reading():
                decoder.advance(self.header[None].expand(len(decoder), -1))
            states = self.tap.take()
            scores = self.guard.probe.ensemble_proba(states[:, self.probe_rows])
        else:
            scores = self._rethink(decoder)
            states = self.tap.take() if self.tap.layers else None
        fire = []
        for r in torch.nonzero(live).flatten().tolist():
            kept = states[r, self.record_rows].clone() if self.record_rows else None
            self.checks[r].append(ADACheck(depth=decoder.depth, score=float(scores[r]), states=kept))
            if float(scores[r]) >= self.guard.threshold:
                fire.append(r)
        decoder.stop(fire)
        return logits

    def _rethink(self, decoder: Decoder) -> torch.Tensor:
        """1.0 where a greedy look-ahead after the injected header is a refusal, else 0.0 (on a branch)."""
        tokens = []
        with decoder.branch():
            with self.tap.reading():
                logits = decoder.advance(self.header[None].expand(len(decoder), -1))
            for _ in range(self.guard.lookahead):
                tokens.append(logits.argmax(-1))
                if len(tokens) == self.guard.lookahead:
                    break
                logits = decoder.advance(tokens[-1][:, None])
        rows = [[t for t in row if t not in decoder.eos] for row in torch.stack(tokens, 1).tolist()]
        texts = self.model.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return torch.tensor([float(is_refusal(t)) for t in texts])

    def finish(self, decoder: Decoder) -> list[ADAOutput]:
        outputs = []
        for r in range(len(decoder)):
            ids = decoder.tokens(r)
            partial = self.model.tokenizer.decode(ids, skip_special_tokens=True)
            stopped = bool(decoder.stopped[r])
            outputs.append(ADAOutput(
                text=self.guard.refusal_text if stopped else partial, stopped=stopped, fired_at=decoder.stopped_at[r],
                partial=partial, checks=tuple(self.checks[r]), token_ids=tuple(ids),
            ))  # fmt: skip
        return outputs


def ada_generate(
    model: Model,
    prompts: Sequence[str],
    guard: ADAGuard,
    *,
    responses: Sequence[str] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    record_layers: Sequence[int] | None = None,
    progress: bool = False,
) -> list[ADAOutput]:
    """``model.generate(prompts, policy=guard, ...)`` (kept for existing callers); ``record_layers``
    sets ``guard.record_layers``."""
    if record_layers is not None:
        guard = replace(guard, record_layers=tuple(record_layers))
    return model.generate(prompts, policy=guard, responses=responses, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
