"""Tiny models for examples and tests: a tokenizer trained in-process, chat templates in the style of four
families, and seeded tiny random models of every registered architecture (no download, a second each).

Example:
    >>> model = tiny_model("qwen2_moe")
    >>> model.n_layers, model.d_model
    (3, 64)
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from steerlab.model import Model
    from steerlab.steering.direction import Direction

SPECIALS = [
    "<|im_start|>", "<|im_end|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<bos>", "<start_of_turn>", "<end_of_turn>",
    "<s>", "</s>", "[INST]", "[/INST]", "</think>", "<pad>",
]  # fmt: skip

# Chat templates written for the tests in the style of each family (not copied from the models).
TEMPLATES = {
    "chatml": (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a test assistant.<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama3": (
        "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "gemma": (
        "<bos>{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
        "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    "mistral": (
        "<s>{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
    ),
}

_CORPUS = [
    "Write a short poem about the sea.", "How do I bake bread at home?", "Explain how vaccines work.",
    "Tell me a joke about cats.", "What is the capital of France?", "Give me three tips for studying.",
    "You are a helpful assistant. The quick brown fox jumps over the lazy dog.",
    "system user assistant model instruction response", "Hi there! How are you today?",
]  # fmt: skip


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(template: str = "chatml"):
    """A byte-level BPE tokenizer trained in-process (vocab ~400) with the families' special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = TEMPLATES[template]
    return fast


MOE_EXTRA = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48, decoder_sparse_step=1),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
        num_key_value_heads=4,
        n_group=2, topk_group=2, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
    ),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2, residual_multiplier=0.5, embedding_multiplier=2.0),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}
DENSE_EXTRA = {
    "gemma2": dict(head_dim=16),
    "gemma3_text": dict(head_dim=16),
    "qwen3": dict(head_dim=16),
}
FAMILIES = ["llama", "qwen2", "qwen3", "gemma2", "gemma3_text", "mistral", "phi3", *MOE_EXTRA]
MOE_FAMILIES = list(MOE_EXTRA)


@functools.lru_cache(maxsize=None)
def _tiny_hf(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tiny_tokenizer()
    kwargs = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=0, eos_token_id=tok.eos_token_id,
        max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    kwargs.update(DENSE_EXTRA.get(model_type, {}))
    kwargs.update(MOE_EXTRA.get(model_type, {}))
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():  # routers and some experts start at zero: give every parameter signal
        for name, p in hf.named_parameters():
            if p.dim() >= 1 and "norm" not in name and "layernorm" not in name:
                p.normal_(0.0, 0.2 if p.dim() > 1 else 0.05)
    return hf.eval()


def tiny_model(model_type: str, template: str = "chatml") -> Model:
    """A steerlab Model around a seeded tiny random model of ``model_type`` (3 layers, width 64; the
    transformers model is built once per process and shared: do not edit its weights in place)."""
    from steerlab.model import load

    return load(_tiny_hf(model_type), tiny_tokenizer(template))


def tiny_direction(model: Model, *, layer: int = 1, seed: int = 0) -> Direction:
    """A seeded random :class:`~steerlab.steering.Direction` at ``resid_pre`` of ``layer``, fitted "on" ``model``."""
    from steerlab.steering.direction import Direction

    generator = torch.Generator().manual_seed(seed)
    vector = torch.randn(1, model.d_model, generator=generator)
    return Direction(vectors=vector, layers=(layer,), site="resid_pre", model=model.name,
                     info={"n_layers": model.n_layers})  # fmt: skip
