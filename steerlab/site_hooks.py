"""Torch hooks that hand a named site's activation to a steerlab hook function and put back what it returns.

Each ``*_hook(call, ...)`` wraps ``call(x) -> tensor | None`` (``None`` = leave the activation unchanged) as a
forward or forward-pre hook for the module that carries the site (see :mod:`steerlab.hooks` for the table).
MoE tensors arrive flattened ``[b*s, ...]`` and are shown to ``call`` as ``[b, s, ...]``; edited router logits
are routed again with the family's own rule (:func:`steerlab.arch.route`).
"""

from __future__ import annotations

import torch
from torch import nn

from steerlab import compat
from steerlab.arch import route
from steerlab.errors import UnknownSiteError
from steerlab.step import StepInfo


def _split_output(output):
    """(tensor, rebuild) for a module output that is a tensor or a tuple whose first item is one."""
    if isinstance(output, torch.Tensor):
        return output, lambda t: t
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0], lambda t: (t, *output[1:])
    raise UnknownSiteError(f"cannot hook a module whose output is {type(output).__name__}")


def pre_hook(call):
    def hook(module, args, kwargs):
        if args:
            out = call(args[0])
            return None if out is None else ((out, *args[1:]), kwargs)
        out = call(kwargs["hidden_states"])
        return None if out is None else (args, {**kwargs, "hidden_states": out})

    return hook


def post_hook(call):
    def hook(module, args, output):
        tensor, rebuild = _split_output(output)
        out = call(tensor)
        return None if out is None else rebuild(out)

    return hook


def head_hook(call, n_heads: int):
    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["input"]
        heads = x.view(*x.shape[:-1], n_heads, x.shape[-1] // n_heads)
        out = call(heads)
        if out is None:
            return None
        flat = out.reshape(x.shape)
        return ((flat, *args[1:]), kwargs) if args else (args, {**kwargs, "input": flat})

    return hook


def _as_tokens(flat: torch.Tensor, step: StepInfo) -> torch.Tensor:
    """View a flattened [b*s, ...] MoE tensor as [b, s, ...] using the current step's shape."""
    if flat.dim() == 3:
        return flat
    b = step.batch_size or 1
    return flat.view(b, flat.shape[0] // b, *flat.shape[1:])


def tokens_hook(call, step: StepInfo):
    def hook(module, args, output):
        tensor, rebuild = _split_output(output)
        out = call(_as_tokens(tensor, step))
        return None if out is None else rebuild(out.reshape(tensor.shape))

    return hook


def router_hook(call, step: StepInfo, spec, router: nn.Module, config):
    def hook(module, args, output):
        logits, old_weights, _, rebuild = compat.router_output(output)
        out = call(_as_tokens(logits, step))
        if out is None:
            return None
        new_logits = out.reshape(logits.shape)
        weights, idx = route(spec, router, new_logits, config)
        return rebuild(new_logits, weights.to(old_weights.dtype), idx)

    return hook
