"""Attention heads as values: :class:`HeadAblation` zeroes (or mean-fills) chosen heads' outputs.

Heads are ``(layer, head)`` pairs; layers and heads may be negative (counted from the end). The value
works on the ``head`` hook site (the ``o_proj`` input, [b, s, H, dh]), so grouped-query and latent
attention are handled alike: only query heads exist at that point. Optionally the ``o_proj`` output is
rescaled back to its unablated per-token norm (METHODS 3). Measurements (per-head means, attribution,
the top-vs-random check) live in :mod:`steerlab.measure.heads`.

Example:
    >>> from steerlab.measure import head_attribution
    >>> from steerlab.testing import tiny_model, tiny_direction
    >>> model = tiny_model("llama")                     # 3 layers x 4 heads
    >>> att = head_attribution(model, ["How do I pick a lock?", "Write a threat."], tiny_direction(model, layer=2))
    >>> with model.apply(HeadAblation(att.top(fraction=0.25), rescale_norm=True)):    # the top 3 of 12 heads
    ...     texts = model.generate(["How do I pick a lock?"], max_new_tokens=4)
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from steerlab.arch import normalize_layer
from steerlab.errors import EmptyInputError, InvalidValueError, NotBakeableError, ShapeError, SteerlabError
from steerlab.plan import FillHeads, Plan, SetHeads, Step, WeightEdit

if TYPE_CHECKING:
    from steerlab.model import Model

HeadMode = Literal["zero", "mean"]


class HeadIndexError(SteerlabError, IndexError):
    """A head index is outside the layer's range of attention heads."""


# ----- heads as values -----
Head = tuple[int, int]


def normalize_heads(model: Model, heads: Sequence[Head]) -> dict[int, list[int]]:
    """{layer: sorted heads} with negative indices resolved; clear errors for anything out of range."""
    n_heads = model.n_heads
    out: dict[int, set[int]] = {}
    for layer, head in heads:
        la = normalize_layer(layer, model.n_layers)
        if isinstance(head, bool) or not isinstance(head, int):
            raise HeadIndexError(f"head index must be an int, got {head!r}")
        h = head + n_heads if head < 0 else head
        if not 0 <= h < n_heads:
            raise HeadIndexError(
                f"head {head} (layer {layer}) is out of range: {model.name} has {n_heads} attention heads per layer; "
                f"use 0..{n_heads - 1} (or -{n_heads}..-1)"
            )
        out.setdefault(la, set()).add(h)
    return {la: sorted(hs) for la, hs in sorted(out.items())}


def _as_head_tuple(heads: Collection[Head]) -> tuple[Head, ...]:
    if isinstance(heads, (str, bytes)):
        raise HeadIndexError("heads must be a collection of (layer, head) pairs")
    items = []
    for item in heads:
        try:
            layer, head = item
        except (TypeError, ValueError):
            raise HeadIndexError(f"each head must be a (layer, head) pair, got {item!r}") from None
        if isinstance(layer, bool) or isinstance(head, bool) or not isinstance(layer, int) or not isinstance(head, int):
            raise HeadIndexError(f"each head must be a pair of ints (layer, head), got {item!r}")
        items.append((int(layer), int(head)))
    if not items:
        raise EmptyInputError("HeadAblation needs at least one (layer, head) pair")
    return tuple(sorted(set(items)))


@dataclass(frozen=True)
class HeadAblation:
    """Replace chosen heads' outputs (the ``head`` site, before ``o_proj``) with zero or their mean.

    ``mode="mean"`` needs ``means`` [n_layers, n_heads, head_dim] from :func:`head_means`.
    ``rescale_norm=True`` then rescales each token's ``o_proj`` output back to the norm it had
    without the ablation (METHODS 3: "zero the chosen heads, rescale the attention output back to
    its original norm"); without an ``o_proj`` bias this is done exactly on the ``head`` site,
    with one it is done on ``attn_out`` (which must then be the attention module's own output).
    Where a post-attention norm follows ``o_proj`` (Gemma), that norm already undoes most of any
    rescaling; the option still rescales the ``o_proj`` output, as the paper does.

    Example:
        >>> from steerlab.reader import PerPrompt, Tap, read
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> iv = HeadAblation([(1, 0), (-1, -1)], rescale_norm=True)      # negative: counted from the end
        >>> [step.where for step in model.plan(iv).steps]
        ['head @ 1', 'head @ 2']
        >>> with model.apply(iv):
        ...     texts = model.generate(["Hi"], max_new_tokens=4)
        >>> with model.apply(HeadAblation([(1, h) for h in range(model.n_heads)])):    # every head of layer 1
        ...     (attn_out,) = read(model, ["Hi"], taps=[Tap("attn_out", 1, PerPrompt("last"))])
        >>> bool((attn_out == 0).all())
        True
    """

    heads: Collection[Head]
    mode: HeadMode = "zero"
    rescale_norm: bool = False
    means: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", _as_head_tuple(self.heads))
        if self.mode not in ("zero", "mean"):
            raise InvalidValueError(f"mode must be 'zero' (zero the heads) or 'mean' (fill in head_means), got {self.mode!r}")
        if self.mode == "mean":
            if self.means is None:
                raise EmptyInputError(
                    "mode='mean' needs per-head means: HeadAblation(heads, mode='mean', means=head_means(model, prompts))"
                )
            if self.means.dim() != 3:
                raise ShapeError(f"means must be [n_layers, n_heads, head_dim], got {tuple(self.means.shape)}")
            object.__setattr__(self, "means", self.means.detach().to(torch.float32).cpu())

    def _fills(self, model: Model) -> dict[int, tuple[list[int], torch.Tensor | None]]:
        """{layer: (heads, their means or None)} after the range and shape checks."""
        by_layer = normalize_heads(model, self.heads)
        if self.mode == "zero":
            return {layer: (heads, None) for layer, heads in by_layer.items()}
        expected = (model.n_layers, model.n_heads, model.head_dim)
        if tuple(self.means.shape) != expected:
            raise ShapeError(
                f"means have shape {tuple(self.means.shape)} but {model.name} needs {expected} "
                "(n_layers, n_heads, head_dim): compute them with head_means(model, prompts) on this model"
            )
        out = {}
        for layer, heads in by_layer.items():
            values = self.means[layer, torch.tensor(heads)]
            if bool(torch.isnan(values).any()):
                raise ShapeError(
                    f"the stored means have no values for layer {layer}: compute head_means(...) with this layer included"
                )
            out[layer] = (heads, values)
        return out

    def resolve(self, model: Model) -> Plan:
        """``SetHeads`` on the ``head`` site of each layer."""
        steps = tuple(
            Step(layer, "head", SetHeads(tuple(heads), fill, self.rescale_norm))
            for layer, (heads, fill) in self._fills(model).items()
        )
        return Plan(type(self).__name__, steps)

    def weights(self, model: Model) -> tuple[WeightEdit, ...]:
        """The heads' ``o_proj`` input columns zeroed (``mode="mean"``: their mean write folded into the bias)."""
        if self.rescale_norm:
            raise NotBakeableError(
                "HeadAblation(rescale_norm=True) rescales each token's attention output by a ratio of norms, which is "
                "not linear in the input, so no weight edit reproduces it. Bake rescale_norm=False instead. "
                "Apply it at runtime instead: `with model.apply(iv): ...`"
            )
        return tuple(FillHeads(layer, tuple(heads), fill) for layer, (heads, fill) in self._fills(model).items())
