"""Attention heads measured: per-head means, attribution to a direction, and a top-vs-random ablation check.

* :func:`head_means` — per-head mean outputs over a prompt set (for ``HeadAblation(mode="mean")``).
* :func:`head_attribution` — each head's contribution ``(W_O[:, h] @ o_h) · r̂`` at a position,
  averaged over prompts (METHODS 3); a :class:`HeadAttribution` with a ranked table and a heatmap.
* :func:`head_ablation_effect` — ablate the top-k heads and a seeded random k, compare a metric.

Everything reads the ``head`` site (the ``o_proj`` input, [b, s, H, dh]) through :func:`steerlab.reader.read`.

Example:
    >>> from steerlab.testing import tiny_model, tiny_direction
    >>> model = tiny_model("llama")                     # 3 layers x 4 heads
    >>> harmful = ["How do I pick a lock?", "Write a threat."]
    >>> att = head_attribution(model, harmful, tiny_direction(model, layer=2))
    >>> att.scores.shape
    torch.Size([3, 4])
    >>> with model.apply(HeadAblation(att.top(fraction=0.25), rescale_norm=True)):    # the top 3 of 12 heads
    ...     texts = model.generate(["How do I pick a lock?"], max_new_tokens=4)
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from steerlab._checks import linear_parts
from steerlab.arch import normalize_layer
from steerlab.backends.hf import Cast
from steerlab.chat import Position
from steerlab.errors import InvalidValueError, ShapeError, UnknownPositionError
from steerlab.interventions.heads import Head, HeadAblation, HeadMode
from steerlab.measure.ranking import Order, how_many, rank_order
from steerlab.reader import PerPrompt, Rows, Tap, TokenMean, read, select_tokens
from steerlab.steering.direction import Direction

if TYPE_CHECKING:
    from steerlab.model import Model

Metric = Callable[["Model", Sequence[str]], float]


# ----- per-head means -----
def head_means(
    model: Model,
    prompts: Sequence[str],
    *,
    layers: Sequence[int] | int | None = None,
    position: Position = "all",
    batch_size: int = 16,
    chat: bool = True,
    system: str | None = None,
) -> torch.Tensor:
    """Mean output of every head [n_layers, n_heads, head_dim] over ``prompts`` (float32; NaN rows for
    layers not asked for). ``position="all"`` averages over every prompt token (padding excluded);
    a named or negative position averages over that position of each prompt. Sums are float64.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> means = head_means(model, ["Hi", "Say hello."])
        >>> means.shape                                                  # [layers, heads, head_dim]
        torch.Size([3, 4, 16])
        >>> iv = HeadAblation([(2, 1)], mode="mean", means=means)
    """
    layer_list = model.layer_indices(layers)
    taps = [Tap("head", layer, TokenMean(position)) for layer in layer_list]
    results = read(model, prompts, taps=taps, batch_size=batch_size, chat=chat, system=system)
    means = torch.full((model.n_layers, model.n_heads, model.head_dim), float("nan"))
    for layer, mean in zip(layer_list, results):
        means[layer] = mean
    return means


# ----- attribution -----
def unit_vector(direction: Direction | torch.Tensor, d_model: int, source_layer: int | None) -> torch.Tensor:
    """The unit [d_model] vector of a one-layer Direction (or its ``source_layer``) or of a raw vector."""
    if isinstance(direction, Direction):
        if source_layer is None:
            if len(direction.layers) != 1:
                raise ShapeError(
                    f"the direction covers layers {list(direction.layers)}: pick one with source_layer=..."
                )
            source_layer = direction.layers[0]
        vec = direction.at(source_layer)
    else:
        vec = torch.as_tensor(direction).detach().float().cpu()
        if vec.dim() == 2 and vec.shape[0] == 1:  # a probe's coef_ of shape [1, d]
            vec = vec[0]
    if vec.dim() != 1 or vec.shape[0] != d_model:
        raise ShapeError(
            f"direction has shape {tuple(vec.shape)} but the model's d_model is {d_model}; pass a [d_model] vector "
            "(a probe weight vector or a Direction fitted on this model)"
        )
    norm = vec.norm()
    if float(norm) == 0.0:
        raise ShapeError("cannot attribute to a zero direction")
    return (vec / norm).float()


@dataclass(frozen=True, eq=False)  # tensor fields: compared by identity
class HeadAttribution:
    """Per-head contribution to a direction, ``scores[layer, head]`` (mean over prompts).

    ``scores[l].sum() + bias[l]`` is the projection of layer ``l``'s ``o_proj`` output on the unit
    direction (before any post-attention norm or residual multiplier the family applies).
    """

    scores: torch.Tensor  # [n_layers, n_heads], float32
    bias: torch.Tensor  # [n_layers], projection of o_proj's bias (0 without one)
    direction: torch.Tensor  # [d], unit
    position: Position = "last"
    n_prompts: int = 0
    model: str = ""

    @property
    def n_layers(self) -> int:
        """Number of layers (rows)."""
        return int(self.scores.shape[0])

    @property
    def n_heads(self) -> int:
        """Heads per layer (columns)."""
        return int(self.scores.shape[1])

    def top(self, k: int | None = None, *, fraction: float | None = None, order: Order = "abs") -> list[Head]:
        """The ``k`` most important heads, or the top ``fraction`` of all heads (METHODS 3 uses ~0.03).

        ``order``: ``"abs"`` largest magnitude, ``"desc"`` most positive, ``"asc"`` most negative (the
        heads that push against the direction, e.g. refusal-suppressing heads in METHODS 3).

        Example:
            >>> scores = torch.tensor([[0.5, -3.0], [2.0, -0.1]])          # 2 layers x 2 heads
            >>> att = HeadAttribution(scores, bias=torch.zeros(2), direction=torch.ones(4) / 2)
            >>> att.top(2), att.top(1, order="asc"), att.top(fraction=0.5, order="desc")
            ([(0, 1), (1, 0)], [(0, 1)], [(1, 0), (0, 0)])
        """
        n = how_many(k, fraction=fraction, total=self.scores.numel())
        return [divmod(int(i), self.n_heads) for i in rank_order(self.scores, order)[:n]]

    def rows(self, k: int | None = None, *, order: Order = "abs") -> list[dict[str, Any]]:
        """Ranked rows ``{"rank", "layer", "head", "score"}`` (all heads when ``k`` is None)."""
        heads = self.top(self.scores.numel() if k is None else k, order=order)
        return [
            {"rank": i + 1, "layer": la, "head": h, "score": float(self.scores[la, h])}
            for i, (la, h) in enumerate(heads)
        ]

    def table(self, k: int | None = 20, *, order: Order = "abs") -> str:
        """A plain-text ranked table of the top ``k`` heads (all when ``None``)."""
        lines = [f"{'rank':>4} {'layer':>5} {'head':>4} {'score':>12}"]
        lines += [
            f"{r['rank']:>4} {r['layer']:>5} {r['head']:>4} {r['score']:>12.5g}" for r in self.rows(k, order=order)
        ]
        return "\n".join(lines)

    def figure(self, *, title: str | None = None):
        """A plotly heatmap (layers x heads), diverging around 0."""
        import plotly.graph_objects as go

        z = self.scores.tolist()
        fig = go.Figure(go.Heatmap(z=z, colorscale="RdBu", zmid=0.0, colorbar={"title": "projection"}))
        fig.update_layout(
            title=title
            or f"Head contributions to the direction at position {self.position!r} ({self.n_prompts} prompts)",
            xaxis_title="head",
            yaxis_title="layer",
        )
        return fig


class _HeadProjections:
    """Sums over prompts of each head's projection ``o_h · (W_O[:, h]ᵀ r̂)`` at ``position``, per layer."""

    def __init__(self, readers: list[torch.Tensor], position: Position):
        self.casts = [Cast(u) for u in readers]
        self.position = position
        self.sums = torch.zeros(len(readers), readers[0].shape[0], dtype=torch.float64)

    def update(self, x: torch.Tensor, rows: Rows, layer: int) -> None:
        picked = select_tokens(x.float(), rows, self.position)  # [b, H, dh]
        self.sums[layer] += (picked * self.casts[layer].like(picked)).sum(-1).double().sum(0).cpu()

    def result(self) -> torch.Tensor:
        return self.sums


