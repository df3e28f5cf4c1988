"""Declarative architecture registry: ``model_type`` -> :class:`ArchSpec`.

Every piece of per-family knowledge steerlab needs lives in the table at the bottom of this
file: where the decoder layers are, which module's output is added to the residual stream, where
the router and the fused experts of an MoE block live and how the router turns logits into
top-k weights. Nothing else in steerlab branches on a model family.

Example:
    >>> from steerlab.arch import get_spec
    >>> spec = get_spec("qwen2")
    >>> spec.o_proj
    'self_attn.o_proj'

Register a family the table does not know:
    >>> from steerlab.arch import ArchSpec, register
    >>> _ = register(ArchSpec(model_type="my_llama_clone"), overwrite=True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from steerlab.errors import LayerIndexError, UnknownArchitectureError

Routing = Literal["softmax_topk", "topk_softmax", "sigmoid_grouped"]
ExpertLayout = Literal["gate_up_rows", "gate_up_interleaved_cols"]


@dataclass(frozen=True)
class MoESpec:
    """Where an MoE block keeps its router and experts, and how it routes.

    Paths are relative to the decoder layer (``block``) or to the block (the others).

    * ``routing``: ``softmax_topk`` (softmax over all experts, then top-k, optionally
      renormalised), ``topk_softmax`` (top-k logits, softmax over those), or
      ``sigmoid_grouped`` (DeepSeek-V3: sigmoid scores, group-limited top-k, bias-corrected).
    * ``renormalize``: ``True``/``False``, or the config attribute that decides it.
    * ``expert_layout``: ``gate_up_rows`` = ``gate_up_proj`` [E, 2I, d] (gate rows then up rows),
      ``down_proj`` [E, d, I]; ``gate_up_interleaved_cols`` = gpt-oss, ``gate_up_proj`` [E, d, 2I]
      with gate/up interleaved in the columns, ``down_proj`` [E, I, d], plus biases.
    """

    block: str = "mlp"
    router: str = "gate"
    experts: str = "experts"
    routing: Routing = "softmax_topk"
    renormalize: bool | str = True
    expert_layout: ExpertLayout = "gate_up_rows"
    shared_experts: str | None = None
    shared_expert_gate: str | None = None
    cast_weights: bool = True  # top-k weights cast back to the logits' dtype (Mixtral keeps float32)


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
class ArchSpec:
    """Where things live in one model family. Paths are dotted attribute paths.

    ``layers``, ``embed``, ``final_norm`` and ``unembed`` are relative to the ``*ForCausalLM``
    model; all other paths are relative to one decoder layer. ``attn_out`` and ``mlp_out`` name
    the module whose output the layer adds to the residual stream (Gemma adds the *post-norm*
    outputs, so its sites sit on those norms). ``residual_scale`` names a config attribute that
    multiplies those outputs before the add (Granite).
    """

    model_type: str
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    unembed: str = "lm_head"
    attn: str = "self_attn"
    o_proj: str = "self_attn.o_proj"
    mlp: str = "mlp"
    down_proj: str | None = "mlp.down_proj"
    attn_out: str = "self_attn"
    mlp_out: str = "mlp"
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    n_heads: str = "num_attention_heads"
    n_kv_heads: str | None = "num_key_value_heads"
    residual_scale: str | None = None
    moe: MoESpec | None = None
    notes: str = field(default="", compare=False)

    # ----- resolution helpers (pure lookups, no family knowledge) -----
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The model's decoder layers, in order."""
        return resolve_path(model, self.layers)

    def layer_module(self, model: nn.Module, layer: int, path: str) -> nn.Module:
        """The module at ``path`` inside decoder layer ``layer`` (negative indices allowed)."""
        layers = self.decoder_layers(model)
        return resolve_path(layers[normalize_layer(layer, len(layers))], path)

    def num_heads(self, config) -> int:
        """Number of attention (query) heads."""
        return int(getattr(config, self.n_heads))

    def head_dim(self, model: nn.Module, layer: int = 0) -> int:
        """Width of one head's output as it enters ``o_proj`` (read off the weights)."""
        o_proj = self.layer_module(model, layer, self.o_proj)
        return int(o_proj.in_features) // self.num_heads(model.config)

    def moe_block(self, model: nn.Module, layer: int) -> nn.Module | None:
        """The layer's MoE block, or ``None`` where this layer is dense (e.g. DeepSeek's first layers)."""
        if self.moe is None:
            return None
        layers = self.decoder_layers(model)
        block = resolve_path(layers[normalize_layer(layer, len(layers))], self.moe.block, missing_ok=True)
        if block is None or resolve_path(block, self.moe.router, missing_ok=True) is None:
            return None
        return block

    def count(self, model: nn.Module) -> int:
        """Number of decoder layers."""
        return len(self.decoder_layers(model))

    def renormalizes(self, config) -> bool:
        """Whether the router renormalises its top-k weights (MoE only)."""
        if self.moe is None:
            return False
        flag = self.moe.renormalize
        return bool(getattr(config, flag, False)) if isinstance(flag, str) else bool(flag)


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
        >>> mlp_down(spec, hf, 0).dense                                   # doctest: +SKIP
        'model.layers.0.mlp.down_proj'
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


