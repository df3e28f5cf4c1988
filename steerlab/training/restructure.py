"""Giving a model the parameters an exact edit needs, in a form transformers loads on its own.

Some edits need a bias the family does not have (a constant on ``o_proj`` or on the MLP's
``down_proj``), or need the embedding untied from the unembedding. A bias added by hand would be
dropped when the export is loaded, so the model is rebuilt from a config that creates it:
either a flag of the family's own config (``attention_bias``, ``mlp_bias``) or, where the family has
none, a compatible architecture that has it (Qwen2 is Llama with q/k/v biases, so it loads as
``LlamaForCausalLM`` with ``attention_bias=True``). Every parameter the flag creates starts at zero,
so the rebuilt model computes exactly what the old one did. Each family's routes are declared in the
architecture registry (:attr:`steerlab.arch.ArchSpec.bias_routes`).

Example:
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("qwen2")
    >>> route = bias_route(model, "o_proj", what="HeadAblation(mode='mean')")
    >>> route.flags, route.model_type
    ((('attention_bias', True),), 'llama')
    >>> hf = rebuild(model.hf, flags=dict(route.flags), model_type=route.model_type)
    >>> type(hf).__name__, int(hf.model.layers[0].self_attn.o_proj.bias.count_nonzero())  # the new bias is zero
    ('LlamaForCausalLM', 0)
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from steerlab import compat
from steerlab.arch import BiasRole, BiasRoute, families_with_bias_route
from steerlab.errors import NotBakeableError

if TYPE_CHECKING:
    from steerlab.model import Model


def bias_route(model: Model, role: BiasRole, *, what: str) -> BiasRoute:
    """The route that gives ``model`` a loadable ``role`` bias (:meth:`ArchSpec.bias_route`), or
    :class:`NotBakeableError` naming why not."""
    family = model.spec.model_type
    route = model.spec.bias_route(role)
    if route is None:
        raise NotBakeableError(
            f"{what} needs a bias on {role} to be baked, and transformers has no {family} model with one (no config "
            f"flag creates it, and its spec in steerlab.arch names no compatible architecture in bias_routes). "
            f"Families that can carry it: {', '.join(families_with_bias_route(role))}. Apply it at runtime instead: "
            "`with model.apply(iv): ...`"
        )
    reason = route.check(model.config) if route.check is not None else None
    if reason is not None:
        raise NotBakeableError(
            f"{what} needs a bias on {role}; {family} has none, and it cannot be exported as {route.model_type} "
            f"because {reason}. Apply it at runtime instead: `with model.apply(iv): ...`"
        )
    return route


def merge_routes(routes: Iterable[BiasRoute]) -> tuple[dict[str, Any], str | None]:
    """(flags, model_type) that satisfy every route; routes asking for different architectures conflict."""
    flags: dict[str, Any] = {}
    types = set()
    for r in routes:
        flags.update(r.flags)
        types.add(r.model_type)
    if len(types) > 1:
        raise NotBakeableError(f"the needed biases ask for different architectures ({sorted(map(str, types))})")
    return flags, next(iter(types), None)


def is_tied(hf: nn.Module) -> bool:
    """Whether the output embedding is the input embedding (one tensor)."""
    out = hf.get_output_embeddings()
    return out is not None and out.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()


def _config_for(config, model_type: str | None, flags: Mapping[str, Any]):
    """A config of ``model_type`` (default: the same) carrying everything the source config sets that it knows."""
    from transformers import AutoConfig

    if model_type is None or model_type == config.model_type:
        new = copy.deepcopy(config)
        for key, value in flags.items():
            setattr(new, key, value)
        if hasattr(new, "quantization_config"):
            del new.quantization_config
        return new
    cls = type(AutoConfig.for_model(model_type))
    known = cls().to_dict()
    skip = {"model_type", "architectures", "transformers_version", "quantization_config"}
    kwargs = {k: v for k, v in config.to_dict().items() if k in known and k not in skip}
    return cls(**{**kwargs, **flags})


def rebuild(hf: nn.Module, *, flags: Mapping[str, Any], model_type: str | None = None) -> nn.Module:
    """A new HF model built from ``hf``'s config with ``flags`` set (optionally as ``model_type``), holding ``hf``'s
    weights; every parameter the new config adds is zero, and a parameter it would lose is an error.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> new = rebuild(tiny_model("llama").hf, flags={"attention_bias": True})
        >>> new.config.attention_bias, new.model.layers[0].self_attn.q_proj.bias.shape
        (True, torch.Size([64]))
    """
    from transformers import AutoModelForCausalLM

    config = _config_for(hf.config, model_type, flags)
    param = next(hf.parameters())
    with compat.no_init_weights():
        new = AutoModelForCausalLM.from_config(
            config, dtype=param.dtype, attn_implementation=getattr(hf.config, "_attn_implementation", None)
        )
    old_state, new_state = hf.state_dict(), new.state_dict()
    lost = [k for k in old_state if k not in new_state]
    if lost:
        raise NotBakeableError(
            f"rebuilding this {hf.config.model_type} model as {config.model_type} would drop {lost[:4]}"
            f"{' ...' if len(lost) > 4 else ''}; the architectures are not compatible"
        )
    full = {k: old_state[k] if k in old_state else torch.zeros_like(v) for k, v in new_state.items()}
    new.load_state_dict(full, strict=True)
    if getattr(hf, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(hf.generation_config)
    return new.to(param.device).eval()
