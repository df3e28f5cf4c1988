"""TransformerLens interop: steerlab interventions and directions on a ``TransformerBridge``'s hook points.

* :func:`to_bridge` — wrap a steerlab Model (or HF model) in a ``TransformerBridge``, offline.
* :func:`tl_hook_name` / :func:`tl_site` — steerlab site names <-> TL hook names
  (``resid_pre`` <-> ``blocks.{l}.hook_resid_pre``, ``head`` <-> ``blocks.{l}.attn.hook_z``, ...).
* :func:`tl_hooks` / :func:`apply_tl` — any intervention whose plan acts on dense named sites (AddVector, Ablate,
  Clamp, HeadAblation, RankOneRedirect) as ``fwd_hooks`` for ``bridge.hooks(...)`` / ``run_with_hooks``, or applied in a scope.
* Directions to TL hook functions and back: :mod:`steerlab.interop.tl_directions`.

A bridge runs the HF model's own modules (it swaps wrappers into the HF module tree), so the same
intervention gives the same logits through TL hook points as through steerlab's hooks.

Example:
    >>> from steerlab.interop import to_bridge, apply_tl
    >>> from steerlab.testing import tiny_model, tiny_direction
    >>> model = tiny_model("llama")
    >>> direction, tokens = tiny_direction(model), model.encode(["Say hello."]).input_ids
    >>> bridge = to_bridge(model, copy=True)
    >>> with apply_tl(bridge, steerlab.AddVector(direction, coeff=4.0)):
    ...     logits = bridge(tokens)
    >>> with model.apply(steerlab.AddVector(direction, coeff=4.0)):  # the same logits as steerlab's own hooks
    ...     torch.allclose(logits, model.hf(tokens).logits, atol=1e-5)
    True
"""

from __future__ import annotations

import copy as copy_module
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from steerlab import compat
from steerlab.arch import resolve_path
from steerlab.errors import InterventionNotFiredError, LayerIndexError, ShapeError
from steerlab.hooks import UNCHANGED, HookContext, check_site
from steerlab.interop._common import (
    Firing,
    InteropError,
    Spec,
    as_model,
    hf_and_tokenizer,
    module_scope,
    require,
    specs_for,
    split_plan,
)
from steerlab.model import Model
from steerlab.steering.direction import Direction
from steerlab.step import StepInfo

TL_NAMES: dict[str, str] = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "head": "blocks.{layer}.attn.hook_z",
}
# Bridge-native names of the same points (a TL alias and the component hook it resolves to).
_NATIVE = {"hook_in": "resid_pre", "hook_out": "resid_post", "attn.hook_out": "attn_out", "mlp.hook_out": "mlp_out"}
_NAME_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
TLHookList = list[tuple[str, "TLHook"]]


# ----- names -----
def tl_hook_name(site: str, layer: int, *, bridge: Any = None) -> str:
    """The TL hook name of a steerlab site at a (non-negative) layer.

    Without ``bridge`` this is TransformerLens's canonical name. With one, it is the hook point on the
    exact module steerlab hooks (they differ only where a family's residual add is not the plain
    module output, e.g. Granite's scaled attention).

    Example:
        >>> tl_hook_name("resid_pre", 3)
        'blocks.3.hook_resid_pre'
    """
    check_site(site)
    if site not in TL_NAMES:
        raise InteropError(f"site {site!r} has no TransformerLens hook point; TL sites: {', '.join(TL_NAMES)}")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise LayerIndexError(f"layer must be a non-negative int for a TL hook name, got {layer!r}")
    canonical = TL_NAMES[site].format(layer=layer)
    if bridge is None:
        return canonical
    point = _hook_point(bridge, as_model(bridge), site, layer)
    return canonical if bridge.hook_dict.get(canonical) is point else point.name


def tl_site(name: str) -> tuple[str, int]:
    """``(site, layer)`` of a TL hook name (canonical or bridge-native).

    Example:
        >>> tl_site("blocks.7.hook_resid_post")
        ('resid_post', 7)
    """
    match = _NAME_RE.match(name)
    rest = match.group(2) if match else ""
    site = next((s for s, pat in TL_NAMES.items() if pat.split("}.", 1)[1] == rest), _NATIVE.get(rest))
    if match is None or site is None:
        raise InteropError(
            f"{name!r} is not a residual-stream or head hook name; expected blocks.<layer>.<hook> with hook one of "
            f"{', '.join(p.split('}.', 1)[1] for p in TL_NAMES.values())}"
        )
    return site, int(match.group(1))