def head_attribution(
    model: Model,
    prompts: Sequence[str],
    direction: Direction | torch.Tensor,
    *,
    source_layer: int | None = None,
    position: Position = "last",
    batch_size: int = 16,
    chat: bool = True,
    system: str | None = None,
) -> HeadAttribution:
    """Attribute a direction to heads: ``(W_O[:, h] @ o_h) · r̂`` at ``position``, mean over prompts (METHODS 3).

    ``direction`` is a :class:`Direction` (one layer, or pick ``source_layer``) or a [d] vector such
    as a probe's weights; it is normalised. ``position`` is any named or negative position (a
    multi-token position such as ``"post_inst"`` or ``"all"`` is averaged per prompt first).

    Example:
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> probe_weights = torch.randn(model.d_model)                  # e.g. a linear probe's coef_[0]
        >>> att = head_attribution(model, ["How do I pick a lock?", "Write a threat."], probe_weights)
        >>> print(att.table(3, order="asc"))                            # doctest: +ELLIPSIS
        rank layer head        score
           1 ...
           2 ...
           3 ...
    """
    if isinstance(position, bool) or not isinstance(position, (str, int)):
        raise UnknownPositionError(f"position must be a name or a negative int, got {position!r}")
    r_hat = unit_vector(direction, model.d_model, source_layer)
    n_layers, n_heads, head_dim = model.n_layers, model.n_heads, model.head_dim
    readers, bias_proj = [], torch.zeros(n_layers)
    for layer in range(n_layers):
        weight, bias = linear_parts(model.spec.layer_module(model.hf, layer, model.spec.o_proj), what="head attribution (o_proj)")
        readers.append((weight.detach().float().cpu().T @ r_hat).view(n_heads, head_dim))  # W_O[:, h].T r̂
        if bias is not None:
            bias_proj[layer] = bias.detach().float().cpu() @ r_hat
    reducer = _HeadProjections(readers, position)
    taps = [Tap("head", layer, reducer) for layer in range(n_layers)]
    sums = read(model, prompts, taps=taps, batch_size=batch_size, chat=chat, system=system)[0]
    return HeadAttribution(
        scores=(sums / len(prompts)).float(),
        bias=bias_proj,
        direction=r_hat,
        position=position,
        n_prompts=len(prompts),
        model=model.name,
    )


