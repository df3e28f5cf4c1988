"""Attention heads: attribution sums to the o_proj output's projection, zero ablation equals zeroed o_proj
columns, mean ablation uses the stored means, norm rescaling restores the o_proj norm, on every family."""

import copy

import pytest
import torch

import steerlab
from steerlab.errors import EmptyInputError, InvalidValueError, LayerIndexError, ShapeError, SteerlabError
from steerlab.interventions.heads import HeadAblation, HeadIndexError
from steerlab.measure import head_ablation_effect, head_attribution, head_means
from steerlab.measure.heads import HeadAblationEffect, HeadAttribution, projection_metric
from steerlab.steering import Direction
from steerlab.testing import FAMILIES, tiny_model

PROMPTS = ["Write a short poem about the sea.", "Hi", "How do I bake bread at home?"]


def _ours(hooks: dict) -> list:
    # transformers installs permanent output-capturing hooks of its own on first use; skip those
    return [h for h in hooks.values() if "output_capuring" not in getattr(h, "__qualname__", "")]


def _all_hooks_removed(model) -> bool:
    return all(not _ours(m._forward_hooks) and not _ours(m._forward_pre_hooks) for m in model.hf.modules())


def _o_proj(model, layer):
    return model.spec.layer_module(model.hf, layer, model.spec.o_proj)


def _logits(model, batch):
    with torch.inference_mode():
        return model.hf(**batch.model_inputs()).logits


def _capture_o_proj(session, model, layer, store, key="out", inputs=False):
    """Record o_proj's output (or its input, after any head edits) at ``layer``."""
    if inputs:
        session.add_module_hook(_o_proj(model, layer), lambda m, a: store.__setitem__(key, a[0].clone()), pre=True)
    else:
        session.add_module_hook(_o_proj(model, layer), lambda m, a, out: store.__setitem__(key, out.clone()))


@pytest.mark.parametrize("family", FAMILIES)
def test_head_contributions_sum_to_the_o_proj_projection(family):
    model = tiny_model(family)
    torch.manual_seed(1)
    r = torch.randn(model.d_model)
    att = head_attribution(model, PROMPTS, r * 3.0)  # the direction is normalised
    r_hat = r / r.norm()
    batch = model.encode(PROMPTS)
    outs = {}
    with model.hooks() as session:
        for layer in range(model.n_layers):
            _capture_o_proj(session, model, layer, outs, key=layer)
        _logits(model, batch)
    assert att.scores.shape == (model.n_layers, model.n_heads)
    rows = torch.arange(len(PROMPTS))
    for layer in range(model.n_layers):
        expected = (outs[layer][rows, batch.last] @ r_hat).mean()
        got = att.scores[layer].sum() + att.bias[layer]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if _o_proj(model, 0).bias is not None:
        assert att.bias.abs().sum() > 0
    assert att.n_prompts == len(PROMPTS) and torch.allclose(att.direction, r_hat)