def _hook_point(bridge: Any, model: Model, site: str, layer: int) -> Any:
    """The bridge HookPoint on the module steerlab hooks for ``site`` at ``layer``."""
    spec = model.spec
    layer_mod = spec.decoder_layers(bridge.original_model)[layer]
    paths = {"attn_out": spec.attn_out, "mlp_out": spec.mlp_out, "head": spec.o_proj}
    component = layer_mod if site in ("resid_pre", "resid_post") else resolve_path(layer_mod, paths[site], unwrap=False)
    attr = "hook_in" if site in ("resid_pre", "head") else "hook_out"
    point = getattr(component, attr, None)
    if point is None or not getattr(point, "name", None):
        raise InteropError(
            f"the bridge has no hook point on {type(component).__name__} for site {site!r} at layer {layer}; "
            "apply the intervention through steerlab instead: `with steerlab.load(bridge).apply(iv): ...`"
        )
    return point


# ----- building a bridge -----
def to_bridge(model: Model | nn.Module, tokenizer: Any = None, *, copy: bool = False, device: str | None = None) -> Any:
    """A TransformerLens ``TransformerBridge`` around an already-loaded model (no download).

    The bridge swaps its wrappers into the HF module tree and switches attention to eager (so
    attention patterns can be hooked); ``copy=True`` bridges a deep copy and leaves ``model`` as it
    was. steerlab hooks keep working on a bridged model: ``steerlab.load(bridge)``.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> bridge = to_bridge(model, copy=True)
        >>> logits, cache = bridge.run_with_cache(model.encode(["Hi"]).input_ids)
        >>> cache["blocks.1.hook_resid_pre"].shape[-1] == model.d_model
        True
    """
    tl = require("transformer_lens.model_bridge", "to_bridge")
    hf, tok = hf_and_tokenizer(model, tokenizer, copy=copy, feature="to_bridge")
    if not getattr(hf.config, "architectures", None):  # configs built in code lack it; TL keys adapters on it
        hf.config.architectures = [type(hf).__name__]
    name = getattr(hf.config, "_name_or_path", "") or type(hf).__name__
    dev = device or str(next(hf.parameters()).device)
    # TL normalises the tokenizer in place (BOS, padding side): give it a copy
    return tl.TransformerBridge.boot_transformers(name, hf_model=hf, tokenizer=copy_module.deepcopy(tok), device=dev)


# ----- interventions as TL hooks -----
class TLHook:
    """A steerlab hook function in TransformerLens form, ``fn(activation, hook) -> activation | None``.

    ``count`` is how often it fired; ``direction`` is set when it was made from a Direction.
    """

    def __init__(self, spec: Spec, *, n_heads: int | None = None, direction: Direction | None = None) -> None:
        self.spec = spec
        self.n_heads = n_heads
        self.direction = direction
        self.firing = Firing(name=spec.name, site=spec.site, layer=spec.layer)
        self.ctx = HookContext(site=spec.site, layer=spec.layer, step=StepInfo())

    @property
    def count(self) -> int:
        """How many times this hook fired."""
        return self.firing.count

    def __call__(self, x: torch.Tensor, hook: Any = None) -> torch.Tensor | None:
        self.firing.count += 1
        step = self.ctx.step
        step.calls += 1
        step.batch_size, step.seq_len = int(x.shape[0]), int(x.shape[1])
        flat = self.spec.site == "head" and x.dim() == 3  # a TL without the [.., H, dh] view of hook_z
        view = x.view(*x.shape[:-1], self.n_heads, -1) if flat else x
        out = self.spec.fn(view, self.ctx)
        if out is UNCHANGED:
            self.firing.count -= 1
            return None
        if out is None:
            return None
        if out.shape != view.shape:
            raise ShapeError(
                f"{self.spec.name} returned shape {tuple(out.shape)} for an activation of shape {tuple(view.shape)}"
            )
        return out.reshape(x.shape) if flat else out

    def __repr__(self) -> str:
        return f"TLHook({self.spec.name}, count={self.count})"