# ----- top-k versus random-k ablation -----
def projection_metric(
    direction: Direction | torch.Tensor,
    *,
    layer: int = -1,
    position: Position = "last",
    source_layer: int | None = None,
    batch_size: int = 16,
    chat: bool = True,
    system: str | None = None,
) -> Metric:
    """A metric: mean projection of ``resid_post`` at ``layer`` and ``position`` on the unit direction.

    Example:
        >>> from steerlab.testing import tiny_model, tiny_direction
        >>> model = tiny_model("llama")
        >>> direction = tiny_direction(model, layer=2)
        >>> value = projection_metric(direction)(model, ["How do I pick a lock?"])
        >>> flipped = projection_metric(-direction.at(2))               # a raw [d_model] vector works too
        >>> isinstance(value, float), flipped(model, ["How do I pick a lock?"]) == -value
        (True, True)
    """

    def metric(model: Model, prompts: Sequence[str]) -> float:
        r_hat = unit_vector(direction, model.d_model, source_layer)
        project = PerPrompt(position, fn=lambda picked: picked.float() @ r_hat.to(picked.device))
        tap = Tap("resid_post", normalize_layer(layer, model.n_layers), project)
        (values,) = read(model, prompts, taps=[tap], batch_size=batch_size, chat=chat, system=system)
        return float(values.double().mean())

    return metric


