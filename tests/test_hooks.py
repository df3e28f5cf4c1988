"""Hook sessions: every site on every family sees the right tensor, edits take effect, handles are
always removed, and hooks that never fire are errors."""

import pytest
import torch

from steerlab.arch import resolve_path
from steerlab.errors import InterventionNotFiredError, LayerIndexError, UnknownSiteError
from steerlab.hooks import SITES, open_sessions
from steerlab.testing import tiny_model

PROMPTS = ["Write a short poem about the sea.", "Hi"]


def _ours(hooks: dict) -> list:
    # transformers installs permanent output-capturing hooks of its own on first use; skip those
    return [h for h in hooks.values() if "output_capuring" not in getattr(h, "__qualname__", "")]


def _all_hooks_removed(model) -> bool:
    return all(not _ours(m._forward_hooks) and not _ours(m._forward_pre_hooks) for m in model.hf.modules())


def _run(model, batch):
    with torch.inference_mode():
        return model.hf(**batch.model_inputs(), output_hidden_states=True)


def test_residual_sites_match_hidden_states_and_outputs_recompose(family_model):
    model = family_model
    batch = model.encode(PROMPTS)
    seen = {}
    with model.hooks() as hooks:
        for site in ("resid_pre", "resid_post", "attn_out", "mlp_out", "head"):
            for layer in range(model.n_layers):
                hooks.add(site, layer, lambda x, ctx: seen.__setitem__((ctx.site, ctx.layer), x.clone()))
        out = _run(model, batch)
    assert _all_hooks_removed(model)
    scale = getattr(model.config, model.spec.residual_scale) if model.spec.residual_scale else 1.0
    mask = batch.attention_mask.bool()
    for layer in range(model.n_layers):
        pre, post = seen["resid_pre", layer], seen["resid_post", layer]
        torch.testing.assert_close(pre, out.hidden_states[layer])
        if layer < model.n_layers - 1:  # HF applies the final norm to its last hidden state
            torch.testing.assert_close(post, out.hidden_states[layer + 1])
        # what the sites say is added to the residual stream really is what gets added
        recomposed = pre + scale * seen["attn_out", layer] + scale * seen["mlp_out", layer]
        torch.testing.assert_close(recomposed[mask], post[mask], rtol=1e-5, atol=1e-5)
        head = seen["head", layer]
        assert head.shape == (*batch.input_ids.shape, model.n_heads, model.head_dim)


def test_head_site_is_the_o_proj_input(family_model):
    model = family_model
    if model.spec.attn_out != model.spec.attn:
        pytest.skip("attn_out is a post-norm here; covered by the recompose test")
    batch = model.encode(PROMPTS)
    seen = {}
    with model.hooks() as hooks:
        hooks.add("head", 1, lambda x, ctx: seen.__setitem__("head", x.clone()))
        hooks.add("attn_out", 1, lambda x, ctx: seen.__setitem__("attn", x.clone()))
        _run(model, batch)
    o_proj = model.spec.layer_module(model.hf, 1, model.spec.o_proj)
    with torch.no_grad():
        torch.testing.assert_close(o_proj(seen["head"].flatten(-2)), seen["attn"])


def test_zeroing_every_head_zeroes_the_attention_output():
    model = tiny_model("llama")
    seen = {}
    with model.hooks() as hooks:
        hooks.add("head", 0, lambda x, ctx: torch.zeros_like(x))
        hooks.add("attn_out", 0, lambda x, ctx: seen.__setitem__("attn", x.clone()))
        _run(model, model.encode(PROMPTS))
    assert seen["attn"].abs().max() == 0


def test_edit_changes_downstream_and_is_undone_after_the_session():
    model = tiny_model("qwen2")
    batch = model.encode(PROMPTS)
    base = _run(model, batch).logits
    with model.hooks() as hooks:
        hooks.add("mlp_out", 1, lambda x, ctx: x * 0)
        edited = _run(model, batch).logits
    after = _run(model, batch).logits
    assert (edited - base).abs().max() > 1e-3
    torch.testing.assert_close(after, base)


def test_moe_sites(moe_model):
    model = moe_model
    spec, hf = model.spec, model.hf
    layer = next(i for i in range(model.n_layers) if spec.moe_block(hf, i) is not None)
    block = spec.moe_block(hf, layer)
    router = resolve_path(block, spec.moe.router)
    batch = model.encode(PROMPTS)
    seen = {}
    with model.hooks() as hooks:
        hooks.add("router_logits", layer, lambda x, ctx: seen.__setitem__("logits", x.clone()))
        hooks.add("expert_out", layer, lambda x, ctx: seen.__setitem__("experts", x.clone()))
        hooks.add("mlp_out", layer, lambda x, ctx: seen.__setitem__("mlp", x.clone()))
        hooks.add_module_hook(block, lambda m, a, k: seen.__setitem__("block_in", (a[0] if a else k["hidden_states"]).clone()), pre=True, with_kwargs=True)
        _run(model, batch)
    b, s = batch.input_ids.shape
    n_exp = int(router.num_experts)
    assert seen["logits"].shape == (b, s, n_exp)
    with torch.no_grad():
        expected = torch.nn.functional.linear(seen["block_in"], router.weight, getattr(router, "bias", None))
    torch.testing.assert_close(seen["logits"], expected.to(seen["logits"].dtype), rtol=1e-5, atol=1e-5)
    assert seen["experts"].shape == (b, s, model.d_model)
    if spec.moe.shared_experts is None:
        torch.testing.assert_close(seen["experts"], seen["mlp"])


