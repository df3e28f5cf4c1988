"""Steer ops: values that become hooks inside ``with model.apply(op): ...``.

* :class:`AddVector` — ``x <- x + coeff * v`` on ``resid_pre`` of chosen layers.
* :class:`Ablate` — ``x <- x - (r̂·x) r̂`` at every layer's input and every attention and MLP output
  (METHODS 1, directional ablation), prompt and generated tokens alike.
* :class:`Clamp` — ``x <- x + (value - r̂·x) r̂`` on ``resid_pre`` of chosen layers.

``positions`` is ``"all"`` (default), ``"prompt"`` or ``"generated"``; the last two need the prompt
length, which :meth:`Model.generate` records.

Example:
    >>> with model.apply(AddVector(direction, coeff=4.0, layers=[10])):      # doctest: +SKIP
    ...     model.generate(["Write a poem."])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from steerlab.errors import ShapeError, UnknownPositionError
from steerlab.hooks import HookContext
from steerlab.steering.direction import Direction

if TYPE_CHECKING:
    from steerlab.model import Model

StepPositions = Literal["all", "prompt", "generated"]
HookSpec = tuple[str, int, Callable[[torch.Tensor, HookContext], torch.Tensor | None]]


def _check_width(direction: Direction, model: Model) -> None:
    if direction.width != model.d_model:
        raise ShapeError(
            f"direction has width {direction.width} but {model.name} has d_model={model.d_model}; "
            "fit the direction on this model (or one of the same width)"
        )


def vector_for(direction: Direction, layer: int, source_layer: int | None) -> torch.Tensor:
    """The vector to use at ``layer``: ``source_layer``'s, the layer's own, or the only one there is."""
    if source_layer is not None:
        return direction.at(source_layer)
    if layer in direction.layers or len(direction.layers) != 1:
        return direction.at(layer)
    return direction.vectors[0]


def position_mask(x: torch.Tensor, ctx: HookContext, positions: StepPositions) -> torch.Tensor | None:
    """[1, s, 1] mask of the tokens in this call that the op applies to (None = all)."""
    if positions == "all":
        return None
    prompt_len = ctx.step.prompt_length
    if prompt_len is None:
        raise UnknownPositionError(
            f"positions={positions!r} needs the prompt length: generate through model.generate(...), "
            "or use positions='all'"
        )
    absolute = ctx.step.past_length + torch.arange(x.shape[1], device=x.device)
    keep = absolute < prompt_len if positions == "prompt" else absolute >= prompt_len
    return keep[None, :, None]


def masked(x: torch.Tensor, new: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """``new`` where ``mask`` selects a token, ``x`` elsewhere; ``None`` (nothing changed, the hook did not
    act) when the mask selects no token of this call."""
    if mask is None:
        return new
    if not bool(mask.any()):
        return None
    return torch.where(mask, new, x)


class Cast:
    """A vector converted once per (dtype, device) instead of on every hook call."""

    def __init__(self, vector: torch.Tensor) -> None:
        self.vector = vector
        self._cache: dict[tuple, torch.Tensor] = {}

    def like(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.dtype, x.device)
        if key not in self._cache:
            self._cache[key] = self.vector.to(dtype=x.dtype, device=x.device)
        return self._cache[key]


@dataclass(frozen=True)
class AddVector:
    """Add ``coeff`` times a direction vector at ``layers`` (default: the direction's own layers).

    Each layer uses its own vector, or ``source_layer``'s, or the only vector of a one-layer direction.
    """

    direction: Direction
    coeff: float = 1.0
    layers: Sequence[int] | None = None
    source_layer: int | None = None
    positions: StepPositions = "all"
    unit: bool = False

    def hooks(self, model: Model) -> list[HookSpec]:
        """The (site, layer, fn) triples that implement this op on ``model``."""
        _check_width(self.direction, model)
        direction = self.direction.unit() if self.unit else self.direction
        layers = model.layer_indices(self.layers if self.layers is not None else list(direction.layers))
        specs = []
        for layer in layers:
            vec = Cast(vector_for(direction, layer, self.source_layer) * self.coeff)

            def fn(x, ctx, vec=vec):
                return masked(x, x + vec.like(x), position_mask(x, ctx, self.positions))

            specs.append(("resid_pre", layer, fn))
        return specs


def _projector_fns(r_hat: torch.Tensor, positions: StepPositions, value: float | None):
    cast = Cast(r_hat)

    def fn(x, ctx):
        r = cast.like(x)
        proj = x @ r
        target = 0.0 if value is None else value
        return masked(x, x + (target - proj)[..., None] * r, position_mask(x, ctx, positions))

    return fn


@dataclass(frozen=True)
class Ablate:
    """Project the direction out of the residual stream everywhere (METHODS 1).

    Uses the vector of ``source_layer`` (default: the direction's only layer) at every layer;
    ``per_layer=True`` uses each layer's own vector instead (layers the direction covers).
    """

    direction: Direction
    source_layer: int | None = None
    per_layer: bool = False
    positions: StepPositions = "all"

    def hooks(self, model: Model) -> list[HookSpec]:
        """Hooks on resid_pre, attn_out and mlp_out of every layer."""
        _check_width(self.direction, model)
        unit = self.direction.unit()
        if self.per_layer:
            layers = model.layer_indices(list(unit.layers))
            vectors = {la: unit.at(la) for la in layers}
        else:
            source = self.source_layer
            if source is None:
                if len(unit.layers) != 1:
                    raise ShapeError(
                        f"the direction covers layers {list(unit.layers)}: pick one with source_layer=..., "
                        "or pass per_layer=True"
                    )
                source = unit.layers[0]
            vectors = {la: unit.at(source) for la in range(model.n_layers)}
        return [
            (site, la, _projector_fns(vec, self.positions, None))
            for la, vec in vectors.items()
            for site in ("resid_pre", "attn_out", "mlp_out")
        ]


@dataclass(frozen=True)
class Clamp:
    """Set the projection on the (unit) direction to ``value`` at ``layers`` (``resid_pre``)."""

    direction: Direction
    value: float
    layers: Sequence[int]
    source_layer: int | None = None
    positions: StepPositions = "all"

    def hooks(self, model: Model) -> list[HookSpec]:
        """One resid_pre hook per layer."""
        _check_width(self.direction, model)
        unit = self.direction.unit()
        return [
            ("resid_pre", la, _projector_fns(vector_for(unit, la, self.source_layer), self.positions, self.value))
            for la in model.layer_indices(list(self.layers))
        ]