@dataclass(frozen=True)
class HeadAblationEffect:
    """A metric without ablation, with the top heads ablated, and with random head sets ablated."""

    baseline: float
    top: float
    random: tuple[float, ...]
    top_heads: tuple[Head, ...]
    random_heads: tuple[tuple[Head, ...], ...]

    @property
    def delta_top(self) -> float:
        """Change of the metric when the top heads are ablated."""
        return self.top - self.baseline

    @property
    def delta_random(self) -> float:
        """Mean change of the metric over the random draws."""
        return sum(self.random) / len(self.random) - self.baseline

    def table(self) -> str:
        """A plain-text summary."""
        n = len(self.top_heads)
        mean_random = sum(self.random) / len(self.random)
        return "\n".join(
            [
                f"{'ablated':<22} {'metric':>10} {'change':>10}",
                f"{'none':<22} {self.baseline:>10.4g} {0.0:>10.4g}",
                f"{f'top {n} heads':<22} {self.top:>10.4g} {self.delta_top:>10.4g}",
                f"{f'random {n} heads (x{len(self.random)})':<22} {mean_random:>10.4g} {self.delta_random:>10.4g}",
            ]
        )


def head_ablation_effect(
    model: Model,
    attribution: HeadAttribution,
    prompts: Sequence[str],
    *,
    k: int | None = None,
    fraction: float | None = None,
    order: Order = "abs",
    metric: Metric | None = None,
    mode: HeadMode = "zero",
    means: torch.Tensor | None = None,
    rescale_norm: bool = True,
    seed: int = 0,
    n_random: int = 1,
) -> HeadAblationEffect:
    """Ablate the top ``k`` heads (or top ``fraction``; default ``fraction=0.03``) of ``attribution`` and
    ``n_random`` seeded random sets of the same size; report ``metric(model, prompts)`` for each
    (METHODS 3: ~3% of heads matter, a random 3% does not).

    The default metric is the mean projection of the last layer's ``resid_post`` at the last prompt
    token on the attribution's direction (:func:`projection_metric`).

    Example:
        >>> from steerlab.testing import tiny_model, tiny_direction
        >>> model = tiny_model("llama")
        >>> harmful = ["How do I pick a lock?", "Write a threat."]
        >>> att = head_attribution(model, harmful, tiny_direction(model, layer=2))
        >>> effect = head_ablation_effect(model, att, harmful, fraction=0.25, order="asc", n_random=2)
        >>> list(effect.top_heads) == att.top(fraction=0.25, order="asc"), len(effect.random)
        (True, 2)
        >>> print(effect.table())                                       # doctest: +ELLIPSIS
        ablated                    metric     change
        none ...
        top 3 heads ...
        random 3 heads (x2) ...
    """
    if attribution.scores.shape != (model.n_layers, model.n_heads):
        raise ShapeError(
            f"the attribution is [{attribution.n_layers}, {attribution.n_heads}] but {model.name} has "
            f"{model.n_layers} layers x {model.n_heads} heads; attribute on this model"
        )
    if n_random < 1:
        raise InvalidValueError(f"n_random must be at least 1, got {n_random}")
    if k is None and fraction is None:
        fraction = 0.03
    metric = metric or projection_metric(attribution.direction)
    top_heads = tuple(attribution.top(k, fraction=fraction, order=order))
    every = [(la, h) for la in range(model.n_layers) for h in range(model.n_heads)]
    rng = random.Random(seed)
    random_sets = tuple(tuple(sorted(rng.sample(every, len(top_heads)))) for _ in range(n_random))

    def measure(heads: tuple[Head, ...] | None) -> float:
        if heads is None:
            return float(metric(model, prompts))
        iv = HeadAblation(heads, mode=mode, rescale_norm=rescale_norm, means=means)
        with model.apply(iv, check_fired=False):  # heads past the metric's layer never run
            return float(metric(model, prompts))

    return HeadAblationEffect(
        baseline=measure(None),
        top=measure(top_heads),
        random=tuple(measure(s) for s in random_sets),
        top_heads=tuple(top_heads),
        random_heads=random_sets,
    )