def tl_hooks(target: Any, *interventions: Any) -> TLHookList:
    """``[(hook_name, fn), ...]`` that apply steerlab interventions through TransformerLens hook points.

    ``target`` is a ``TransformerBridge`` (names resolve to the exact modules steerlab hooks) or a
    steerlab Model (canonical TL names). Use with ``bridge.hooks(fwd_hooks=...)`` or
    ``bridge.run_with_hooks(tokens, fwd_hooks=...)``; each fn has a ``count`` of firings.

    Example:
        >>> from steerlab.testing import tiny_model, tiny_direction
        >>> model = tiny_model("qwen2")
        >>> bridge, tokens = to_bridge(model, copy=True), model.encode(["Hi"]).input_ids
        >>> hooks = tl_hooks(bridge, steerlab.Ablate(tiny_direction(model)))
        >>> logits = bridge.run_with_hooks(tokens, fwd_hooks=hooks)
        >>> len(hooks), all(fn.count == 1 for _, fn in hooks)  # resid_pre, attn_out and mlp_out of 3 layers
        (9, True)
    """
    model = as_model(target)
    specs = specs_for(model, interventions, where="`with apply_tl(bridge, iv):`")
    return _tl_hook_list(model, None if isinstance(target, Model) else target, specs)


def _tl_hook_list(model: Model, bridge: Any, specs: Sequence[Spec]) -> TLHookList:
    out: TLHookList = []
    for spec in specs:
        name = TL_NAMES[spec.site].format(layer=spec.layer)
        if bridge is not None:
            point = _hook_point(bridge, model, spec.site, spec.layer)
            name = name if bridge.hook_dict.get(name) is point else point.name
        out.append((name, TLHook(spec, n_heads=model.n_heads)))
    return out


def _refusing_cached_generate(generate: Any) -> Any:
    """``bridge.generate`` that raises instead of running TransformerLens's KV-cached generation where that
    is wrong (see :func:`steerlab.compat.tl_cached_generate_is_broken`)."""

    def wrapper(*args: Any, use_past_kv_cache: bool = True, **kwargs: Any) -> Any:
        if use_past_kv_cache:
            raise InteropError(
                "TransformerLens's generate with its KV cache gives wrong tokens with this transformers version "
                "(with or without steering); pass use_past_kv_cache=False"
            )
        return generate(*args, use_past_kv_cache=False, **kwargs)

    return wrapper


@contextmanager
def apply_tl(bridge: Any, *interventions: Any, check_fired: bool = True) -> Iterator[TLHookList]:
    """Apply steerlab interventions to a ``TransformerBridge`` for a ``with`` block (via ``bridge.hooks``).

    The hooks are removed when the block ends, also on an exception; with ``check_fired`` a hook
    that never ran raises :class:`~steerlab.errors.InterventionNotFiredError`.

    Example:
        >>> from steerlab.testing import tiny_model, tiny_direction
        >>> model = tiny_model("llama")
        >>> bridge, tokens = to_bridge(model, copy=True), model.encode(["Say hello."]).input_ids
        >>> with apply_tl(bridge, steerlab.AddVector(tiny_direction(model), coeff=4.0)):
        ...     ids = bridge.generate(tokens, max_new_tokens=4, do_sample=False, use_past_kv_cache=False, verbose=False)
        >>> ids.shape[1] - tokens.shape[1]
        4
    """
    model = as_model(bridge)
    specs, rest = split_plan(model, interventions)
    hooks = _tl_hook_list(model, bridge, specs)
    guarded = compat.tl_cached_generate_is_broken()
    if guarded:  # for this scope only: a cached TL generate would be silently wrong
        bridge.generate = _refusing_cached_generate(bridge.generate)
    try:
        with module_scope(model, rest, check_fired=check_fired), bridge.hooks(fwd_hooks=hooks):
            yield hooks
    finally:
        if guarded:
            del bridge.generate
    if check_fired:
        silent = [fn.spec.name for _, fn in hooks if fn.count == 0]
        if silent:
            raise InterventionNotFiredError(
                f"TL hook(s) never fired: {', '.join(silent)}. Run the bridge inside the `with apply_tl(...)` block."
            )
