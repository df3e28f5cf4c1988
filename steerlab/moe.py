"""Where a model's experts are and how its routers choose them: the MoE facts that values, measurements
and backends share (no hooks, no interventions here).

Example:
    >>> import steerlab
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("mixtral")
    >>> moe_layers(model)
    [0, 1, 2]
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from steerlab import compat
from steerlab.arch import FUSED_EXPERTS, normalize_layer, resolve_path
from steerlab.errors import LayerIndexError, SteerlabError, UnknownArchitectureError, UnknownSiteError

if TYPE_CHECKING:
    from steerlab.model import Model

Expert = tuple[int, int]


class ExpertIndexError(SteerlabError, IndexError):
    """An expert index is outside the layer's range of routed experts."""


def moe_layers(model: Model) -> list[int]:
    """Indices of the layers that have an MoE block (empty for a dense model)."""
    return [i for i in range(model.n_layers) if model.spec.moe_block(model.hf, i) is not None]


def router_of(model: Model, layer: int) -> nn.Module:
    """The router module of MoE layer ``layer`` (a dense layer raises, naming the MoE layers)."""
    block = model.spec.moe_block(model.hf, layer)
    if block is None:
        raise LayerIndexError(
            f"layer {layer} of this {model.spec.model_type} model has no MoE block; "
            f"MoE layers: {moe_layers(model) or 'none (dense model)'}"
        )
    return resolve_path(block, model.spec.moe.router)


def n_experts(router: nn.Module) -> int:
    """How many routed experts ``router`` chooses from."""
    n = getattr(router, "num_experts", None)
    return int(n) if n is not None else int(router.weight.shape[0])


def moe_layer_list(model: Model, layers: Sequence[int] | int | None) -> list[int]:
    """The chosen layers (default: every MoE layer), each checked to have an MoE block."""
    if model.spec.moe is None:
        raise UnknownSiteError(f"{model.name} ({model.spec.model_type}) is a dense model: it has no experts")
    if layers is None:
        return moe_layers(model)
    out = model.layer_indices(layers)
    for layer in out:
        router_of(model, layer)  # raises for a dense layer, naming the MoE layers
    return out


def experts_by_layer(model: Model, experts: Sequence[Expert]) -> dict[int, list[int]]:
    """{layer: sorted experts} with negative indices resolved and clear errors for bad pairs."""
    out: dict[int, set[int]] = {}
    for layer, expert in experts:
        la = normalize_layer(layer, model.n_layers)
        n = n_experts(router_of(model, la))
        e = expert + n if expert < 0 else expert
        if not 0 <= e < n:
            raise ExpertIndexError(
                f"expert {expert} (layer {layer}) is out of range: layer {la} has {n} routed experts; "
                f"use 0..{n - 1} (or -{n}..-1)"
            )
        out.setdefault(la, set()).add(e)
    return {la: sorted(es) for la, es in sorted(out.items())}


@functools.cache
def _forward_signature(cls: type) -> inspect.Signature:
    """A module class's ``forward`` signature, read once per class (``routing_inputs`` runs on every forward call)."""
    return inspect.signature(cls.forward)


def routing_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden states, top-k expert indices, top-k weights) passed to a fused experts module, by position."""
    # the class's forward: an instance's may be replaced by a wrapper (nnsight) with another signature
    bound = _forward_signature(type(module)).bind(module, *args, **kwargs)
    values = list(bound.arguments.values())[1:]
    if len(values) < 3 or not all(isinstance(v, torch.Tensor) for v in values[:3]):
        raise UnknownArchitectureError(
            f"{type(module).__name__}.forward does not take (hidden_states, top_k_index, top_k_weights); steerlab "
            "cannot recompute expert neurons for it. Register a spec whose experts follow the fused layout."
        )
    return values[0], values[1], values[2]


def expert_activations(
    model: Model, experts: nn.Module, expert: int, columns: Sequence[int], x: torch.Tensor
) -> torch.Tensor:
    """Neuron activations ``[n, len(columns)]`` of routed ``expert`` for inputs ``x`` ``[n, d]`` — the down
    projection's input — from the fused ``gate_up`` parameter and the experts module's own gate."""
    layout = FUSED_EXPERTS[model.spec.moe.expert_layout]
    cols = torch.as_tensor(list(columns), dtype=torch.long, device=x.device)
    gate_up = getattr(experts, layout.gate_up)[expert]
    if layout.interleaved:  # [d, 2I]: gate column 2j, up column 2j + 1
        sel = torch.stack([2 * cols, 2 * cols + 1], dim=-1).reshape(-1)
        pre = x @ gate_up[:, sel]
        if layout.gate_up_bias is not None and getattr(experts, layout.gate_up_bias, None) is not None:
            pre = pre + getattr(experts, layout.gate_up_bias)[expert][sel]
    else:  # [2I, d]: gate row j, up row I + j
        half = gate_up.shape[0] // 2
        pre = x @ gate_up[torch.cat([cols, half + cols])].T
    gated = compat.expert_gate(experts, pre)
    if gated is not None:
        return gated
    if layout.interleaved or not hasattr(experts, "act_fn"):
        raise UnknownArchitectureError(
            f"{type(experts).__name__} has neither _apply_gate nor act_fn; steerlab cannot recompute its neurons"
        )
    gate, up = pre.chunk(2, dim=-1)
    return experts.act_fn(gate) * up
