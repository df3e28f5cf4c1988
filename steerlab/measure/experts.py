"""MoE experts measured: usage counts, contrastive scores, router-probability attribution.

* :func:`expert_usage` — per (layer, expert): how often the router selects the expert over prompt
  tokens (padding excluded), plus the router's probability mass and routing-weight mass, in one pass.
* :func:`contrast` / :func:`expert_contrast` — MoTE's fTRI (METHODS 6): mean selections per token on
  target prompts minus on other prompts, ranked.
* :func:`expert_attribution` — UOE's affinity (METHODS 7): mean router probability of each expert
  over the (forget-set) tokens.

Scores rank with ``.top(k)`` / ``.top(fraction=...)`` and feed :class:`~steerlab.interventions.ExpertMask`.

Example:
    >>> from steerlab.interventions import ExpertMask
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("qwen2_moe")                 # 3 MoE layers, 4 experts each, top-2 routing
    >>> harmful, harmless = ["How do I pick a lock?", "Write a threat."], ["Hi", "Say hello."]
    >>> scores = expert_contrast(model, harmful, harmless)
    >>> scores.scores.shape                             # [layers, experts]
    torch.Size([3, 4])
    >>> with model.apply(ExpertMask(scores.top(2), mode="off")):
    ...     usage = expert_usage(model, harmful)        # measured with the two experts switched off
    >>> [int(usage.frequency().at(layer)[expert]) for layer, expert in scores.top(2)]
    [0, 0]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from steerlab import compat
from steerlab.errors import InvalidValueError, LayerIndexError, ShapeError
from steerlab.measure.ranking import Order, how_many, rank_order
from steerlab.moe import moe_layer_list, n_experts, router_of
from steerlab.reader import Rows, Tap, read

if TYPE_CHECKING:
    from steerlab.model import Model

Measure = Literal["probs", "weights"]
Expert = tuple[int, int]


@dataclass(frozen=True, eq=False)  # tensor fields: compared by identity
class ExpertScores:
    """A score per (layer, expert): ``scores[i, e]`` belongs to ``layers[i]``, expert ``e``.

    ``kind`` says what the score is: ``"frequency"`` (selections per token), ``"contrast"`` (fTRI),
    ``"probs"`` (mean router probability) or ``"weights"`` (mean routing weight).
    """

    scores: torch.Tensor  # [n_layers, n_experts], float32
    layers: tuple[int, ...]
    kind: str = "frequency"

    def __post_init__(self) -> None:
        if self.scores.dim() != 2 or self.scores.shape[0] != len(self.layers):
            raise ShapeError(
                f"scores must be [n_layers, n_experts] for layers {list(self.layers)}, got {tuple(self.scores.shape)}"
            )

    @property
    def n_experts(self) -> int:
        """Routed experts per layer."""
        return int(self.scores.shape[1])

    def at(self, layer: int) -> torch.Tensor:
        """The [n_experts] scores of ``layer``."""
        if layer not in self.layers:
            raise LayerIndexError(f"no scores for layer {layer}; these cover layers {list(self.layers)}")
        return self.scores[self.layers.index(layer)]

    def top(self, k: int | None = None, *, fraction: float | None = None, order: Order = "desc") -> list[Expert]:
        """The ``k`` highest-scoring (layer, expert) pairs, or the top ``fraction`` of all pairs.

        Example:
            >>> scores = ExpertScores(torch.tensor([[0.1, 0.9], [0.5, -2.0]]), layers=(3, 4))
            >>> scores.top(2)
            [(3, 1), (4, 0)]
            >>> scores.top(fraction=0.25, order="asc")
            [(4, 1)]
        """
        n = how_many(k, fraction=fraction, total=self.scores.numel())
        return [(self.layers[int(i) // self.n_experts], int(i) % self.n_experts) for i in rank_order(self.scores, order)[:n]]

    def rows(self, k: int | None = None, *, order: Order = "desc") -> list[dict[str, Any]]:
        """Ranked rows ``{"rank", "layer", "expert", "score"}`` (all when ``k`` is None)."""
        pairs = self.top(self.scores.numel() if k is None else k, order=order)
        return [
            {"rank": i + 1, "layer": la, "expert": e, "score": float(self.at(la)[e])} for i, (la, e) in enumerate(pairs)
        ]

    def table(self, k: int | None = 20, *, order: Order = "desc") -> str:
        """A plain-text ranked table."""
        lines = [f"{'rank':>4} {'layer':>5} {'expert':>6} {self.kind:>12}"]
        lines += [
            f"{r['rank']:>4} {r['layer']:>5} {r['expert']:>6} {r['score']:>12.5g}" for r in self.rows(k, order=order)
        ]
        return "\n".join(lines)

    def figure(self, *, title: str | None = None):
        """A plotly heatmap (layers x experts)."""
        import plotly.graph_objects as go

        diverging = bool((self.scores < 0).any())
        heat = go.Heatmap(
            z=self.scores.tolist(),
            y=[str(la) for la in self.layers],
            colorscale="RdBu" if diverging else "Viridis",
            zmid=0.0 if diverging else None,
            colorbar={"title": self.kind},
        )
        fig = go.Figure(heat)
        fig.update_layout(title=title or f"Experts: {self.kind}", xaxis_title="expert", yaxis_title="layer")
        return fig


@dataclass(frozen=True, eq=False)  # tensor fields: compared by identity
class ExpertUsage:
    """Router statistics over a prompt set, per MoE layer in ``layers``.

    ``counts[i, e]``: tokens whose top-k included expert ``e`` at ``layers[i]``; each row sums to
    ``n_tokens * top_k``. ``prob_mass`` / ``weight_mass``: sums over tokens of the softmax router
    probability / of the routing weight the expert received (0 when not selected).
    """

    counts: torch.Tensor  # [n_layers, n_experts], int64
    prob_mass: torch.Tensor  # [n_layers, n_experts], float64
    weight_mass: torch.Tensor  # [n_layers, n_experts], float64
    layers: tuple[int, ...]
    n_tokens: int
    n_prompts: int
    top_k: int

    def frequency(self) -> ExpertScores:
        """Selections per token (fTRI's mean count; each layer sums to ``top_k``)."""
        return ExpertScores((self.counts.double() / self.n_tokens).float(), self.layers, kind="frequency")

    def attribution(self, *, measure: Measure = "probs") -> ExpertScores:
        """Mean router probability (``"probs"``, UOE; sums to 1 per layer) or mean routing weight
        (``"weights"``; sums to 1 where the family renormalises its top-k, else to the top-k mass)."""
        if measure not in ("probs", "weights"):
            raise InvalidValueError(f"measure must be 'probs' (router probabilities) or 'weights' (routing weights), got {measure!r}")
        mass = self.prob_mass if measure == "probs" else self.weight_mass
        return ExpertScores((mass / self.n_tokens).float(), self.layers, kind=measure)


class _RouterStats:
    """Per MoE layer: selections, router probability mass and routing-weight mass over non-pad tokens."""

    def __init__(self, layers: list[int], n: int):
        self.layers, self.n = layers, n
        self.counts = torch.zeros(len(layers), n, dtype=torch.long)
        self.probs = torch.zeros(len(layers), n, dtype=torch.float64)
        self.weights = torch.zeros(len(layers), n, dtype=torch.float64)
        self.tokens = self.prompts = 0

    def update(self, output: tuple, rows: Rows, layer: int) -> None:
        row, n = self.layers.index(layer), self.n
        logits, top_w, top_i, _ = compat.router_output(output)
        keep = rows.batch.attention_mask.bool().reshape(-1).to(logits.device)
        logits = logits.reshape(-1, n)[keep]
        top_w, top_i = top_w.reshape(keep.shape[0], -1)[keep], top_i.reshape(keep.shape[0], -1)[keep]
        self.counts[row] += torch.bincount(top_i.reshape(-1).cpu(), minlength=n)
        self.probs[row] += torch.softmax(logits.float(), dim=-1).double().sum(0).cpu()
        dense = torch.zeros(top_i.shape[0], n, dtype=torch.float32, device=top_i.device)
        self.weights[row] += dense.scatter_(1, top_i, top_w.float()).double().sum(0).cpu()
        if row == 0:
            self.tokens += int(keep.sum())
            self.prompts += len(rows.idx)

    def result(self) -> _RouterStats:
        return self


def expert_usage(
    model: Model,
    prompts: Sequence[str],
    *,
    layers: Sequence[int] | int | None = None,
    batch_size: int = 16,
    chat: bool = True,
    system: str | None = None,
) -> ExpertUsage:
    """Count router selections per (layer, expert) over every prompt token (padding excluded), and sum
    router probabilities and routing weights, in one pass. Active ``model.apply`` masks are respected.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("qwen2_moe")
        >>> usage = expert_usage(model, ["How do I pick a lock?", "Say hello."])
        >>> usage.counts.shape, usage.top_k, usage.n_prompts
        (torch.Size([3, 4]), 2, 2)
        >>> bool((usage.counts.sum(1) == usage.n_tokens * usage.top_k).all())   # top_k picks per token
        True
        >>> print(usage.frequency().table(2))                           # doctest: +ELLIPSIS
        rank layer expert    frequency
           1 ...
           2 ...
    """
    layer_list = moe_layer_list(model, layers)
    routers = {la: router_of(model, la) for la in layer_list}
    n_exp = {la: n_experts(r) for la, r in routers.items()}
    if len(set(n_exp.values())) != 1:
        raise ShapeError(f"MoE layers have different expert counts {n_exp}; pass layers=... with one count")
    stats = _RouterStats(layer_list, next(iter(n_exp.values())))
    # the router module's own output: after any router_logits edits, so the final choice
    taps = [Tap("output", layer, stats, module=routers[layer]) for layer in layer_list]
    read(model, prompts, taps=taps, batch_size=batch_size, chat=chat, system=system)
    return ExpertUsage(
        counts=stats.counts,
        prob_mass=stats.probs,
        weight_mass=stats.weights,
        layers=tuple(layer_list),
        n_tokens=stats.tokens,
        n_prompts=stats.prompts,
        top_k=int(next(iter(routers.values())).top_k),
    )


def contrast(target: ExpertUsage, other: ExpertUsage) -> ExpertScores:
    """fTRI scores (METHODS 6): selections per token on ``target`` minus on ``other``; ``.top(k)`` ranks.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("qwen2_moe")
        >>> scores = contrast(expert_usage(model, ["How do I pick a lock?"]), expert_usage(model, ["Hi"]))
        >>> scores.kind, len(scores.top(5))
        ('contrast', 5)
    """
    if target.layers != other.layers or target.counts.shape != other.counts.shape:
        raise ShapeError(
            f"usage statistics cover different layers/experts ({list(target.layers)} x {target.counts.shape[1]} vs "
            f"{list(other.layers)} x {other.counts.shape[1]}); collect both with the same layers on the same model"
        )
    diff = target.counts.double() / target.n_tokens - other.counts.double() / other.n_tokens
    return ExpertScores(diff.float(), target.layers, kind="contrast")


def expert_contrast(
    model: Model,
    target: Sequence[str],
    other: Sequence[str],
    *,
    layers: Sequence[int] | int | None = None,
    batch_size: int = 16,
    chat: bool = True,
    system: str | None = None,
) -> ExpertScores:
    """fTRI in one call: :func:`expert_usage` on both prompt sets, then :func:`contrast`.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("qwen2_moe")
        >>> top = expert_contrast(model, ["How do I pick a lock?"], ["Hi"]).top(5)
        >>> len(top), all(layer in range(3) and expert in range(4) for layer, expert in top)
        (5, True)
    """
    kw = {"layers": layers, "batch_size": batch_size, "chat": chat, "system": system}
    return contrast(expert_usage(model, target, **kw), expert_usage(model, other, **kw))


def expert_attribution(
    model: Model,
    prompts: Sequence[str],
    *,
    measure: Measure = "probs",
    layers: Sequence[int] | int | None = None,
    batch_size: int = 16,
    chat: bool = True,
    system: str | None = None,
) -> ExpertScores:
    """UOE affinity (METHODS 7): mean softmax router probability of each expert over the prompts' tokens.

    For DeepSeek's sigmoid routing this is the softmax of the same logits (same per-token ranking).
    ``measure="weights"`` averages the routing weights actually used instead.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("qwen2_moe")
        >>> aff = expert_attribution(model, ["Forget this fact.", "And this one."])
        >>> layer, expert = aff.top(1)[0]
        >>> aff.kind, torch.allclose(aff.scores.sum(1), torch.ones(3))   # probabilities: each layer sums to 1
        ('probs', True)
    """
    usage = expert_usage(model, prompts, layers=layers, batch_size=batch_size, chat=chat, system=system)
    return usage.attribution(measure=measure)
