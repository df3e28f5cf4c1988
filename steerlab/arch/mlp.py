"""Where a layer's MLP writes the residual stream: a dense down projection, or fused experts (whose tensor layout
:data:`FUSED_EXPERTS` describes) plus a shared expert's down projection.

Example:
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> mlp_down(model.spec, model.hf, 0).dense
    'model.layers.0.mlp.down_proj'
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from steerlab.arch.paths import normalize_layer, resolve_path
from steerlab.arch.spec import ArchSpec
from steerlab.errors import UnknownArchitectureError


@dataclass(frozen=True)
class FusedExperts:
    """Tensor names and axes of one fused-expert layout (parameters of the experts module)."""

    down: str
    down_bias: str | None
    down_residual_axis: int  # the residual-width axis of the [E, ., .] down weight
    gate_up: str
    gate_up_bias: str | None
    interleaved: bool  # False: gate_up [E, 2I, d], gate rows then up rows; True: [E, d, 2I], (gate, up) column pairs

    @property
    def down_neuron_axis(self) -> int:
        """The neuron axis of one expert's down slice (the weight with the expert axis removed)."""
        return 2 - self.down_residual_axis


# Per MoESpec.expert_layout: gate_up_rows = gate_up_proj [E, 2I, d], down_proj [E, d, I];
# gate_up_interleaved_cols (gpt-oss) = gate_up_proj [E, d, 2I] + bias [E, 2I], down_proj [E, I, d] + bias [E, d].
FUSED_EXPERTS: dict[str, FusedExperts] = {
    "gate_up_rows": FusedExperts("down_proj", None, 1, "gate_up_proj", None, False),
    "gate_up_interleaved_cols": FusedExperts("down_proj", "down_proj_bias", 2, "gate_up_proj", "gate_up_proj_bias", True),
}


@dataclass(frozen=True)
class MlpDown:
    """Where one layer's MLP writes the residual stream: a dense down projection, or the fused experts
    (with their layout) plus the shared expert's down projection where the model has one. Paths are from
    the model root."""

    layer: int
    dense: str | None = None
    experts: str | None = None
    layout: FusedExperts | None = None
    shared: str | None = None


def dense_down_name(spec: ArchSpec) -> str:
    """The down projection's name inside a dense MLP (a shared expert is the family's dense MLP class)."""
    if spec.down_proj and spec.down_proj.startswith(spec.mlp + "."):
        return spec.down_proj[len(spec.mlp) + 1 :]
    return "down_proj"


def mlp_down(spec: ArchSpec, model: nn.Module, layer: int) -> MlpDown:
    """The down side of layer ``layer``'s MLP: dense, or routed experts (+ shared expert).

    Example:
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("mixtral")
        >>> mlp_down(model.spec, model.hf, 0).dense is None   # fused experts, no dense down projection
        True
    """
    idx = normalize_layer(layer, spec.count(model))
    prefix = f"{spec.layers}.{idx}"
    if spec.moe_block(model, idx) is None:
        if spec.down_proj is None:
            raise UnknownArchitectureError(
                f"layer {idx} of this {spec.model_type} model has no MoE block and the registry names no dense "
                "down_proj; fix the spec with steerlab.arch.register(..., overwrite=True)"
            )
        return MlpDown(idx, dense=f"{prefix}.{spec.down_proj}")
    moe = spec.moe
    shared = None
    if moe.shared_experts is not None:
        path = f"{prefix}.{moe.block}.{moe.shared_experts}.{dense_down_name(spec)}"
        shared = path if resolve_path(model, path, missing_ok=True) is not None else None
    return MlpDown(idx, experts=f"{prefix}.{moe.block}.{moe.experts}", layout=FUSED_EXPERTS[moe.expert_layout], shared=shared)
