"""Activation collection against the oracle: ``output_hidden_states`` of each prompt run alone."""

import pytest
import torch

import steerlab
from steerlab.activations import Activations
from steerlab.errors import EmptyInputError, LayerIndexError, UnknownPositionError, UnknownSiteError
from steerlab.testing import tiny_model

PROMPTS = [
    "Write a short poem about the sea.",
    "Hi",
    "Tell me a joke about cats, please, and make it a long one.",
    "How do I bake bread?",
    "Give me three tips.",
]


def _alone(model, prompt):
    batch = model.encode([prompt])
    with torch.inference_mode():
        out = model.hf(**batch.model_inputs(), output_hidden_states=True)
    return batch, out.hidden_states


def test_collected_equals_output_hidden_states_on_every_family(family_model):
    model = family_model
    positions = ["all", "t_inst", "post_inst", "last", -2]
    acts = steerlab.collect(model, PROMPTS, sites=["resid_pre", "resid_post"], positions=positions, batch_size=2, progress=False)
    offsets = acts.offsets()
    n = model.n_layers
    for i, prompt in enumerate(PROMPTS):
        batch, hs = _alone(model, prompt)
        ref_pre = torch.stack([hs[la][0] for la in range(n)], dim=1)  # [s, L, d]
        got_all = acts.get("resid_pre", "all")[offsets[i] : offsets[i + 1]]
        torch.testing.assert_close(got_all, ref_pre, atol=1e-5, rtol=1e-5)
        ref_post = torch.stack([hs[la + 1][0] for la in range(n - 1)], dim=1)
        torch.testing.assert_close(acts.get("resid_post", "all")[offsets[i] : offsets[i + 1], : n - 1], ref_post, atol=1e-5, rtol=1e-5)
        for p in positions[1:]:
            idx = batch.index(p)[0]
            torch.testing.assert_close(acts.get("resid_pre", p)[i], ref_pre[idx].transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_shapes_for_every_site(moe_model):
    model = moe_model
    moe_layers = [la for la in range(model.n_layers) if model.spec.moe_block(model.hf, la) is not None]
    acts = steerlab.collect(
        model, PROMPTS[:3], sites=list(steerlab.SITES), layers=moe_layers, positions=["t_inst", "post_inst"], progress=False
    )
    k = len(model.chat().header_ids)
    n_exp = model.spec.moe_block(model.hf, moe_layers[0])
    n_exp = int(getattr(n_exp, model.spec.moe.router).num_experts)
    L = len(moe_layers)
    assert acts.get("resid_pre", "post_inst").shape == (3, L, k, model.d_model)
    assert acts.get("head", "t_inst").shape == (3, L, 1, model.n_heads, model.head_dim)
    assert acts.get("router_logits", "post_inst").shape == (3, L, k, n_exp)
    assert acts.get("expert_out", "t_inst").shape == (3, L, 1, model.d_model)
    assert acts.get("attn_out", "t_inst").dtype == torch.float32


def test_order_batching_and_layer_subset_do_not_change_values():
    model = tiny_model("qwen2")
    one = steerlab.collect(model, PROMPTS, layers=[0, -1], positions=["t_inst"], batch_size=1, progress=False)
    many = steerlab.collect(model, PROMPTS, layers=[-1, 0], positions=["t_inst"], batch_size=4, progress=False)
    assert one.layers == many.layers == [0, 2]
    torch.testing.assert_close(one.get("resid_pre", "t_inst"), many.get("resid_pre", "t_inst"), atol=1e-5, rtol=1e-5)
    # distinct prompts give distinct rows, in the caller's order
    rows = many.get("resid_pre", "t_inst")[:, 1, 0]
    for i, prompt in enumerate(PROMPTS):
        batch, hs = _alone(model, prompt)
        torch.testing.assert_close(rows[i], hs[2][0, int(batch.t_inst[0])], atol=1e-5, rtol=1e-5)


def test_stream_to_disk_matches_memory_and_reloads(tmp_path):
    model = tiny_model("mistral")
    kwargs = {"sites": ["resid_post", "mlp_out"], "positions": ["last", "all"], "batch_size": 2, "progress": False}
    mem = steerlab.collect(model, PROMPTS, **kwargs)
    disk = steerlab.collect(model, PROMPTS, out_dir=tmp_path / "acts", **kwargs)
    assert len(list((tmp_path / "acts").glob("shard_*.safetensors"))) == 3
    reloaded = Activations.load(tmp_path / "acts")
    saved = Activations.load(mem.save(tmp_path / "copy"))
    for a in (disk, reloaded, saved):
        for site in kwargs["sites"]:
            for p in kwargs["positions"]:
                torch.testing.assert_close(a.get(site, p), mem.get(site, p))
        assert torch.equal(a.offsets(), mem.offsets())


def test_forward_stops_after_the_last_needed_layer():
    model = tiny_model("llama")
    ran = []
    norm = model.hf.model.norm
    handles = [norm.register_forward_hook(lambda *a: ran.append("norm"))]
    handles += [model.layer(i).register_forward_hook(lambda *a, i=i: ran.append(i)) for i in range(3)]
    try:
        steerlab.collect(model, PROMPTS[:2], sites=["resid_post"], layers=[1], progress=False)
        assert ran == [0, 1]
        ran.clear()
        steerlab.collect(model, PROMPTS[:2], sites=["resid_pre"], layers=[1], progress=False)
        assert ran == [0]
    finally:
        for h in handles:
            h.remove()


def test_bad_inputs_fail_clearly():
    model = tiny_model("llama")
    with pytest.raises(EmptyInputError, match="empty"):
        steerlab.collect(model, [], progress=False)
    with pytest.raises(UnknownSiteError, match="valid sites"):
        steerlab.collect(model, PROMPTS, sites=["residual"], progress=False)
    with pytest.raises(LayerIndexError, match="out of range"):
        steerlab.collect(model, PROMPTS, layers=[5], progress=False)
    with pytest.raises(UnknownPositionError, match="unknown position"):
        steerlab.collect(model, PROMPTS, positions=["middle"], progress=False)
    with pytest.raises(UnknownSiteError, match="dense"):
        steerlab.collect(model, PROMPTS, sites=["router_logits"], progress=False)
    acts = steerlab.collect(model, PROMPTS[:1], progress=False)
    with pytest.raises(UnknownPositionError, match="was not collected"):
        acts.get("resid_pre", "t_inst")


def test_layer_indices_take_integers_of_any_kind_and_nothing_else():
    import numpy as np

    model = tiny_model("llama")
    assert model.layer_indices(np.int64(-1)) == [2]
    assert model.layer_indices(torch.tensor(1)) == [1]
    assert model.layer_indices([np.int32(0), torch.tensor(2), 0, -1]) == [0, 2]  # duplicates collapse
    assert model.layer_indices(np.array([1, 0])) == [0, 1]
    with pytest.raises(LayerIndexError, match=r"not the string .3."):
        model.layer_indices("3")
    for bad in (True, [True], [1.0], [np.float32(1)], [torch.tensor(1.0)], ["1"], [np.bool_(True)], 1.5):
        with pytest.raises(LayerIndexError, match="must be one integer layer index"):
            model.layer_indices(bad)


def test_one_site_or_one_position_on_its_own_is_a_one_item_list():
    import numpy as np

    model = tiny_model("llama")
    listed = steerlab.collect(model, PROMPTS[:2], sites=["resid_post"], positions=["last"], layers=[1], progress=False)
    single = steerlab.collect(model, PROMPTS[:2], sites="resid_post", positions="last", layers=1, progress=False)
    assert single.sites == ["resid_post"] and single.positions == ["last"]
    torch.testing.assert_close(single.get("resid_post", "last"), listed.get("resid_post", "last"))
    ints = steerlab.collect(model, PROMPTS[:2], positions=[np.int64(-1), -2, -1], layers=[0], progress=False)
    assert ints.positions == [-1, -2] and all(type(p) is int for p in ints.positions)
    one = steerlab.collect(model, PROMPTS[:2], positions=np.int64(-1), layers=[0], progress=False)
    torch.testing.assert_close(one.get("resid_pre", -1), ints.get("resid_pre", -1))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_pooled_positions_are_the_mean_of_their_tokens_read_one_by_one(batch_size):
    model = tiny_model("qwen2")
    acts = steerlab.collect(model, PROMPTS, positions=["inst_mean", "inst_to_last_mean"], batch_size=batch_size, progress=False)
    every = steerlab.collect(model, PROMPTS, positions=["all"], batch_size=batch_size, progress=False)
    tokens, offsets = every.get("resid_pre", "all"), every.offsets()
    for i, (_ids, t_inst, _post, _end, _reasoning, start) in enumerate(model.chat().tokenize(PROMPTS)):
        row = tokens[int(offsets[i]) : int(offsets[i + 1])]  # [n_tokens, n_layers, d] of prompt i
        torch.testing.assert_close(acts.get("resid_pre", "inst_mean")[i, :, 0], row[start : t_inst + 1].mean(0))
        torch.testing.assert_close(acts.get("resid_pre", "inst_to_last_mean")[i, :, 0], row[start:].mean(0))
        assert 0 < start <= t_inst and (start < t_inst or PROMPTS[i] == "Hi")  # the instruction: not the system turn


def test_positions_outside_the_documented_set_are_named_whole_with_the_valid_ones():
    model = tiny_model("llama")
    for positions, bad in ((["t_inst", 0], 0), (["first"], "first"), ([-1.0], -1.0), ([True], True), ("middle", "middle")):
        with pytest.raises(UnknownPositionError) as err:
            steerlab.collect(model, PROMPTS, positions=positions, progress=False)
        assert f"unknown position {bad!r}; use one of t_inst, post_inst, last, reasoning_end, inst_mean, inst_to_last_mean, all" in str(err.value)


def test_bad_batch_size_and_empty_layers():
    from steerlab.errors import InvalidValueError

    model = tiny_model("llama")
    for size in (0, -1, 2.0):
        with pytest.raises(InvalidValueError, match="batch_size must be an int >= 1"):
            steerlab.collect(model, PROMPTS, batch_size=size, progress=False)
    with pytest.raises(EmptyInputError, match=r"layers is empty.*layers=None"):
        steerlab.collect(model, PROMPTS, layers=[], progress=False)
    with pytest.raises(UnknownSiteError, match="valid sites"):
        steerlab.collect(model, PROMPTS, sites=[["resid_pre"]], progress=False)


def test_collect_runs_far_enough_for_an_enclosing_apply():
    """collect stops after its last layer, but an op of an enclosing model.apply at a deeper layer still fires
    (and changes nothing collect reads above it)."""
    from steerlab.steering import AddVector, Direction

    model = tiny_model("llama")
    plain = steerlab.collect(model, PROMPTS, layers=[0], sites=["resid_pre"], progress=False)
    op = AddVector(Direction(vectors=torch.ones(1, model.d_model), layers=(2,)), layers=[2])
    with model.apply(op) as session:
        acts = steerlab.collect(model, PROMPTS, layers=[0], sites=["resid_pre"], batch_size=2, progress=False)
    assert session.handles[0].count == 3  # one call per batch
    torch.testing.assert_close(acts.get("resid_pre", "last"), plain.get("resid_pre", "last"))
    # what it reads at the op's layer is the edited stream
    with model.apply(op):
        edited = steerlab.collect(model, PROMPTS, layers=[1, 2], sites=["resid_pre"], progress=False)
    base = steerlab.collect(model, PROMPTS, layers=[1, 2], sites=["resid_pre"], progress=False)
    diff = edited.get("resid_pre", "last") - base.get("resid_pre", "last")
    torch.testing.assert_close(diff[:, 0], torch.zeros_like(diff[:, 0]))
    torch.testing.assert_close(diff[:, 1], torch.ones_like(diff[:, 1]), atol=1e-5, rtol=0)


def test_an_enclosing_hook_of_unknown_depth_runs_the_whole_forward():
    model = tiny_model("llama")
    ran = []
    with model.hooks() as session:
        session.add_module(model.hf.lm_head, lambda *a: ran.append("lm_head"), name="logits")
        steerlab.collect(model, PROMPTS[:2], layers=[0], progress=False)
    assert ran == ["lm_head"]