def test_editing_router_logits_switches_an_expert_off(moe_model):
    model = moe_model
    spec, hf = model.spec, model.hf
    layer = next(i for i in range(model.n_layers) if spec.moe_block(hf, i) is not None)
    experts = resolve_path(spec.moe_block(hf, layer), spec.moe.experts)
    chosen = {}

    def off(x, ctx):
        x = x.clone()
        x[..., 0] = float("-inf")
        return x

    def record(module, args, kwargs):
        chosen["idx"] = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))

    batch = model.encode(PROMPTS)
    with model.hooks() as hooks:
        hooks.add_module_hook(experts, record, pre=True, with_kwargs=True)
        _run(model, batch)
        assert (chosen["idx"] == 0).any(), "expert 0 should be used by the unedited model"
        hooks.add("router_logits", layer, off)
        _run(model, batch)
    assert not (chosen["idx"] == 0).any()


def test_hooks_removed_when_the_body_raises():
    model = tiny_model("llama")
    with pytest.raises(ZeroDivisionError), model.hooks() as hooks:
        hooks.add("resid_pre", 0, lambda x, ctx: None)
        raise ZeroDivisionError
    assert _all_hooks_removed(model)


def test_hooks_removed_when_a_hook_raises():
    model = tiny_model("llama")

    def boom(x, ctx):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"), model.hooks() as hooks:
        hooks.add("resid_post", 1, boom)
        _run(model, model.encode(PROMPTS))
    assert _all_hooks_removed(model)


def test_a_hook_that_never_fired_is_an_error():
    model = tiny_model("llama")
    with pytest.raises(InterventionNotFiredError, match="resid_pre @ layer 1"), model.hooks() as hooks:
        hooks.add("resid_pre", 1, lambda x, ctx: None, name="steer")
    assert _all_hooks_removed(model)
    with model.hooks(check_fired=False) as hooks:
        hooks.add("resid_pre", 1, lambda x, ctx: None)
    with model.hooks() as hooks:
        hooks.add("resid_pre", 1, lambda x, ctx: None, required=False)


def test_firing_counts_and_step_info_during_generation():
    model = tiny_model("llama")
    batch = model.encode(PROMPTS)
    steps = []
    with model.hooks() as hooks:
        h = hooks.add("resid_post", 0, lambda x, ctx: steps.append((ctx.step.past_length, x.shape[1])))
        model.hf.generate(**{k: v for k, v in batch.model_inputs().items() if k != "position_ids"}, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert h.count == 4
    width = batch.input_ids.shape[1]
    assert steps == [(0, width), (width, 1), (width + 1, 1), (width + 2, 1)]


def test_bad_registrations_fail_clearly():
    model = tiny_model("llama")
    with model.hooks(check_fired=False) as hooks:
        with pytest.raises(UnknownSiteError, match="valid sites"):
            hooks.add("resid_middle", 0, lambda x, ctx: None)
        with pytest.raises(LayerIndexError, match="out of range"):
            hooks.add("resid_pre", 7, lambda x, ctx: None)
        with pytest.raises(UnknownSiteError, match="dense model"):
            hooks.add("router_logits", 0, lambda x, ctx: None)
        hooks.add("resid_pre", 0, lambda x, ctx: x[:, :1])
        with pytest.raises(UnknownSiteError, match="same shape"):
            _run(model, model.encode(PROMPTS))
    assert _all_hooks_removed(model)
    assert set(SITES) == {"resid_pre", "resid_post", "attn_out", "mlp_out", "head", "router_logits", "expert_out"}


def test_edits_apply_to_prompt_and_generated_tokens_alike_with_or_without_cache():
    model = tiny_model("qwen2")
    batch = model.encode(PROMPTS)
    push = torch.randn(model.d_model) * 3
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    outs, fired = [], []
    for use_cache in (True, False):
        with model.hooks() as hooks:
            h = hooks.add("resid_post", 0, lambda x, ctx: x + push)
            with torch.inference_mode():
                outs.append(model.hf.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=use_cache, pad_token_id=0))
        fired.append(h.count)
    with torch.inference_mode():
        plain = model.hf.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], plain)
    assert fired == [6, 6]


def test_reentering_an_apply_scope_is_a_clear_error():
    from steerlab.errors import HookSessionError
    from steerlab.steering import AddVector, Direction

    model = tiny_model("llama")
    op = AddVector(Direction(vectors=torch.ones(1, model.d_model), layers=(1,)), layers=[1])
    ctx = model.apply(op)
    with ctx as session:
        _run(model, model.encode(PROMPTS))
    assert session.handles[0].count == 1
    with pytest.raises(HookSessionError, match=r"already entered.*`with model\.apply\(op\):` again"), ctx:
        pass
    assert _all_hooks_removed(model) and not open_sessions(model)
    with model.apply(op) as again:  # the value is reusable in a new scope
        _run(model, model.encode(PROMPTS))
    assert again.handles[0].count == 1


@pytest.mark.parametrize("batch_size", [0, -3])
def test_generate_rejects_a_bad_batch_size_before_running(batch_size):
    from steerlab.errors import InvalidValueError

    with pytest.raises(InvalidValueError, match="batch_size must be an int >= 1"):
        tiny_model("llama").generate(PROMPTS, max_new_tokens=2, batch_size=batch_size)
