"""MoE experts: a switched-off expert is never selected and the block output matches a hand-computed
reference from the fused expert weights; force-on selects the expert everywhere; usage counts ignore
padding; contrastive ranking and router-probability attribution are right; on every MoE family."""

import pytest
import torch

from steerlab.arch import resolve_path
from steerlab.errors import EmptyInputError, LayerIndexError, SteerlabError, UnknownSiteError
from steerlab.interventions.experts import ExpertIndexError, ExpertMask, moe_layers
from steerlab.measure import expert_attribution, expert_contrast, expert_usage
from steerlab.measure.experts import ExpertScores, ExpertUsage, contrast
from steerlab.testing import MOE_FAMILIES, tiny_model

PROMPTS = ["Write a short poem about the sea.", "Hi", "How do I bake bread at home?", "Tell me a joke about cats."]


def _ours(hooks: dict) -> list:
    return [h for h in hooks.values() if "output_capuring" not in getattr(h, "__qualname__", "")]


def _all_hooks_removed(model) -> bool:
    return all(not _ours(m._forward_hooks) and not _ours(m._forward_pre_hooks) for m in model.hf.modules())


def _parts(model, layer):
    block = model.spec.moe_block(model.hf, layer)
    return block, resolve_path(block, model.spec.moe.router), resolve_path(block, model.spec.moe.experts)


def _record_choices(session, model, batch, store):
    """Record, per MoE layer, the top-k indices the experts module receives (padding rows dropped)."""
    keep = batch.attention_mask.bool().reshape(-1)
    for layer in moe_layers(model):
        _, _, experts = _parts(model, layer)

        def hook(module, args, kwargs, layer=layer):
            idx = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
            store[layer] = idx.reshape(keep.shape[0], -1)[keep].clone()

        session.add_module_hook(experts, hook, pre=True, with_kwargs=True)


def _run(model, batch):
    with torch.inference_mode():
        return model.hf(**batch.model_inputs()).logits


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_a_switched_off_expert_is_never_selected(family):
    model = tiny_model(family)
    batch = model.encode(PROMPTS)
    layers = moe_layers(model)
    base = expert_usage(model, PROMPTS)
    # switch off each layer's most used expert
    targets = [(la, int(base.counts[i].argmax())) for i, la in enumerate(layers)]
    chosen = {}
    with model.apply(ExpertMask(targets, mode="off")) as session:
        _record_choices(session, model, batch, chosen)
        masked_logits = _run(model, batch)
        masked = expert_usage(model, PROMPTS)
    for la, e in targets:
        assert base.counts[layers.index(la), e] > 0
        assert not (chosen[la] == e).any(), (family, la, e)
        assert masked.counts[layers.index(la), e] == 0
        assert masked.attribution().at(la)[e] == 0  # its router probability is zero too
    assert (masked_logits - _run(model, batch)).abs().max() > 1e-4
    assert _all_hooks_removed(model)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_forced_expert_is_selected_at_every_token(family):
    model = tiny_model(family)
    batch = model.encode(PROMPTS)
    layers = moe_layers(model)
    base = expert_usage(model, PROMPTS)
    targets = [(la, int(base.counts[i].argmin())) for i, la in enumerate(layers)]  # least used
    chosen = {}
    with model.apply(ExpertMask(targets, mode="force")) as session:
        _record_choices(session, model, batch, chosen)
        _run(model, batch)
    n_tokens = int(batch.attention_mask.sum())
    for la, e in targets:
        assert base.counts[layers.index(la), e] < n_tokens
        assert int((chosen[la] == e).any(-1).sum()) == n_tokens, (family, la, e)
        assert chosen[la].shape[1] == base.top_k  # still top-k experts per token
    assert _all_hooks_removed(model)


