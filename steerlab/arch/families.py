"""The families steerlab knows: one :class:`ArchSpec` each, registered on import, plus the config conditions their
bias routes and GGUF export depend on. This is the only place with per-family facts.

Example:
    >>> from steerlab.arch import get_spec
    >>> get_spec("qwen2").bias_route("o_proj").model_type
    'llama'
"""

from __future__ import annotations

from steerlab.arch.registry import register
from steerlab.arch.spec import ArchSpec, BiasRoute, ExpertGroups, GGUFArch, MoESpec


# ----- config conditions (config -> why it cannot be carried, or None) -----
def sliding_window_reason(config) -> str | None:
    """Why a config cannot be carried by one without sliding-window layers (Llama, a default Qwen2), or None."""
    types = getattr(config, "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        return f"its layers use sliding-window attention ({sorted(set(types))})"
    if types is None and getattr(config, "use_sliding_window", False):
        return "it uses sliding-window attention"
    return None


def short_window_reason(config) -> str | None:
    """Mistral attends within ``sliding_window``; Llama matches it only when the window covers the context."""
    window = getattr(config, "sliding_window", None)
    if window is not None and window < getattr(config, "max_position_embeddings", 0):
        return (
            f"it attends within a sliding window of {window} tokens, shorter than its context "
            f"({config.max_position_embeddings}), which Llama cannot express"
        )
    return None


# ----- bias routes: config flags whose new parameters start at zero -----
_ATTENTION_BIAS = ("attention_bias", True)  # o_proj (and q/k/v) biases
_MLP_BIAS = ("mlp_bias", True)  # gate/up/down biases
_O_PROJ_FLAG = BiasRoute("o_proj", (_ATTENTION_BIAS,))
# Qwen2 is Llama with q/k/v biases: as Llama with attention_bias it keeps them, and o_proj's starts at zero.
_QWEN2_AS_LLAMA = (
    BiasRoute("o_proj", (_ATTENTION_BIAS,), "llama", sliding_window_reason),
    BiasRoute("down_proj", (_ATTENTION_BIAS, _MLP_BIAS), "llama", sliding_window_reason),
)
_MISTRAL_AS_LLAMA = (
    BiasRoute("o_proj", (_ATTENTION_BIAS,), "llama", short_window_reason),
    BiasRoute("down_proj", (_MLP_BIAS,), "llama", short_window_reason),
)

_GEMMA_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
_GEMMA_NOTES = "residual receives post-norm outputs; embeddings are scaled by sqrt(d)"

BUILTIN_SPECS: tuple[ArchSpec, ...] = (
    ArchSpec(
        "llama",
        bias_routes=(_O_PROJ_FLAG, BiasRoute("down_proj", (_MLP_BIAS,))),
        gguf=GGUFArch("llama", permute_qk=True, flags_off=("attention_bias", "mlp_bias")),
    ),
    ArchSpec("qwen2", bias_routes=_QWEN2_AS_LLAMA, gguf=GGUFArch("qwen2", permute_qk=False, check=sliding_window_reason)),
    ArchSpec("qwen3", bias_routes=(_O_PROJ_FLAG,)),
    ArchSpec("mistral", bias_routes=_MISTRAL_AS_LLAMA),
    ArchSpec("phi3", notes="fused qkv_proj and gate_up_proj; o_proj and down_proj are plain"),
    ArchSpec(
        "gemma2",
        attn_out="post_attention_layernorm",
        mlp_out="post_feedforward_layernorm",
        norms=_GEMMA_NORMS,
        bias_routes=(_O_PROJ_FLAG,),
        notes=_GEMMA_NOTES,
    ),
    ArchSpec(
        "gemma3_text",
        attn_out="post_attention_layernorm",
        mlp_out="post_feedforward_layernorm",
        norms=_GEMMA_NORMS,
        bias_routes=(_O_PROJ_FLAG,),
        notes=_GEMMA_NOTES,
    ),
    ArchSpec("mixtral", down_proj=None, moe=MoESpec(renormalize=True, cast_weights=False),
             vllm_modules=(("mlp_out", "block_sparse_moe"),)),  # fmt: skip
    ArchSpec(
        "qwen2_moe",
        moe=MoESpec(renormalize="norm_topk_prob", shared_experts="shared_expert", shared_expert_gate="shared_expert_gate"),
        notes="dense layers (mlp_only_layers, decoder_sparse_step) keep mlp.down_proj",
    ),
    ArchSpec("qwen3_moe", moe=MoESpec(renormalize="norm_topk_prob"), bias_routes=(_O_PROJ_FLAG,)),
    ArchSpec("olmoe", down_proj=None, moe=MoESpec(renormalize="norm_topk_prob"), bias_routes=(_O_PROJ_FLAG,)),
    ArchSpec(
        "deepseek_v3",
        moe=MoESpec(
            routing="sigmoid_grouped",
            renormalize="norm_topk_prob",
            shared_experts="shared_experts",
            router_bias="e_score_correction_bias",
            groups=ExpertGroups(count="num_group", kept="topk_group"),
        ),
        bias_routes=(_O_PROJ_FLAG,),
        notes="multi-head latent attention; o_proj input is num_heads * v_head_dim; first_k_dense_replace layers are dense",
    ),
    ArchSpec(
        "granitemoe",
        mlp="block_sparse_moe",
        down_proj=None,
        mlp_out="block_sparse_moe",
        residual_scale="residual_multiplier",
        moe=MoESpec(block="block_sparse_moe", router="router", routing="topk_softmax"),
        bias_routes=(_O_PROJ_FLAG,),
        notes="attention and MoE outputs are multiplied by residual_multiplier before the residual add",
    ),
    ArchSpec(
        "gpt_oss",
        down_proj=None,
        moe=MoESpec(router="router", routing="topk_softmax", expert_layout="gate_up_interleaved_cols", router_bias="bias"),
        notes="experts transposed with biases; the MLP returns (hidden, router_scores)",
    ),
)

for _spec in BUILTIN_SPECS:
    register(_spec)
