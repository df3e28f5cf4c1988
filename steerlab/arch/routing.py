"""Routing rules: how a family's router turns (possibly edited) logits into top-k weights and indices, and what its
top-k ranks experts by. Keyed on :attr:`MoESpec.routing`; the router attributes come from the spec.

Example:
    >>> import torch
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("mixtral")
    >>> router = model.spec.moe_block(model.hf, 0).gate
    >>> logits = torch.randn(5, int(router.weight.shape[0]))
    >>> weights, idx = route(model.spec, router, logits, model.hf.config)
    >>> idx.shape == (5, int(router.top_k)), bool(torch.allclose(weights.sum(-1), torch.ones(5)))
    (True, True)
"""

from __future__ import annotations

import torch
from torch import nn

from steerlab.arch.spec import ArchSpec, MoESpec
from steerlab.errors import UnknownArchitectureError


def _moe(spec: ArchSpec) -> MoESpec:
    if spec.moe is None:
        raise UnknownArchitectureError(f"{spec.model_type} has no MoE block in the registry, so it has no router")
    return spec.moe


def selection_scores(spec: ArchSpec, router: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """What the family's top-k ranks experts by, from (possibly edited) logits, in float32; ``-inf`` stays excluded.

    The logits themselves for the softmax routings (softmax is monotone); sigmoid scores plus the router's
    ``router_bias`` for ``sigmoid_grouped`` (before its group limit, see :meth:`MoESpec.limited_groups`).
    """
    moe = _moe(spec)
    scores = logits.float()
    if moe.routing == "sigmoid_grouped":
        scores = scores.sigmoid() + getattr(router, moe.router_bias).float().to(scores.device)
    return scores.masked_fill(torch.isneginf(logits), float("-inf"))


def route(spec: ArchSpec, router: nn.Module, logits: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute a router's top-k weights and indices from (possibly edited) logits.

    Matches the family's own router exactly on unedited logits (tested), so editing logits
    (``-inf`` = switch an expert off) changes only what the edit implies.
    """
    moe = _moe(spec)
    k = int(router.top_k)
    if moe.routing == "softmax_topk":
        probs = torch.softmax(logits.float(), dim=-1)
        weights, idx = torch.topk(probs, k, dim=-1)
        if spec.renormalizes(config):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights.to(logits.dtype) if moe.cast_weights else weights), idx
    if moe.routing == "topk_softmax":
        top, idx = torch.topk(logits, k, dim=-1)
        return torch.softmax(top.float(), dim=-1).to(logits.dtype), idx
    if moe.routing == "sigmoid_grouped":
        scores = logits.float().sigmoid()
        off = torch.isneginf(logits)  # switched-off experts: score 0, and never chosen below
        choice = scores + getattr(router, moe.router_bias)
        n_group, n_exp = int(getattr(router, moe.groups.count)), int(router.num_experts)
        group_scores = choice.view(-1, n_group, n_exp // n_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=int(getattr(router, moe.groups.kept)), dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, n_exp // n_group).reshape(-1, n_exp)
        choice = choice.masked_fill(~score_mask.bool() | off, float("-inf"))
        idx = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, idx)
        if router.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * router.routed_scaling_factor, idx
    raise UnknownArchitectureError(f"unknown routing kind {moe.routing!r}")
