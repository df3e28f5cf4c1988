"""Where the residual stream is written, as tensors, and how to push a linear map through them.

Every module that adds to the residual stream ends in a tensor whose output axis is the residual
width ``d``: the embedding rows, each ``o_proj`` (weight and bias), each dense ``down_proj``, every
routed expert's down projection inside the fused 3D MoE parameter (in the layout the spec names,
with its bias for gpt-oss), and the shared experts' ``down_proj``. Left-multiplying all of them by
one ``d x d`` matrix ``A`` is the weight form of applying ``A`` to every write (METHODS 1 and 10):
``W_out' = A W_out``; both uses here have ``A = I + u vᵀ``, applied as a rank-one update.

Example:
    >>> import copy, torch
    >>> from steerlab.backends.writers import residual_writers, apply_rank_one
    >>> from steerlab.testing import tiny_model
    >>> base = tiny_model("llama")                       # shared: edit a copy
    >>> model = steerlab.load(copy.deepcopy(base.hf), base.tokenizer)
    >>> r_hat = torch.nn.functional.normalize(torch.randn(model.d_model), dim=0)
    >>> writers = residual_writers(model)
    >>> apply_rank_one(model.hf, writers, -r_hat, r_hat)     # orthogonalise every write to r_hat
    >>> o_proj = model.hf.model.layers[0].self_attn.o_proj.weight.detach().double()
    >>> bool((r_hat.double() @ o_proj).abs().max() < 1e-5)
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from steerlab.arch import ArchSpec, mlp_down, resolve_path
from steerlab.errors import NotBakeableError

if TYPE_CHECKING:
    from steerlab.model import Model


@dataclass(frozen=True)
class Writer:
    """One tensor whose values land in the residual stream; ``axis`` indexes the residual width."""

    path: str  # parameter (or buffer) path from the model root
    axis: int
    role: str  # "embed", "o_proj", "down_proj", "experts", "shared_experts"
    layer: int | None = None


def check_plain_writes(spec: ArchSpec, *, what: str) -> None:
    """Raise :class:`NotBakeableError` where attention or MLP outputs pass through another module (a post-norm)
    before the residual add, so no edit of the projections can reproduce a map applied to the writes."""
    if spec.attn_out != spec.attn or spec.mlp_out != spec.mlp:
        raise NotBakeableError(
            f"{what} cannot be baked into {spec.model_type} weights: this family adds the outputs of "
            f"{spec.attn_out!r} and {spec.mlp_out!r} (post-norms) to the residual stream, and a norm undoes any "
            "linear edit of the projections before it. Apply it at runtime instead: `with model.apply(iv): ...`"
        )


def _linear(root: nn.Module, path: str, role: str, layer: int | None) -> list[Writer]:
    module = resolve_path(root, path)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise NotBakeableError(
            f"{path} is a {type(module).__name__} without a 2D weight; merge adapters / dequantise the model first"
        )
    out = [Writer(f"{path}.weight", 0, role, layer)]
    if getattr(module, "bias", None) is not None:
        out.append(Writer(f"{path}.bias", 0, role, layer))
    return out


def mlp_writers(model: Model, layer: int) -> list[Writer]:
    """The tensors through which layer ``layer``'s MLP (dense or MoE) writes the residual stream."""
    down = mlp_down(model.spec, model.hf, layer)
    if down.dense is not None:
        return _linear(model.hf, down.dense, "down_proj", down.layer)
    layout = down.layout
    out = [Writer(f"{down.experts}.{layout.down}", layout.down_residual_axis, "experts", down.layer)]
    if layout.down_bias is not None and getattr(resolve_path(model.hf, down.experts), layout.down_bias, None) is not None:
        out.append(Writer(f"{down.experts}.{layout.down_bias}", layout.down_residual_axis - 1, "experts", down.layer))
    if down.shared is not None:
        out += [Writer(w.path, w.axis, "shared_experts", down.layer) for w in _linear(model.hf, down.shared, "shared_experts", down.layer)]
    return out


def residual_writers(model: Model) -> list[Writer]:
    """Every tensor whose output is added to the residual stream: embedding, each o_proj, each MLP's down side."""
    spec = model.spec
    out = [Writer(f"{spec.embed}.weight", 1, "embed")]
    for layer in range(model.n_layers):
        out += _linear(model.hf, f"{spec.layers}.{layer}.{spec.o_proj}", "o_proj", layer)
        out += mlp_writers(model, layer)
    return out


def tensor_at(root: nn.Module, path: str) -> torch.Tensor:
    """The parameter or buffer at a dotted path."""
    owner, _, name = path.rpartition(".")
    return getattr(resolve_path(root, owner) if owner else root, name)


def apply_rank_one(root: nn.Module, writers: list[Writer], left: torch.Tensor, right: torch.Tensor) -> None:
    """``t <- (I + left rightᵀ) t`` along each writer's residual axis: ``t + left (rightᵀ t)`` (float64 arithmetic,
    stored in the tensor's dtype). Ablation is ``(-r̂, r̂)``, the redirect ``M = I + (b - a) aᵀ`` is ``(b - a, a)``.

    Tensors shared between writers (tied weights) are edited once.
    """
    seen: set[int] = set()
    with torch.no_grad():
        for w in writers:
            t = tensor_at(root, w.path)
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            moved = torch.movedim(t.detach().to(torch.float64), w.axis, -1)
            u, v = left.to(moved.device, torch.float64), right.to(moved.device, torch.float64)
            new = moved + (moved @ v)[..., None] * u
            t.copy_(torch.movedim(new, -1, w.axis).to(t.dtype))
