"""A registration hint for a model whose ``model_type`` is not in the registry: an ``ArchSpec(...)`` guessed
from the module names actually found on the model, for :class:`~steerlab.errors.UnknownArchitectureError`.

The guesses are names, not knowledge: the message asks the user to check them before registering.

Example:
    >>> from steerlab.testing import tiny_model
    >>> hint = registration_hint(tiny_model("llama").hf)
    >>> "model.layers.0" in hint and "ArchSpec(" in hint
    True
"""

from __future__ import annotations

import torch
from torch import nn

_O_PROJ = ("o_proj", "out_proj", "c_proj", "dense", "wo", "o")
_DOWN = ("down_proj", "c_proj", "fc2", "w2", "dense_4h_to_h", "wo", "fc_out", "output_linear")
_ATTN = ("attn", "attention")
_MLP = ("mlp", "feed_forward", "ffn", "moe")
_ROUTER = ("router", "gate")


def _name_of(root: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((name for name, mod in root.named_modules() if mod is target), None)


def _layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The decoder-layer list: the ModuleList of one repeated class with ``num_hidden_layers`` items (else the longest)."""
    want = getattr(model.config, "num_hidden_layers", None)
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1
    ]
    exact = [f for f in found if len(f[1]) == want]
    return (exact or sorted(found, key=lambda f: -len(f[1])) or [None])[0]


def _child(module: nn.Module, words: tuple[str, ...], *, exact: bool = False, skip: str | None = None) -> str | None:
    """First child (not a norm, not ``skip``) whose name matches one of ``words`` (exactly, or as a part);
    failing that, unless ``exact``, the first whose class name contains one."""
    children = [(n, c) for n, c in module.named_children() if n != skip and not _is_norm(n, c)]
    for name, _ in children:
        if (name.lower() in words) if exact else any(w in name.lower() for w in words):
            return name
    if not exact:
        for name, child in children:
            if any(w in type(child).__name__.lower() for w in words):
                return name
    return None


def _is_norm(name: str, module: nn.Module) -> bool:
    return "norm" in name.lower() or "norm" in type(module).__name__.lower()


def _describe(layer: nn.Module) -> str:
    parts = []
    for name, child in layer.named_children():
        inner = [n for n, _ in child.named_children()]
        shown = f": {', '.join(inner[:8])}{', ...' if len(inner) > 8 else ''}" if inner else ""
        parts.append(f"{name} ({type(child).__name__}{shown})")
    return ", ".join(parts)


def _moe(layers: nn.ModuleList, mlp: str | None) -> tuple[int, str, str, str, bool] | None:
    """(layer, block, router, experts, whether the router has a ``bias`` tensor) of the first layer whose MLP block
    has experts, or ``None``."""
    for idx, layer in enumerate(layers):
        block = getattr(layer, mlp, None) if mlp else None
        if block is None:
            continue
        experts = _child(block, ("experts",), exact=True) or _child(block, ("expert",))
        router = _child(block, _ROUTER, exact=True)
        if experts is not None:
            biased = router is not None and isinstance(getattr(getattr(block, router), "bias", None), torch.Tensor)
            return idx, mlp, router or "?", experts, biased
    return None


def registration_hint(model: nn.Module) -> str:
    """What the model's decoder layers hold and an ``ArchSpec(...)`` to register, guessed from module names."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    found = _layers(model)
    if found is None:
        return (
            "steerlab found no list of decoder layers (nn.ModuleList) on it; describe where its modules live: "
            f"steerlab.arch.register(steerlab.arch.ArchSpec(model_type={model_type!r}, layers='model.layers', ...))"
        )
    path, layers = found
    first = layers[0]
    attn = _child(first, _ATTN)
    mlp = _child(first, _MLP, skip=attn)
    attn_mod = getattr(first, attn) if attn else None
    o_proj = _child(attn_mod, _O_PROJ, exact=True) if attn_mod is not None else None
    down = _child(getattr(first, mlp), _DOWN, exact=True) if mlp else None
    norms = tuple(n for n, m in first.named_children() if _is_norm(n, m))
    post_ffn = next((n for n in norms if "post" in n and any(w in n for w in ("feedforward", "mlp", "ffn"))), None)
    post_attn = next((n for n in norms if "post" in n and "att" in n), None)
    base = path.rsplit(".", 1)[0] if "." in path else ""
    parent = model.get_submodule(base) if base else model
    final = next((n for n, m in parent.named_children() if _is_norm(n, m)), None)
    moe = _moe(layers, mlp)
    fields = {
        "model_type": model_type,
        "layers": path,
        "embed": _name_of(model, model.get_input_embeddings()) or "?",
        "final_norm": f"{base}.{final}" if base and final else final or "?",
        "unembed": _name_of(model, model.get_output_embeddings()) or "?",
        "attn": attn or "?",
        "o_proj": f"{attn}.{o_proj}" if attn and o_proj else "?",
        "mlp": mlp or "?",
        "down_proj": f"{mlp}.{down}" if mlp and down else None if moe else "?",
        "attn_out": post_attn if post_ffn and post_attn else attn or "?",
        "mlp_out": post_ffn or mlp or "?",
        "norms": norms,
        "n_heads": "num_attention_heads" if getattr(model.config, "num_attention_heads", None) else "?",
        "n_kv_heads": "num_key_value_heads" if getattr(model.config, "num_key_value_heads", None) else None,
    }
    spec = ", ".join(f"{k}={v!r}" for k, v in fields.items())
    lines = [f"Its first decoder layer ({path}.0, {type(first).__name__}) has: {_describe(first)}."]
    if post_ffn:
        lines.append(
            f"{post_attn} and {post_ffn} look like post-norms whose outputs the residual stream receives "
            "(Gemma/OLMo-2 style), so attn_out and mlp_out name them."
        )
    if moe:
        idx, block, router, experts, biased = moe
        bias = ", router_bias='bias'" if biased else ""
        spec += f", moe=steerlab.arch.MoESpec(block={block!r}, router={router!r}, experts={experts!r}{bias})"
        params = ", ".join(
            f"{n} {tuple(p.shape)}" for n, p in getattr(getattr(layers[idx], block), experts).named_parameters()
        )
        lines.append(
            f"It looks like MoE: layer {idx}'s {block} has {experts} ({params or 'no parameters of its own'}) and "
            f"router {router!r}; check MoESpec's routing, expert_layout and router_bias (the router's per-expert "
            "bias tensor, if it has one) against them."
        )
    else:
        lines.append("It looks dense (no experts in its MLP blocks).")
    lines.append(
        "Optional: bias_routes=(steerlab.arch.BiasRoute(...),) tells bake how the family gets a loadable o_proj / "
        "down_proj bias, and gguf=steerlab.arch.GGUFArch(...) how it is written as GGUF; without them both are refused."
    )
    lines.append(
        "'?' marks what steerlab could not find. Check these guesses against print(model) and register before "
        f"loading:\n    steerlab.arch.register(steerlab.arch.ArchSpec({spec}))"
    )
    return " ".join(lines[:-1]) + " " + lines[-1]
