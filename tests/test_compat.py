"""Each name steerlab.compat reaches in a dependency, checked against the installed version's behaviour."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from steerlab import compat
from steerlab.testing import tiny_model


def test_cache_kwarg_is_the_name_the_installed_forward_takes():
    model = tiny_model("llama")
    name = compat.cache_kwarg(model.hf)
    assert name in inspect.signature(type(model.hf).forward).parameters
    assert compat.cache_kwarg(model.hf.model) in inspect.signature(type(model.hf.model).forward).parameters

    class NoCache(torch.nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(compat.CompatibilityError, match="tested range"):
        compat.cache_kwarg(NoCache())


def test_a_cached_forward_through_with_cache_equals_the_full_forward():
    model = tiny_model("qwen2")
    enc = model.encode(["Write a short poem about the sea.", "Hi"])
    ids, mask = enc.input_ids, enc.attention_mask
    with torch.inference_mode():
        full = model.hf(input_ids=ids, attention_mask=mask).logits[:, -1]
        cache = compat.dynamic_cache(model.hf.config)
        model.hf(**compat.with_cache(model.hf, cache, input_ids=ids[:, :-1], attention_mask=mask[:, :-1]))
        assert cache.get_seq_length() == ids.shape[1] - 1
        step = model.hf(**compat.with_cache(model.hf, cache, input_ids=ids[:, -1:], attention_mask=mask))
    assert compat.output_cache(step) is cache
    assert torch.allclose(step.logits[:, -1], full, atol=1e-5)


def test_find_cache_under_either_name_or_position():
    model = tiny_model("llama")
    cache = compat.dynamic_cache(model.hf.config)
    for name in compat.CACHE_KWARGS:
        assert compat.find_cache((), {name: cache}) is cache
    assert compat.find_cache((torch.zeros(1), cache), {}) is cache
    assert compat.find_cache((), {"past_key_values": None, "use_cache": True}) is None


def test_dynamic_cache_from_layers_skips_layers_a_stopped_forward_never_reached():
    model = tiny_model("llama")
    k = torch.randn(1, 2, 5, 16)
    cache = compat.dynamic_cache(model.hf.config, [(k, k + 1), (None, None), (None, None)])
    assert cache.get_seq_length() == 5
    assert torch.equal(cache.layers[0].values, k + 1)
    assert compat.has_only_full_attention(cache)
    assert not compat.has_only_full_attention(compat.dynamic_cache(tiny_model("gemma2").hf.config))


def test_no_init_weights_skips_initialisation():
    from transformers import AutoModelForCausalLM

    config = tiny_model("llama").hf.config
    with compat.no_init_weights():
        a = AutoModelForCausalLM.from_config(config)
    torch.manual_seed(0)
    b = AutoModelForCausalLM.from_config(config)
    assert a.model.layers[0].mlp.down_proj.weight.shape == b.model.layers[0].mlp.down_proj.weight.shape


def test_drop_quantizer_lets_save_pretrained_run(tmp_path):
    import copy

    hf = copy.deepcopy(tiny_model("llama").hf)
    hf.config.quantization_config = {"quant_method": "gguf"}
    hf.hf_quantizer = object()
    compat.drop_quantizer(hf)
    assert not hasattr(hf.config, "quantization_config") and hf.hf_quantizer is None
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()


def test_gguf_pre_tokenizer_table_has_the_gpt2_style_names():
    table = compat.gguf_pre_tokenizer_splits()
    assert len(table) > 0 and all(isinstance(k, str) for k in table)


def test_expert_gate_equals_the_experts_own_activation():
    experts = tiny_model("mixtral").spec.moe_block(tiny_model("mixtral").hf, 0).experts
    pre = torch.randn(3, 2 * experts.intermediate_dim)
    gate, up = pre.chunk(2, dim=-1)
    assert torch.allclose(compat.expert_gate(experts, pre), experts.act_fn(gate) * up)
    assert compat.expert_gate(torch.nn.Linear(2, 2), pre) is None


def test_sklearn_validation_helpers():
    from sklearn.linear_model import LogisticRegression

    est = LogisticRegression()
    X, _ = compat.validate_data(est, np.ones((4, 3)), np.array([0, 1, 0, 1]))
    assert X.shape == (4, 3) and est.n_features_in_ == 3
    w = compat.check_sample_weight(None, X, dtype=np.float64)
    assert w.shape == (4,) and (w == 1).all()


def test_tl_cached_generate_flag_is_a_boolean_of_the_installed_versions():
    pytest.importorskip("transformer_lens")
    assert isinstance(compat.tl_cached_generate_is_broken(), bool)


def test_quantizer_detached_restores_the_metadata_also_on_errors():
    import copy

    hf = copy.deepcopy(tiny_model("llama").hf)
    hf.config.quantization_config = {"quant_method": "gguf"}
    marker = object()
    hf.hf_quantizer = marker
    with pytest.raises(RuntimeError), compat.quantizer_detached(hf):
        assert not hasattr(hf.config, "quantization_config") and hf.hf_quantizer is None
        raise RuntimeError
    assert hf.config.quantization_config == {"quant_method": "gguf"} and hf.hf_quantizer is marker


def test_compile_chat_template_uses_the_renderers_environment():
    import jinja2

    compiled = compat.compile_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert compiled.render(messages=[{"content": "hi"}]) == "hi"
    with pytest.raises(jinja2.TemplateSyntaxError):
        compat.compile_chat_template("{% if %}")


def test_unwrap_interop_finds_the_hf_model_where_each_wrapper_keeps_it():
    hf = tiny_model("llama").hf

    class NnsightLike:
        def __init__(self):
            self._module, self.tokenizer = hf, "tok"

    assert compat.unwrap_interop(NnsightLike()) == (hf, "tok")
    assert compat.unwrap_interop("some/path") is None
    assert compat.unwrap_interop(object()) is None


def test_unwrap_module_looks_through_transformer_lens_components():
    pytest.importorskip("transformer_lens")
    from steerlab.interop import to_bridge

    model = tiny_model("llama")
    bridge = to_bridge(model, copy=True)
    wrapped = bridge.original_model.model.layers[0].self_attn.o_proj
    assert not isinstance(wrapped, torch.nn.Linear)  # the bridge swapped a wrapper into the tree
    assert isinstance(compat.unwrap_module(wrapped), torch.nn.Linear)
    assert compat.unwrap_module(model.hf) is model.hf  # an HF module is its own


def test_router_output_reads_either_order_and_rebuilds_it():
    logits, weights, index = torch.randn(3, 4), torch.rand(3, 2), torch.randint(0, 4, (3, 2))
    for output in ((logits, weights, index), (index, weights, logits)):  # transformers >= 5.21 / granitemoe before
        lo, w, i, rebuild = compat.router_output(output)
        assert lo is logits and w is weights and i is index
        assert all(a is b for a, b in zip(rebuild(lo, w, i), output))
    with pytest.raises(compat.CompatibilityError, match="cannot tell"):
        compat.router_output((logits, weights, logits))
    with pytest.raises(compat.CompatibilityError, match="triple"):
        compat.router_output(logits)