def normalize_layer(layer: int, n_layers: int) -> int:
    """Map a possibly negative layer index into ``range(n_layers)`` or raise a clear error."""
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise LayerIndexError(f"layer index must be an int, got {layer!r}")
    idx = layer + n_layers if layer < 0 else layer
    if not 0 <= idx < n_layers:
        raise LayerIndexError(
            f"layer {layer} is out of range: this model has {n_layers} layers; "
            f"use 0..{n_layers - 1} (or -{n_layers}..-1 counting from the end)"
        )
    return idx


def resolve_path(root: nn.Module, path: str, *, missing_ok: bool = False):
    """Follow a dotted attribute path from ``root``; ``missing_ok`` returns ``None`` instead of raising."""
    obj = root
    for part in path.split("."):
        if part.isdigit() and isinstance(obj, (nn.ModuleList, list, tuple)):
            obj = obj[int(part)]
            continue
        if not hasattr(obj, part):
            if missing_ok:
                return None
            raise UnknownArchitectureError(
                f"path {path!r} does not exist on {type(root).__name__} (failed at {part!r}); "
                "the registry spec does not match this model: fix or re-register it with "
                "steerlab.arch.register(ArchSpec(...), overwrite=True)"
            )
        obj = getattr(obj, part)
    return obj


