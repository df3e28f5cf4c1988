"""Compare directions across models, and carry a direction from one model to another (METHODS 9).

Residual coordinates only mean the same thing in two models that share them (a base model and its
instruct version, a model and a lightly edited copy); both functions therefore need equal widths and say
so otherwise. Layers pair by index (``align="index"``) or by relative depth (``align="depth"``: layer
``l`` of an ``L_a``-layer model pairs with ``round(l (L_b - 1) / (L_a - 1))`` of an ``L_b``-layer one).

Example:
    >>> from steerlab.testing import tiny_model, tiny_direction
    >>> base, instruct = tiny_model("llama"), tiny_model("qwen2")
    >>> truth_base, truth_instruct = tiny_direction(base, layer=1), tiny_direction(instruct, layer=1, seed=1)
    >>> list(compare_directions(truth_base, truth_instruct).as_dict())
    [1]
    >>> d = transfer_direction(truth_base, instruct)
    >>> with instruct.apply(steerlab.AddVector(d, coeff=2.0, layers=[1])):
    ...     _ = instruct.generate(["Hi"], max_new_tokens=2)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import torch

from steerlab.errors import LayerIndexError, ShapeError
from steerlab.steering.direction import Direction

if TYPE_CHECKING:
    from steerlab.model import Model

Align = Literal["index", "depth"]


@dataclass(frozen=True)
class LayerCosines:
    """Cosine similarity of two directions on paired layers: ``(layer in a, layer in b, cosine)``."""

    pairs: tuple[tuple[int, int, float], ...]

    def as_dict(self) -> dict[int, float]:
        """``{layer in a: cosine}``."""
        return {la: c for la, _, c in self.pairs}

    def mean(self) -> float:
        """Mean cosine over the paired layers."""
        return sum(c for *_, c in self.pairs) / len(self.pairs)

    def table(self) -> str:
        """The pairs as text."""
        return "\n".join(
            [f"{'layer a':>7} {'layer b':>7} {'cosine':>7}"] + [f"{a:>7} {b:>7} {c:>+7.3f}" for a, b, c in self.pairs]
        )


def _depth(direction: Direction, given: int | None, which: str) -> int:
    n = given if given is not None else direction.info.get("n_layers")
    if n is None:
        raise LayerIndexError(
            f"align='depth' needs the number of layers of the model direction {which} was fitted on: pass "
            f"n_layers=(n_a, n_b) (or fit with steerlab.steering.truthfulness, which records it in info['n_layers'])"
        )
    return int(n)


def map_layer(layer: int, n_from: int, n_to: int) -> int:
    """Layer ``layer`` of an ``n_from``-layer model at the same relative depth in an ``n_to``-layer model.

    Example:
        >>> map_layer(15, 30, 24)
        12
    """
    if n_from <= 1:
        return 0
    return round(layer * (n_to - 1) / (n_from - 1))


_SAME_BASIS = (
    "Residual coordinates of models of different widths do not correspond; compare directions within one model "
    "(e.g. truthfulness vs refusal), or across models that share a residual basis (base / instruct, a model and "
    "its edited copy)."
)


def _named(direction: Direction, fallback: str) -> str:
    return f"{fallback} (fitted on {direction.model})" if direction.model else fallback


def compare_directions(
    a: Direction, b: Direction, *, align: Align = "index", n_layers: tuple[int, int] | None = None
) -> LayerCosines:
    """Cosine similarity of ``a`` and ``b`` per paired layer (see module docs for ``align``).

    Example:
        >>> import torch
        >>> a = Direction(torch.eye(3)[:2], (0, 1)); b = Direction(torch.eye(3)[:2], (0, 1))
        >>> compare_directions(a, b).as_dict()
        {0: 1.0, 1: 1.0}
    """
    if a.width != b.width:
        raise ShapeError(
            f"cannot compare directions: {_named(a, 'a')} has width {a.width} but {_named(b, 'b')} has width "
            f"{b.width}. {_SAME_BASIS}"
        )
    if align not in ("index", "depth"):
        raise ShapeError(f"align must be 'index' or 'depth'; got {align!r}")
    if align == "index":
        pairs = [(la, la) for la in a.layers if la in b.layers]
    else:
        n_a = _depth(a, n_layers[0] if n_layers else None, "a")
        n_b = _depth(b, n_layers[1] if n_layers else None, "b")
        pairs = [(la, map_layer(la, n_a, n_b)) for la in a.layers]
        pairs = [(la, lb) for la, lb in pairs if lb in b.layers]
    if not pairs:
        raise LayerIndexError(
            f"the directions share no layers under align={align!r} (a: {list(a.layers)}, b: {list(b.layers)}); "
            "fit both on overlapping layers, or use align='depth'"
        )
    cos = torch.nn.functional.cosine_similarity
    return LayerCosines(tuple((la, lb, float(cos(a.at(la), b.at(lb), dim=0))) for la, lb in pairs))


def transfer_direction(
    direction: Direction,
    target: Model,
    *,
    align: Align = "index",
    source_n_layers: int | None = None,
) -> Direction:
    """The same vectors, relabelled for ``target``: its name, and layers paired by index or relative depth.

    Raises :class:`~steerlab.errors.ShapeError` naming both widths when they differ, and
    :class:`~steerlab.errors.LayerIndexError` when an index-aligned layer does not exist in ``target``.

    Example:
        >>> from steerlab.testing import tiny_model, tiny_direction
        >>> base, instruct = tiny_model("llama"), tiny_model("qwen2")
        >>> d = transfer_direction(tiny_direction(base, layer=2), instruct)
        >>> d.model == instruct.name, d.layers, d.info["n_layers"]
        (True, (2,), 3)
    """
    if direction.width != target.d_model:
        raise ShapeError(
            f"cannot transfer: {_named(direction, 'the direction')} has width {direction.width} but the target model "
            f"{target.name or type(target.hf).__name__} has d_model={target.d_model}. {_SAME_BASIS}"
        )
    if align == "index":
        missing = [la for la in direction.layers if la >= target.n_layers]
        if missing:
            raise LayerIndexError(
                f"layers {missing} of the direction do not exist in {target.name} ({target.n_layers} layers); "
                "select fewer layers (direction.select([...])) or pass align='depth'"
            )
        layers = list(direction.layers)
        vectors = direction.vectors
    elif align == "depth":
        n_src = _depth(direction, source_n_layers, "direction")
        mapped: dict[int, torch.Tensor] = {}
        for la, vec in zip(direction.layers, direction.vectors):
            mapped.setdefault(map_layer(la, n_src, target.n_layers), vec)
        layers, vectors = list(mapped), torch.stack(list(mapped.values()))
    else:
        raise ShapeError(f"align must be 'index' or 'depth'; got {align!r}")
    info = {**direction.info, "n_layers": target.n_layers, "transferred_from": direction.model,
            "source_layers": list(direction.layers), "align": align}  # fmt: skip
    return replace(direction, vectors=vectors, layers=tuple(layers), model=target.name, info=info)