@pytest.mark.parametrize("family", FAMILIES)
def test_zeroing_every_head_of_a_layer_leaves_only_the_o_proj_bias(family):
    model = tiny_model(family)
    seen = {}
    iv = HeadAblation([(1, h) for h in range(model.n_heads)])
    with model.apply(iv) as session:
        _capture_o_proj(session, model, 1, seen)
        _logits(model, model.encode(PROMPTS))
    bias = _o_proj(model, 1).bias
    expected = torch.zeros_like(seen["out"]) if bias is None else bias.detach().expand_as(seen["out"])
    torch.testing.assert_close(seen["out"], expected)
    assert _all_hooks_removed(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_zeroing_one_head_equals_zeroing_its_o_proj_columns(family):
    model = tiny_model(family)
    layer, head, dh = 1, 2, model.head_dim
    batch = model.encode(PROMPTS)
    with model.apply(HeadAblation([(layer, head)])):
        ablated = _logits(model, batch)
    edited_hf = copy.deepcopy(model.hf)
    with torch.no_grad():
        _o_proj(steerlab.load(edited_hf, model.tokenizer), layer).weight[:, head * dh : (head + 1) * dh] = 0.0
        reference = edited_hf(**batch.model_inputs()).logits
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(ablated[mask], reference[mask], rtol=1e-4, atol=1e-4)
    assert (ablated - _logits(model, batch)).abs().max() > 1e-4  # it did something
    assert _all_hooks_removed(model)


def test_head_means_match_collected_activations_and_mean_mode_uses_them():
    model = tiny_model("qwen2")
    means = head_means(model, PROMPTS, batch_size=2)
    acts = steerlab.collect(model, PROMPTS, sites=["head"], positions=["all"], progress=False)
    torch.testing.assert_close(means, acts.get("head", "all").mean(0), rtol=1e-5, atol=1e-6)
    last = head_means(model, PROMPTS, layers=[1], position="last")
    assert torch.isnan(last[0]).all() and not torch.isnan(last[1]).any()

    seen = {}
    with model.apply(HeadAblation([(2, 1), (2, 3)], mode="mean", means=means)) as session:
        _capture_o_proj(session, model, 2, seen, inputs=True)
        _logits(model, model.encode(PROMPTS))
    heads = seen["out"].view(*seen["out"].shape[:-1], model.n_heads, model.head_dim)
    for h in (1, 3):
        torch.testing.assert_close(heads[:, :, h], means[2, h].expand_as(heads[:, :, h]))
    assert not torch.allclose(heads[:, :, 0], means[2, 0].expand_as(heads[:, :, 0]))
    with (
        pytest.raises(ShapeError, match="no values for layer 2"),
        model.apply(HeadAblation([(2, 1)], mode="mean", means=last)),
    ):
        pass
    with pytest.raises(EmptyInputError, match="head_means"):
        HeadAblation([(0, 0)], mode="mean")


@pytest.mark.parametrize("family", FAMILIES)
def test_rescale_norm_restores_the_o_proj_output_norm(family):
    model = tiny_model(family)
    batch = model.encode(PROMPTS)
    base, abl, plain = {}, {}, {}
    with model.hooks() as session:
        _capture_o_proj(session, model, 1, base)
        _logits(model, batch)
    with model.apply(HeadAblation([(1, 0), (1, 3)], rescale_norm=True)) as session:
        _capture_o_proj(session, model, 1, abl)
        _logits(model, batch)
    with model.apply(HeadAblation([(1, 0), (1, 3)])) as session:
        _capture_o_proj(session, model, 1, plain)
        _logits(model, batch)
    mask = batch.attention_mask.bool()
    norm = lambda d: d["out"][mask].norm(dim=-1)
    if _o_proj(model, 1).bias is not None:  # rescaled on attn_out (the attention module's output)
        with model.apply(HeadAblation([(1, 0), (1, 3)], rescale_norm=True)) as session:
            session.add("attn_out", 1, lambda x, ctx: abl.__setitem__("out", x.clone()))
            _logits(model, batch)
    torch.testing.assert_close(norm(abl), norm(base), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(norm(plain), norm(base), rtol=1e-3)
    # direction within each token is that of the plainly ablated output
    cos = torch.nn.functional.cosine_similarity(abl["out"][mask], plain["out"][mask], dim=-1)
    if _o_proj(model, 1).bias is None:
        torch.testing.assert_close(cos, torch.ones_like(cos), rtol=1e-4, atol=1e-4)
    assert _all_hooks_removed(model)


def test_ablation_gives_the_same_tokens_with_and_without_the_kv_cache():
    model = tiny_model("gpt_oss")  # o_proj bias: the two-site rescale path
    batch = model.encode(PROMPTS[:2])
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    outs = []
    for use_cache in (True, False):
        with model.apply(HeadAblation([(0, 1), (2, 2)], rescale_norm=True)), torch.inference_mode():
            outs.append(
                model.hf.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=use_cache, pad_token_id=0)
            )
    assert torch.equal(outs[0], outs[1])
    assert _all_hooks_removed(model)


def test_bad_heads_fail_clearly_and_hooks_are_removed():
    model = tiny_model("llama")
    with pytest.raises(LayerIndexError, match="out of range"), model.apply(HeadAblation([(7, 0)])):
        pass
    with pytest.raises(HeadIndexError, match=r"0\.\.3") as err, model.apply(HeadAblation([(0, 4)])):
        pass
    assert isinstance(err.value, SteerlabError)
    with pytest.raises(HeadIndexError, match="pair"):
        HeadAblation([3])
    with pytest.raises(EmptyInputError):
        HeadAblation([])
    bad_means = torch.zeros(2, 4, 16)
    with pytest.raises(ShapeError, match="needs"), model.apply(HeadAblation([(0, 0)], mode="mean", means=bad_means)):
        pass
    with pytest.raises(ShapeError, match="d_model"):
        head_attribution(model, PROMPTS, torch.ones(5))
    assert _all_hooks_removed(model)
    # negative indices resolve like Python's
    batch = model.encode(PROMPTS)
    with model.apply(HeadAblation([(-1, -1)])):
        a = _logits(model, batch)
    with model.apply(HeadAblation([(2, 3)])):
        b = _logits(model, batch)
    torch.testing.assert_close(a, b)


def test_attribution_ranking_table_and_figure():
    scores = torch.tensor([[0.1, -2.0, 0.3], [1.5, 0.0, -0.2]])
    att = HeadAttribution(scores=scores, bias=torch.zeros(2), direction=torch.ones(4) / 2, n_prompts=3)
    assert att.top(2) == [(0, 1), (1, 0)]
    assert att.top(1, order="desc") == [(1, 0)]
    assert att.top(2, order="asc") == [(0, 1), (1, 2)]
    assert att.top(fraction=0.5) == [(0, 1), (1, 0), (0, 2)]  # 50% of 6 heads
    assert len(att.top(fraction=0.01)) == 1
    rows = att.rows()
    assert [r["rank"] for r in rows] == list(range(1, 7)) and rows[0] == {
        "rank": 1,
        "layer": 0,
        "head": 1,
        "score": -2.0,
    }
    table = att.table(3)
    assert len(table.splitlines()) == 4 and "-2" in table.splitlines()[1]
    fig = att.figure()
    assert fig.data[0].type == "heatmap" and len(fig.data[0].z) == 2
    with pytest.raises(InvalidValueError, match="fraction"):
        att.top(fraction=1.5)
    with pytest.raises(InvalidValueError, match="exactly one"):
        att.top()


def test_attribution_accepts_a_direction_and_other_positions():
    model = tiny_model("qwen3")
    vec = torch.randn(2, model.d_model)
    d = Direction(vectors=vec, layers=(0, 2))
    with pytest.raises(ShapeError, match="source_layer"):
        head_attribution(model, PROMPTS, d)
    att = head_attribution(model, PROMPTS, d, source_layer=2, position="t_inst")
    ref = head_attribution(model, PROMPTS, vec[1], position="t_inst")
    torch.testing.assert_close(att.scores, ref.scores)
    att_all = head_attribution(model, PROMPTS, vec[1], position="all")
    assert not torch.allclose(att_all.scores, ref.scores)


def test_top_versus_random_ablation_effect():
    model = tiny_model("llama")
    torch.manual_seed(3)
    r = torch.randn(model.d_model)
    att = head_attribution(model, PROMPTS, r)
    effect = head_ablation_effect(model, att, PROMPTS, k=2, seed=7, n_random=2)
    assert isinstance(effect, HeadAblationEffect)
    assert effect.top_heads == tuple(att.top(2))
    assert len(effect.random_heads) == 2 and all(len(s) == 2 for s in effect.random_heads)
    again = head_ablation_effect(model, att, PROMPTS, k=2, seed=7, n_random=2)
    assert again == effect  # seeded
    # the numbers are what the metric gives under the same ablation
    metric = projection_metric(r)
    assert effect.baseline == pytest.approx(metric(model, PROMPTS), abs=1e-5)
    with model.apply(HeadAblation(effect.top_heads, rescale_norm=True)):
        assert effect.top == pytest.approx(metric(model, PROMPTS), abs=1e-5)
    assert effect.top != pytest.approx(effect.baseline)
    assert "top 2 heads" in effect.table()
    # a caller-supplied metric
    calls = []
    custom = head_ablation_effect(model, att, PROMPTS, fraction=0.1, metric=lambda m, p: calls.append(len(p)) or 1.0)
    assert custom.delta_top == 0.0 and calls == [3, 3, 3] and len(custom.top_heads) == 1
    assert _all_hooks_removed(model)


def test_real_weights_attribution_and_rescale(smollm):
    model = smollm
    prompts = ["Write a haiku about autumn.", "What is 2 + 2?"]
    torch.manual_seed(0)
    r = torch.randn(model.d_model)
    att = head_attribution(model, prompts, r)
    batch = model.encode(prompts)
    outs = {}
    with model.hooks() as session:
        _capture_o_proj(session, model, 10, outs)
        _logits(model, batch)
    with model.apply(HeadAblation([(10, 0), (10, 5)], rescale_norm=True)) as session:
        _capture_o_proj(session, model, 10, outs, key="abl")
        _logits(model, batch)
    rows = torch.arange(len(prompts))
    expected = (outs["out"][rows, batch.last] @ (r / r.norm())).mean()
    torch.testing.assert_close(att.scores[10].sum(), expected, rtol=1e-4, atol=1e-4)
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(outs["abl"][mask].norm(dim=-1), outs["out"][mask].norm(dim=-1), rtol=1e-4, atol=1e-4)