# ----- hand-computed reference: the MoE block from its fused expert weights -----
def _expert(model, experts, e, x):
    """One routed expert's output on tokens x [n, d], from the fused 3D parameters."""
    if model.spec.moe.expert_layout == "gate_up_rows":  # gate_up [E, 2I, d], down [E, d, I]
        gate, up = (x @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
        return (experts.act_fn(gate) * up) @ experts.down_proj[e].T
    # gpt-oss: gate_up [E, d, 2I] with gate/up interleaved in the columns, down [E, I, d], biases
    gu = x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
    gate, up = gu[..., ::2], gu[..., 1::2]
    limit, alpha = model.config.swiglu_limit, model.config.swiglu_alpha
    gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return ((up + 1) * gate * torch.sigmoid(gate * alpha)) @ experts.down_proj[e] + experts.down_proj_bias[e]


def _reference(model, layer, x, *, off=(), force=(), shared=True):
    """The block output computed by hand: routing written out per family's routing kind."""
    block, router, experts = _parts(model, layer)
    x = x.reshape(-1, model.d_model)
    logits = x @ router.weight.T + (router.bias if getattr(router, "bias", None) is not None else 0)
    allowed = torch.ones_like(logits, dtype=torch.bool)
    allowed[:, list(off)] = False
    k = int(router.top_k)
    kind = model.spec.moe.routing
    if force:  # forced experts plus the best of the rest by the family's ranking
        rank = logits.sigmoid() + router.e_score_correction_bias if kind == "sigmoid_grouped" else logits.clone()
        rank[:, list(force)] = float("inf")
        allowed = torch.zeros_like(allowed).scatter(1, rank.topk(k, dim=-1).indices, True)
    if kind == "softmax_topk":  # softmax over the allowed experts, top-k, renormalise if the family does
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        weights, idx = probs.topk(k, dim=-1)
        if model.spec.renormalizes(model.config):
            weights = weights / weights.sum(-1, keepdim=True)
    elif kind == "topk_softmax":
        top, idx = logits.masked_fill(~allowed, float("-inf")).topk(k, dim=-1)
        weights = torch.softmax(top, dim=-1)
    else:  # sigmoid scores (+ bias to choose), all groups kept in the tiny config
        assert router.topk_group == router.num_group
        choice = (logits.sigmoid() + router.e_score_correction_bias).masked_fill(~allowed, float("-inf"))
        idx = choice.topk(k, dim=-1).indices
        weights = logits.sigmoid().gather(1, idx)
        weights = weights / weights.sum(-1, keepdim=True) * router.routed_scaling_factor
    out = torch.zeros_like(x)
    for slot in range(k):
        for e in idx[:, slot].unique().tolist():
            rows = idx[:, slot] == e
            out[rows] += weights[rows, slot, None] * _expert(model, experts, e, x[rows])
    if shared and model.spec.moe.shared_experts:
        extra = resolve_path(block, model.spec.moe.shared_experts)(x)
        if model.spec.moe.shared_expert_gate:
            extra = torch.sigmoid(resolve_path(block, model.spec.moe.shared_expert_gate)(x)) * extra
        out = out + extra
    return out


def _block_io(model, layer, iv, batch):
    block, _, _ = _parts(model, layer)
    seen = {}
    with model.apply(iv) if iv is not None else model.hooks() as session:
        session.add_module_hook(
            block,
            lambda m, a, kw: seen.__setitem__("x", (a[0] if a else kw["hidden_states"]).clone()),
            pre=True,
            with_kwargs=True,
        )
        session.add("mlp_out", layer, lambda y, ctx: seen.__setitem__("y", y.clone()))
        _run(model, batch)
    return seen["x"], seen["y"]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_masked_block_output_matches_a_hand_computed_reference(family):
    model = tiny_model(family)
    layer = moe_layers(model)[-1]
    batch = model.encode(PROMPTS)
    with torch.no_grad():
        x, y = _block_io(model, layer, ExpertMask([(layer, 1)], mode="off"), batch)
        torch.testing.assert_close(
            y.reshape(-1, model.d_model), _reference(model, layer, x, off=[1]), rtol=1e-4, atol=1e-4
        )
        x, y = _block_io(model, layer, ExpertMask([(layer, 3)], mode="force"), batch)
        torch.testing.assert_close(
            y.reshape(-1, model.d_model), _reference(model, layer, x, force=[3]), rtol=1e-4, atol=1e-4
        )
        # the reference reproduces the unmasked block, and masking changed it
        x, y = _block_io(model, layer, None, batch)
        torch.testing.assert_close(y.reshape(-1, model.d_model), _reference(model, layer, x), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(y.reshape(-1, model.d_model), _reference(model, layer, x, off=[1]), atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_shared_expert_switched_off_on_request(family):
    model = tiny_model(family)
    layer = moe_layers(model)[0]
    batch = model.encode(PROMPTS)
    with torch.no_grad():
        x, y = _block_io(model, layer, ExpertMask([(layer, 2)], mode="off", shared_off=True), batch)
        ref = _reference(model, layer, x, off=[2], shared=False)
        torch.testing.assert_close(y.reshape(-1, model.d_model), ref, rtol=1e-4, atol=1e-4)
        x, y = _block_io(model, layer, ExpertMask(shared_off=[layer]), batch)
        torch.testing.assert_close(
            y.reshape(-1, model.d_model), _reference(model, layer, x, shared=False), rtol=1e-4, atol=1e-4
        )
        x, y = _block_io(model, layer, ExpertMask([(layer, 2)], mode="off"), batch)  # shared left alone by default
        torch.testing.assert_close(
            y.reshape(-1, model.d_model), _reference(model, layer, x, off=[2]), rtol=1e-4, atol=1e-4
        )
    with (
        pytest.raises(UnknownSiteError, match="no shared experts"),
        tiny_model("mixtral").apply(ExpertMask(shared_off=[0])),
    ):
        pass


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_usage_counts_sum_to_tokens_times_top_k_and_ignore_padding(family):
    model = tiny_model(family)
    batched = expert_usage(model, PROMPTS, batch_size=4)
    n_tokens = sum(len(model.encode([p]).input_ids[0]) for p in PROMPTS)
    assert batched.n_tokens == n_tokens and batched.n_prompts == len(PROMPTS)
    assert batched.layers == tuple(moe_layers(model))
    assert (batched.counts.sum(-1) == n_tokens * batched.top_k).all()
    singles = [expert_usage(model, [p]) for p in PROMPTS]
    assert torch.equal(batched.counts, sum(s.counts for s in singles))
    torch.testing.assert_close(batched.prob_mass, sum(s.prob_mass for s in singles), rtol=1e-4, atol=1e-4)
    freq = batched.frequency()
    torch.testing.assert_close(freq.scores.sum(-1), torch.full((len(batched.layers),), float(batched.top_k)))
    assert _all_hooks_removed(model)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_router_probability_attribution_sums_to_one(family):
    model = tiny_model(family)
    aff = expert_attribution(model, PROMPTS)
    assert aff.kind == "probs" and aff.scores.shape == (len(moe_layers(model)), 4)
    torch.testing.assert_close(aff.scores.sum(-1), torch.ones(len(aff.layers)))
    weights = expert_usage(model, PROMPTS).attribution(measure="weights").scores.sum(-1)
    router = _parts(model, aff.layers[0])[1]
    if model.spec.moe.routing == "sigmoid_grouped":
        expected = torch.full_like(
            weights, float(router.routed_scaling_factor) if router.norm_topk_prob else float("nan")
        )
        torch.testing.assert_close(weights, expected)
    elif model.spec.moe.routing == "topk_softmax" or model.spec.renormalizes(model.config):
        torch.testing.assert_close(weights, torch.ones_like(weights))
    else:  # un-renormalised top-k: the top-k probability mass, more than k / E and less than 1
        assert ((weights > 0.5) & (weights < 1)).all()
    # under a force-on mask the expert is chosen at every token and its weight mass grows
    layer = aff.layers[-1]
    with model.apply(ExpertMask([(layer, 2)], mode="force")):
        forced = expert_usage(model, PROMPTS, layers=[layer])
    assert forced.frequency().at(layer)[2] == 1.0
    base = expert_attribution(model, PROMPTS, layers=[layer], measure="weights")
    assert forced.attribution(measure="weights").at(layer)[2] > base.at(layer)[2]


def test_contrastive_ranking_on_a_constructed_case():
    def usage(counts, n_tokens):
        counts = torch.tensor(counts)
        return ExpertUsage(
            counts=counts,
            prob_mass=counts.double(),
            weight_mass=counts.double(),
            layers=(1, 2),
            n_tokens=n_tokens,
            n_prompts=2,
            top_k=2,
        )

    target = usage([[10, 2, 4, 4], [5, 5, 5, 5]], 10)  # per token: [1, .2, .4, .4], [.5, .5, .5, .5]
    other = usage([[20, 20, 0, 0], [0, 0, 10, 30]], 20)  # per token: [1, 1, 0, 0], [0, 0, .5, 1.5]
    scores = contrast(target, other)
    torch.testing.assert_close(scores.scores, torch.tensor([[0.0, -0.8, 0.4, 0.4], [0.5, 0.5, 0.0, -1.0]]))
    assert scores.top(2) == [(2, 0), (2, 1)]  # ties keep (layer, expert) order
    assert scores.top(3)[2] in [(1, 2), (1, 3)]
    assert scores.top(1, order="asc") == [(2, 3)]
    assert scores.top(1, order="abs") == [(2, 3)]
    assert scores.top(fraction=0.25) == [(2, 0), (2, 1)]  # 25% of 8
    rows = scores.rows(1)
    assert rows == [{"rank": 1, "layer": 2, "expert": 0, "score": 0.5}]
    assert len(scores.table(3).splitlines()) == 4
    assert scores.figure().data[0].type == "heatmap"
    torch.testing.assert_close(scores.at(1), torch.tensor([0.0, -0.8, 0.4, 0.4]))
    with pytest.raises(LayerIndexError):
        scores.at(0)
    with pytest.raises(SteerlabError, match="different layers"):
        contrast(
            target,
            ExpertUsage(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4), torch.zeros(1, 4), (1,), 1, 1, 2),
        )


def test_contrast_end_to_end_finds_the_expert_forced_on_the_target_set():
    model = tiny_model("olmoe")
    layer = moe_layers(model)[1]
    base = expert_usage(model, PROMPTS, layers=[layer])
    expert = int(base.counts[0].argmin())
    with model.apply(ExpertMask([(layer, expert)], mode="force")):
        target = expert_usage(model, PROMPTS)
    scores = contrast(target, expert_usage(model, PROMPTS))
    assert scores.top(1) == [(layer, expert)]
    same = expert_contrast(model, PROMPTS, PROMPTS)
    assert isinstance(same, ExpertScores) and same.scores.abs().max() == 0


def test_bad_masks_fail_clearly():
    model = tiny_model("deepseek_v3")  # layer 0 is dense
    for iv, err, match in [
        (ExpertMask([(0, 1)]), LayerIndexError, r"no MoE block; MoE layers: \[1, 2\]"),
        (ExpertMask([(1, 4)]), ExpertIndexError, r"0\.\.3"),
        (ExpertMask([(5, 0)]), LayerIndexError, "out of range"),
        (ExpertMask([(1, 0), (1, 1), (1, 2)], mode="off"), ExpertIndexError, "at most 2"),
        (ExpertMask([(1, 0), (1, 1), (1, 2)], mode="force"), ExpertIndexError, "top_k=2"),
    ]:
        with pytest.raises(err, match=match), model.apply(iv):
            pass
    assert _all_hooks_removed(model)
    with pytest.raises(ExpertIndexError, match="pair"):
        ExpertMask([7])
    with pytest.raises(EmptyInputError):
        ExpertMask([])
    with pytest.raises(LayerIndexError, match="no MoE block"):
        expert_usage(model, PROMPTS, layers=[0])
    with pytest.raises(UnknownSiteError, match="dense model"):
        expert_usage(tiny_model("llama"), PROMPTS)
    with pytest.raises(UnknownSiteError, match="dense model"), tiny_model("llama").apply(ExpertMask([(0, 0)])):
        pass
    # negative indices resolve like Python's
    batch = model.encode(PROMPTS)
    with model.apply(ExpertMask([(-1, -1)])):
        a = _run(model, batch)
    with model.apply(ExpertMask([(2, 3)])):
        b = _run(model, batch)
    torch.testing.assert_close(a, b)


def test_grouped_routing_that_drops_groups_cannot_be_forced():
    model = tiny_model("deepseek_v3")
    router = _parts(model, 1)[1]
    old = router.topk_group
    router.topk_group = 1
    try:
        with pytest.raises(UnknownSiteError, match="cannot guarantee"), model.apply(ExpertMask([(1, 0)], mode="force")):
            pass
    finally:
        router.topk_group = old


def test_masks_give_the_same_tokens_with_and_without_the_kv_cache():
    model = tiny_model("qwen2_moe")
    batch = model.encode(PROMPTS[:2])
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    outs = []
    for use_cache in (True, False):
        with model.apply(ExpertMask([(0, 1), (2, 0)], mode="force", shared_off=True)), torch.inference_mode():
            outs.append(
                model.hf.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=use_cache, pad_token_id=0)
            )
    assert torch.equal(outs[0], outs[1])
    assert _all_hooks_removed(model)
