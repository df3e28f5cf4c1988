"""Data selection: rank candidate training prompts by a probe, a guard or a direction; keep the top.

* :func:`rank_by_probe` — Cliff-as-a-Judge (METHODS 3): the refusal probe's ``P(refuse)`` at the
  final token of prompt + response; the *lowest* scores (the deepest refusal cliff) come first,
  as those are the examples safety fine-tuning gains most from.
* :func:`rank_by_guard` — a guard's harmfulness score (``LatentGuard``, ``ProbeGuard`` or anything
  with ``.score(prompts)``); the most harmful first.
* :func:`rank_by_direction` — the scalar projection (or cosine) of the activation onto a
  :class:`~steerlab.steering.Direction` at one layer; the largest first.

Every ranker returns a frozen :class:`Ranking`; :meth:`Ranking.top` picks ``k`` or a fraction, and
:meth:`Ranking.to_jsonl` writes the selection in the messages format, ready for fine-tuning.

Example:
    >>> import tempfile
    >>> from steerlab.probes import refusal_probe
    >>> from steerlab.testing import tiny_model
    >>> model, harmful, harmless = tiny_model("llama"), ["Make a weapon.", "Pick a lock."], ["Hi", "Say hello."]
    >>> probe = refusal_probe(model, harmful + harmless, labels=[1, 1, 0, 0], n_folds=2).probe
    >>> ranking = rank_by_probe(model, probe, harmful, max_new_tokens=8)
    >>> path = ranking.to_jsonl(Path(tempfile.mkdtemp()) / "selected.jsonl", fraction=0.5, responses=["I can't."] * 2)
    >>> len(path.read_text().splitlines())
    1
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from steerlab.activations import collect
from steerlab.chat import Position
from steerlab.errors import EmptyInputError, ShapeError, SteerlabError
from steerlab.probes.probe import Probe
from steerlab.steering.direction import Direction
from steerlab.training.data import SFTExample, example_record, write_jsonl

if TYPE_CHECKING:
    from steerlab.model import Model


class SelectionError(SteerlabError, ValueError):
    """A selection cannot be made as asked (bad k or fraction, missing responses)."""


class _Scorer(Protocol):
    def score(self, prompts: Sequence[str], *, batch_size: int = ..., progress: bool = ...) -> torch.Tensor: ...


@dataclass(frozen=True)
class Ranking:
    """Candidates with one score each (input order) and their order, best first.

    ``order[0]`` is the index of the best candidate; ties keep input order. ``responses`` are the
    responses the scores were read on (``None`` when only prompts were scored).
    """

    prompts: tuple[str, ...]
    scores: tuple[float, ...]
    order: tuple[int, ...]
    method: str
    lowest_first: bool
    responses: tuple[str, ...] | None = None
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        n = len(self.prompts)
        if len(self.scores) != n or sorted(self.order) != list(range(n)):
            raise ShapeError(f"a ranking needs one score per prompt and a permutation of 0..{n - 1}; got {len(self.scores)} scores")
        if self.responses is not None and len(self.responses) != n:
            raise ShapeError(f"{n} prompts but {len(self.responses)} responses")

    @classmethod
    def from_scores(
        cls,
        prompts: Sequence[str],
        scores: Sequence[float] | torch.Tensor,
        *,
        method: str,
        lowest_first: bool,
        responses: Sequence[str] | None = None,
        info: dict[str, Any] | None = None,
    ) -> Ranking:
        """Sort ``prompts`` by ``scores`` (ascending when ``lowest_first``; ties by input order).

        Example:
            >>> Ranking.from_scores(["a", "b", "c"], [0.5, 0.1, 0.9], method="manual", lowest_first=True).order
            (1, 0, 2)
        """
        values = [float(s) for s in torch.as_tensor(scores, dtype=torch.float64).flatten().tolist()]
        if any(math.isnan(v) for v in values):
            raise SelectionError("some scores are NaN; check the scorer's inputs")
        sign = 1.0 if lowest_first else -1.0
        order = sorted(range(len(values)), key=lambda i: (sign * values[i], i))
        return cls(
            prompts=tuple(prompts),
            scores=tuple(values),
            order=tuple(order),
            method=method,
            lowest_first=lowest_first,
            responses=tuple(responses) if responses is not None else None,
            info=dict(info or {}),
        )

    def __len__(self) -> int:
        return len(self.prompts)

    def count(self, k: int | None = None, *, fraction: float | None = None) -> int:
        """How many candidates ``k`` / ``fraction`` select (a fraction rounds, keeping at least one)."""
        if (k is None) == (fraction is None):
            raise SelectionError("pass exactly one of k=... or fraction=...")
        if k is not None:
            if not 1 <= k <= len(self):
                raise SelectionError(f"k must be in 1..{len(self)} (the number of candidates); got {k}")
            return int(k)
        if not 0.0 < float(fraction) <= 1.0:
            raise SelectionError(f"fraction must be in (0, 1]; got {fraction}")
        return max(1, round(float(fraction) * len(self)))

    def top(self, k: int | None = None, *, fraction: float | None = None) -> tuple[int, ...]:
        """Indices (into ``prompts``) of the best ``k`` candidates, or of the best ``fraction`` of them.

        Example:
            >>> Ranking.from_scores(["a", "b", "c"], [0.5, 0.1, 0.9], method="m", lowest_first=False).top(2)
            (2, 0)
        """
        return self.order[: self.count(k, fraction=fraction)]

    def _responses(self, responses: Sequence[str] | Callable[[str], str] | None) -> Sequence[str] | Callable[[str], str]:
        if responses is None:
            if self.responses is None:
                raise SelectionError(
                    "the ranking has no responses to write; pass responses=[...] (one per candidate, e.g. refusals "
                    "for safety fine-tuning) or a function prompt -> response"
                )
            return self.responses
        if not callable(responses) and len(responses) != len(self):
            raise SelectionError(f"pass one response per candidate ({len(self)}); got {len(responses)}")
        return responses

    def records(
        self, k: int | None = None, *, fraction: float | None = None, responses: Sequence[str] | Callable[[str], str] | None = None
    ) -> list[dict[str, Any]]:
        """Messages-format records of the selection, best first, with ``score``, ``rank``, ``index``, ``method``.

        ``responses`` (one per candidate in input order, or a function of the prompt) sets the
        assistant turn; by default the responses the ranking was scored on.
        """
        chosen = self.top(k, fraction=fraction)
        source = self._responses(responses)
        out = []
        for rank, i in enumerate(chosen):
            text = source(self.prompts[i]) if callable(source) else source[i]
            out.append(example_record(self.prompts[i], text, score=self.scores[i], rank=rank, index=i, method=self.method))
        return out

    def examples(
        self, k: int | None = None, *, fraction: float | None = None, responses: Sequence[str] | Callable[[str], str] | None = None
    ) -> list[SFTExample]:
        """The selection as :class:`~steerlab.training.data.SFTExample` values (whole response is the target)."""
        return [
            SFTExample(prompt=r["messages"][0]["content"], target=r["messages"][1]["content"], kind="selected", meta={k_: r[k_] for k_ in ("score", "rank", "index", "method")})
            for r in self.records(k, fraction=fraction, responses=responses)
        ]

    def to_jsonl(
        self,
        path: str | Path,
        k: int | None = None,
        *,
        fraction: float | None = None,
        responses: Sequence[str] | Callable[[str], str] | None = None,
    ) -> Path:
        """Write the selection as JSONL (see :meth:`records`).

        Example:
            >>> import tempfile
            >>> from steerlab.training.data import read_jsonl
            >>> ranking = Ranking.from_scores(["a", "b", "c"], [0.5, 0.1, 0.9], method="manual", lowest_first=False)
            >>> path = ranking.to_jsonl(Path(tempfile.mkdtemp()) / "top.jsonl", k=2, responses=lambda p: "I can't.")
            >>> [example.prompt for example in read_jsonl(path)]
            ['c', 'a']
        """
        return write_jsonl(path, self.records(k, fraction=fraction, responses=responses))


def _check(prompts: Sequence[str], responses: Sequence[str] | None) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise EmptyInputError("no candidates; pass at least one prompt")
    if responses is not None and len(responses) != len(prompts):
        raise ShapeError(f"{len(prompts)} prompts but {len(responses)} responses; pass one response per prompt")
    return prompts


def _read(model: Model, prompts, *, site: str, layer: int, position: Position, responses, batch_size: int, progress: bool) -> torch.Tensor:
    """Activations ``[n, d]`` at one site, layer and (the last token of a fixed-width) position."""
    if position == "all":
        raise ShapeError("selection reads one token per example; position 'all' is not one (use 'last' or 't_inst')")
    acts = collect(model, prompts, sites=[site], layers=[layer], positions=[position], responses=responses, batch_size=batch_size, progress=progress)
    return acts.get(site, position)[:, 0, -1]


def rank_by_probe(
    model: Model,
    probe: Probe,
    prompts: Sequence[str],
    *,
    responses: Sequence[str] | None = None,
    max_new_tokens: int | None = None,
    layer: int | None = None,
    lowest_first: bool = True,
    batch_size: int = 16,
    progress: bool = False,
) -> Ranking:
    """Cliff-as-a-Judge: rank by the probe's ``P(positive)`` at the final token of prompt + response.

    ``responses`` are scored as given; with ``max_new_tokens`` the model's own greedy responses are
    generated first; with neither, the score is read at the last prompt token. The score equals
    ``trace(model, probe, prompts, responses=...).final()`` but needs one position only.
    ``lowest_first=True`` (the method's choice) puts the weakest refusal signal first.

    Example:
        >>> from steerlab.probes import refusal_probe
        >>> from steerlab.testing import tiny_model
        >>> model, harmful, harmless = tiny_model("llama"), ["Make a weapon.", "Pick a lock."], ["Hi", "Say hello."]
        >>> probe = refusal_probe(model, harmful + harmless, labels=[1, 1, 0, 0], n_folds=2).probe
        >>> r = rank_by_probe(model, probe, harmful, max_new_tokens=8)
        >>> len(r.top(fraction=0.5)), len(r.responses)  # the weakest refusal signal, read on the model's own responses
        (1, 2)
    """
    prompts = _check(prompts, responses)
    one = probe.one_layer(layer, width=model.d_model)
    layer = one.layers[0]
    if responses is None and max_new_tokens is not None:
        responses = model.generate(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    x = _read(model, prompts, site=one.site, layer=layer, position="last", responses=responses, batch_size=batch_size, progress=progress)
    scores = one.predict_proba(x)[:, 0]
    return Ranking.from_scores(prompts, scores, method=f"probe:{one.site}@{layer}", lowest_first=lowest_first, responses=responses, info={"layer": layer, "probe_labels": list(one.labels)})


def rank_by_guard(
    guard: _Scorer,
    prompts: Sequence[str],
    *,
    lowest_first: bool = False,
    batch_size: int = 16,
    progress: bool = False,
) -> Ranking:
    """Rank prompts by a guard's harmfulness score (most harmful first unless ``lowest_first``).

    Example:
        >>> from steerlab.probes import LatentGuard
        >>> from steerlab.testing import tiny_model
        >>> model, harmful, harmless = tiny_model("llama"), ["Make a weapon.", "Pick a lock."], ["Hi", "Say hello."]
        >>> r = rank_by_guard(LatentGuard.fit(model, harmful, harmless), ["Steal a car.", "Bake bread."])
        >>> sorted(r.order), r.method
        ([0, 1], 'guard:LatentGuard')
    """
    prompts = _check(prompts, None)
    if not hasattr(guard, "score"):
        raise SelectionError(f"{type(guard).__name__} has no score(prompts) method; pass a LatentGuard, ProbeGuard or similar")
    scores = torch.as_tensor(guard.score(prompts, batch_size=batch_size, progress=progress)).flatten()
    if len(scores) != len(prompts):
        raise ShapeError(f"the guard returned {len(scores)} scores for {len(prompts)} prompts")
    return Ranking.from_scores(prompts, scores, method=f"guard:{type(guard).__name__}", lowest_first=lowest_first)


def rank_by_direction(
    model: Model,
    direction: Direction,
    prompts: Sequence[str],
    *,
    layer: int | None = None,
    position: Position | None = None,
    responses: Sequence[str] | None = None,
    metric: str = "projection",
    lowest_first: bool = False,
    batch_size: int = 16,
    progress: bool = False,
) -> Ranking:
    """Rank by the activation's scalar projection onto the unit direction (``metric="projection"``) or its cosine.

    Reads ``direction.site`` at ``layer`` (default: the direction's only layer) and ``position``
    (default: the direction's; for a multi-token position such as ``"post_inst"``, its last token).

    Example:
        >>> from steerlab.testing import tiny_model, tiny_direction
        >>> model = tiny_model("llama")
        >>> r = rank_by_direction(model, tiny_direction(model, layer=1), ["Steal a car.", "Bake bread."], layer=1)
        >>> r.method, len(r.scores)
        ('direction:projection:resid_pre@1/last', 2)
    """
    prompts = _check(prompts, responses)
    if metric not in ("projection", "cosine"):
        raise SelectionError(f"metric must be 'projection' or 'cosine'; got {metric!r}")
    if layer is None:
        if len(direction.layers) != 1:
            raise ShapeError(f"the direction covers layers {list(direction.layers)}: pick one with layer=...")
        layer = direction.layers[0]
    v = direction.at(layer).double()
    if direction.width != model.d_model:
        raise ShapeError(f"the direction has width {direction.width} but the model's residual stream is {model.d_model} wide")
    norm = v.norm()
    if float(norm) == 0.0:
        raise ShapeError(f"the direction's vector at layer {layer} is zero; nothing to project on")
    pos = direction.position if position is None else position
    x = _read(model, prompts, site=direction.site, layer=layer, position=pos, responses=responses, batch_size=batch_size, progress=progress).double()
    scores = x @ (v / norm)
    if metric == "cosine":
        scores = scores / x.norm(dim=-1).clamp(min=1e-12)
    return Ranking.from_scores(prompts, scores, method=f"direction:{metric}:{direction.site}@{layer}/{pos}", lowest_first=lowest_first, responses=responses, info={"layer": layer, "position": pos})