# ----- routing: logits -> (top-k weights, top-k indices), per routing kind -----
def route(spec: ArchSpec, router: nn.Module, logits: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute a router's top-k weights and indices from (possibly edited) logits.

    Matches the family's own router exactly on unedited logits (tested), so editing logits
    (``-inf`` = switch an expert off) changes only what the edit implies.
    """
    assert spec.moe is not None
    k = int(router.top_k)
    if spec.moe.routing == "softmax_topk":
        probs = torch.softmax(logits.float(), dim=-1)
        weights, idx = torch.topk(probs, k, dim=-1)
        if spec.renormalizes(config):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights.to(logits.dtype) if spec.moe.cast_weights else weights), idx
    if spec.moe.routing == "topk_softmax":
        top, idx = torch.topk(logits, k, dim=-1)
        return torch.softmax(top.float(), dim=-1).to(logits.dtype), idx
    if spec.moe.routing == "sigmoid_grouped":
        scores = logits.float().sigmoid()
        off = torch.isneginf(logits)  # switched-off experts: score 0, and never chosen below
        choice = scores + router.e_score_correction_bias
        n_group, n_exp = int(router.num_group), int(router.num_experts)
        group_scores = choice.view(-1, n_group, n_exp // n_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=int(router.topk_group), dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, n_exp // n_group).reshape(-1, n_exp)
        choice = choice.masked_fill(~score_mask.bool() | off, float("-inf"))
        idx = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, idx)
        if router.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * router.routed_scaling_factor, idx
    raise UnknownArchitectureError(f"unknown routing kind {spec.moe.routing!r}")


# ----- the registry -----
_REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec, *, overwrite: bool = False) -> ArchSpec:
    """Add ``spec`` to the registry (``overwrite=True`` replaces an existing entry)."""
    if spec.model_type in _REGISTRY and not overwrite:
        raise UnknownArchitectureError(
            f"model_type {spec.model_type!r} is already registered; pass overwrite=True to replace it"
        )
    _REGISTRY[spec.model_type] = spec
    return spec


def known_model_types() -> list[str]:
    """All registered model types, sorted."""
    return sorted(_REGISTRY)


def get_spec(model_type: str) -> ArchSpec:
    """The spec for ``model_type``; unknown types raise an error listing the known ones."""
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise UnknownArchitectureError(
            f"architecture {model_type!r} is not in steerlab's registry. Known: "
            f"{', '.join(known_model_types())}. To add it, describe where its modules live: "
            f"steerlab.arch.register(steerlab.arch.ArchSpec(model_type={model_type!r}, "
            "layers='model.layers', o_proj='self_attn.o_proj', down_proj='mlp.down_proj', ...))"
        ) from None


def spec_for(model: nn.Module) -> ArchSpec:
    """Look up the spec for a loaded HF model by its ``config.model_type``; for an unknown type the error
    shows an ``ArchSpec(...)`` guessed from the module names found on this model."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]
    from steerlab.arch_hint import registration_hint

    raise UnknownArchitectureError(
        f"architecture {model_type!r} is not in steerlab's registry ({type(model).__name__}). Known: "
        f"{', '.join(known_model_types())}. {registration_hint(model)}"
    )


_GEMMA_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")

for _spec in (
    ArchSpec("llama"),
    ArchSpec("qwen2"),
    ArchSpec("qwen3"),
    ArchSpec("mistral"),
    ArchSpec("phi3", notes="fused qkv_proj and gate_up_proj; o_proj and down_proj are plain"),
    ArchSpec(
        "gemma2",
        attn_out="post_attention_layernorm",
        mlp_out="post_feedforward_layernorm",
        norms=_GEMMA_NORMS,
        notes="residual receives post-norm outputs; embeddings are scaled by sqrt(d)",
    ),
    ArchSpec(
        "gemma3_text",
        attn_out="post_attention_layernorm",
        mlp_out="post_feedforward_layernorm",
        norms=_GEMMA_NORMS,
        notes="residual receives post-norm outputs; embeddings are scaled by sqrt(d)",
    ),
    ArchSpec("mixtral", down_proj=None, moe=MoESpec(renormalize=True, cast_weights=False)),
    ArchSpec(
        "qwen2_moe",
        moe=MoESpec(renormalize="norm_topk_prob", shared_experts="shared_expert", shared_expert_gate="shared_expert_gate"),
        notes="dense layers (mlp_only_layers, decoder_sparse_step) keep mlp.down_proj",
    ),
    ArchSpec("qwen3_moe", moe=MoESpec(renormalize="norm_topk_prob")),
    ArchSpec("olmoe", down_proj=None, moe=MoESpec(renormalize="norm_topk_prob")),
    ArchSpec(
        "deepseek_v3",
        moe=MoESpec(routing="sigmoid_grouped", renormalize="norm_topk_prob", shared_experts="shared_experts"),
        notes="multi-head latent attention; o_proj input is num_heads * v_head_dim; first_k_dense_replace layers are dense",
    ),
    ArchSpec(
        "granitemoe",
        mlp="block_sparse_moe",
        down_proj=None,
        mlp_out="block_sparse_moe",
        residual_scale="residual_multiplier",
        moe=MoESpec(block="block_sparse_moe", router="router", routing="topk_softmax"),
        notes="attention and MoE outputs are multiplied by residual_multiplier before the residual add",
    ),
    ArchSpec(
        "gpt_oss",
        down_proj=None,
        moe=MoESpec(router="router", routing="topk_softmax", expert_layout="gate_up_interleaved_cols"),
        notes="experts transposed with biases; the MLP returns (hidden, router_scores)",
    ),
):
    register(_spec)
