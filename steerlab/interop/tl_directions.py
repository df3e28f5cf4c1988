"""Directions <-> TransformerLens: a Direction as TL ``fwd_hooks`` (:func:`direction_to_tl_hooks`) and a Direction
read back from per-layer vectors, a TL activation cache (or two: their mean difference), or those hooks
(:func:`direction_from_tl`).

Example:
    >>> import torch
    >>> from steerlab.interop.tl_directions import direction_from_tl
    >>> d = direction_from_tl({0: torch.ones(4), 1: torch.zeros(4)})
    >>> d.layers
    (0, 1)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from steerlab.errors import EmptyInputError, ShapeError
from steerlab.hooks import check_site
from steerlab.interop._common import InteropError, as_model, specs_for
from steerlab.interop.transformer_lens_bridge import TL_NAMES, TLHook, TLHookList, tl_site
from steerlab.steering.direction import Direction
from steerlab.steering.ops import Ablate, AddVector, Clamp


class _Shape:
    """What the steer ops read from a model, for a TL model steerlab has not loaded."""

    def __init__(self, d_model: int, n_layers: int) -> None:
        self.d_model, self.n_layers, self.name, self.n_heads = d_model, n_layers, "the TransformerLens model", None

    def layer_indices(self, layers: Sequence[int] | int | None = None) -> list[int]:
        from steerlab.arch import normalize_layer

        items = list(range(self.n_layers)) if layers is None else [layers] if isinstance(layers, int) else list(layers)
        return sorted({normalize_layer(i, self.n_layers) for i in items})


def direction_to_tl_hooks(
    direction: Direction,
    *,
    op: Literal["add", "ablate", "clamp"] = "add",
    coeff: float = 1.0,
    layers: Sequence[int] | None = None,
    source_layer: int | None = None,
    value: float = 0.0,
    per_layer: bool = False,
    n_layers: int | None = None,
    model: Any = None,
) -> TLHookList:
    """A Direction as TransformerLens ``fwd_hooks``: ``op="add"`` (AddVector), ``"ablate"`` (Ablate on
    every layer's resid_pre, attn_out and mlp_out) or ``"clamp"`` (Clamp to ``value``).

    The hook names are TL's canonical ones (they work on a ``TransformerBridge`` and on a
    ``HookedTransformer``). ``"ablate"`` needs the depth: ``n_layers=`` or ``model=`` (a bridge or
    steerlab Model). Each fn carries ``.direction``, so :func:`direction_from_tl` reads it back.

    Example:
        >>> from steerlab.interop import to_bridge
        >>> from steerlab.testing import tiny_model, tiny_direction
        >>> model = tiny_model("llama")
        >>> bridge, tokens = to_bridge(model, copy=True), model.encode(["Say hello."]).input_ids
        >>> hooks = direction_to_tl_hooks(tiny_direction(model), op="add", coeff=4.0, layers=[1], model=bridge)
        >>> [name for name, fn in hooks]
        ['blocks.1.hook_resid_pre']
        >>> with bridge.hooks(fwd_hooks=hooks):
        ...     ids = bridge.generate(tokens, max_new_tokens=4, use_past_kv_cache=False, verbose=False)
    """
    if model is not None:
        target = as_model(model)
    else:
        depth = n_layers if n_layers is not None else direction.model_n_layers  # the depth it was fitted at
        named = [*direction.layers, *(layers or []), *([source_layer] if source_layer is not None else [])]
        if depth is None and (op == "ablate" or any(la < 0 for la in named)):
            raise EmptyInputError(
                "the model's depth is needed (op='ablate' edits every layer; negative layers count from the end): "
                "pass n_layers=... or model=bridge"
            )
        depth = depth if depth is not None else max(named) + 1
        target = _Shape(direction.width, depth)
    if op == "add":
        iv: Any = AddVector(direction, coeff=coeff, layers=layers, source_layer=source_layer)
    elif op == "ablate":
        if layers is not None:
            raise InteropError("op='ablate' edits every layer; pick the vector with source_layer=... (not layers=)")
        iv = Ablate(direction, source_layer=source_layer, per_layer=per_layer)
    elif op == "clamp":
        iv = Clamp(direction, value=value, layers=list(layers) if layers is not None else list(direction.layers),
                   source_layer=source_layer)  # fmt: skip
    else:
        raise InteropError(f"op must be 'add', 'ablate' or 'clamp', got {op!r}")
    specs = specs_for(target, [iv], where="steerlab.interop.apply_tl")  # type: ignore[arg-type]
    return [
        (
            TL_NAMES[s.site].format(layer=s.layer),
            TLHook(s, n_heads=getattr(target, "n_heads", None), direction=direction),
        )
        for s in specs
    ]


def direction_from_tl(
    source: Any,
    negative: Any = None,
    *,
    site: str = "resid_pre",
    layers: Sequence[int] | None = None,
    position: int = -1,
    method: str | None = None,
    model_name: str = "",
) -> Direction:
    """A Direction from TransformerLens-side data.

    ``source`` is one of: per-layer vectors (``{layer: [d]}`` or a ``[n_layers, d]`` tensor with
    ``layers=``); a TL activation cache or ``{hook_name: tensor}`` dict (the ``site`` hooks are
    read; ``[b, s, d]`` at ``position`` then averaged over the batch, ``[b, d]`` averaged, ``[d]`` as
    is); or hooks from :func:`direction_to_tl_hooks` (their direction comes back). With
    ``negative`` (same kind) the result is the mean difference ``source - negative``.

    Example:
        >>> from steerlab.interop import to_bridge
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> bridge = to_bridge(model, copy=True)
        >>> harmful_tokens, harmless_tokens = model.encode(["Make a weapon."]).input_ids, model.encode(["Hi"]).input_ids
        >>> _, pos = bridge.run_with_cache(harmful_tokens)
        >>> _, neg = bridge.run_with_cache(harmless_tokens)
        >>> direction = direction_from_tl(pos, neg, site="resid_pre")
        >>> direction.layers, direction.method
        ((0, 1, 2), 'mean_diff')
    """
    check_site(site)
    if _is_hook_list(source):
        if negative is not None:
            raise InteropError("hooks carry one direction; pass negative= only with vectors or caches")
        return _from_hooks(source)
    pos = _per_layer(source, site=site, layers=layers, position=position)
    if negative is not None:
        neg = _per_layer(negative, site=site, layers=layers, position=position)
        if sorted(neg) != sorted(pos):
            raise ShapeError(
                f"source covers layers {sorted(pos)} but negative covers {sorted(neg)}; pass matching data"
            )
        pos = {la: pos[la] - neg[la] for la in pos}
    order = sorted(pos)
    vectors = torch.stack([pos[la] for la in order])
    kind = method or ("mean_diff" if negative is not None else "transformer_lens")
    return Direction(vectors=vectors, layers=tuple(order), site=site, position=position, method=kind, model=model_name)


def _is_hook_list(source: Any) -> bool:
    return (
        isinstance(source, (list, tuple))
        and bool(source)
        and all(isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], TLHook) for item in source)
    )


def _from_hooks(hooks: Sequence[tuple[str, TLHook]]) -> Direction:
    found = {id(fn.direction): fn.direction for _, fn in hooks if fn.direction is not None}
    if len(found) != 1:
        raise InteropError(
            f"these hooks carry {len(found)} directions; pass the hooks made by one direction_to_tl_hooks(...) call"
        )
    return next(iter(found.values()))


def _per_layer(source: Any, *, site: str, layers: Sequence[int] | None, position: int) -> dict[int, torch.Tensor]:
    """{layer: [d] float32 vector} from vectors, a tensor, a cache or a {hook_name: tensor} dict."""
    if isinstance(source, torch.Tensor):
        if source.dim() != 2:
            raise ShapeError(f"a tensor of per-layer vectors must be [n_layers, d], got {tuple(source.shape)}")
        if layers is None or len(layers) != source.shape[0]:
            raise ShapeError(f"pass layers=[...] with one layer per row of the [{source.shape[0]}, d] tensor")
        return {int(la): source[i].detach().float().cpu() for i, la in enumerate(layers)}
    if not hasattr(source, "keys"):
        raise InteropError(
            f"cannot read a direction from a {type(source).__name__}; pass {{layer: vector}}, a [n_layers, d] "
            "tensor, a TL ActivationCache / {hook_name: tensor} dict, or hooks from direction_to_tl_hooks"
        )
    wanted = set(layers) if layers is not None else None
    out: dict[int, torch.Tensor] = {}
    for key in list(source.keys()):
        if isinstance(key, int):
            la = key
        else:
            try:
                key_site, la = tl_site(str(key))
            except InteropError:
                continue
            if key_site != site:
                continue
        if wanted is None or la in wanted:
            out[la] = _reduce(source[key], position)
    if not out:
        raise EmptyInputError(
            f"no {site} activations found (looked for {TL_NAMES[site].format(layer='<l>')}); cache that hook, "
            "or pass site= to match what was cached"
        )
    return out


def _reduce(value: torch.Tensor, position: int) -> torch.Tensor:
    x = torch.as_tensor(value).detach().float().cpu()
    if x.dim() == 3:  # [b, s, d]
        x = x[:, position]
    if x.dim() == 2:  # [b, d]
        x = x.mean(0)
    if x.dim() != 1:
        raise ShapeError(f"expected [b, s, d], [b, d] or [d] activations, got {tuple(value.shape)}")
    return x
