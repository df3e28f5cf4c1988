"""Directions, fitters and steer ops: closed-form checks on synthetic data and tiny models."""

import pytest
import torch

from steerlab.errors import (
    EmptyInputError,
    InterventionNotFiredError,
    LayerIndexError,
    ShapeError,
    UnknownPositionError,
)
from steerlab.steering import Ablate, AddVector, Clamp, Direction, MeanDifference, mean_difference, pca_direction
from steerlab.testing import tiny_model

PROMPTS = ["Write a short poem about the sea.", "Hi there", "Tell me a joke about cats."]


def _direction(model, layers=(1,), seed=0):
    g = torch.Generator().manual_seed(seed)
    return Direction(vectors=torch.randn(len(layers), model.d_model, generator=g), layers=tuple(layers))


def test_direction_roundtrip_and_algebra(tmp_path):
    d = Direction(vectors=torch.randn(3, 8), layers=(0, 2, 5), site="resid_pre", position="post_inst", model="m", data_hash="abc", info={"n": 3})
    back = Direction.load(d.save(tmp_path / "d.safetensors"))
    assert back.layers == d.layers and back.position == "post_inst" and back.info == {"n": 3}
    torch.testing.assert_close(back.vectors, d.vectors)
    torch.testing.assert_close(d.unit().vectors.norm(dim=-1), torch.ones(3))
    assert d.select([5]).layers == (5,)
    cos = d.cosine(Direction(vectors=-2 * d.vectors[:2], layers=(0, 2)))
    assert cos == pytest.approx({0: -1.0, 2: -1.0}, abs=1e-6)
    assert torch.allclose(torch.diag(d.cosine_across_layers()), torch.ones(3))
    with pytest.raises(LayerIndexError, match="covers layers"):
        d.at(1)
    with pytest.raises(ShapeError, match="one row per layer"):
        Direction(vectors=torch.randn(2, 8), layers=(0,))


def test_mean_difference_streaming_equals_closed_form_in_float64():
    g = torch.Generator().manual_seed(1)
    pos = torch.randn(40, 2, 16, generator=g) + 1e4  # big offsets: float32 sums would lose digits
    neg = torch.randn(30, 2, 16, generator=g) + 1e4
    fit = MeanDifference(layers=(3, 4))
    for chunk in pos.split(7):
        fit.update(chunk, positive=True)
    for chunk in neg.split(11):
        fit.update(chunk, positive=False)
    expected = (pos.double().mean(0) - neg.double().mean(0)).float()
    torch.testing.assert_close(fit.result().vectors, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(mean_difference(pos, neg, layers=(3, 4)).vectors, expected, atol=1e-5, rtol=0)
    with pytest.raises(EmptyInputError):
        MeanDifference(layers=(0,)).result()


def test_pca_recovers_the_shared_axis():
    g = torch.Generator().manual_seed(2)
    axis = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0)
    neg = torch.randn(50, 1, 32, generator=g)
    pos = neg + (3 + torch.rand(50, 1, 1, generator=g)) * axis + 0.1 * torch.randn(50, 1, 32, generator=g)
    d = pca_direction(pos, neg, layers=(0,))
    assert float(d.at(0) @ axis) > 0.99  # right axis, right sign


def _projections(model, ops, sites, r_hat):
    seen = {}
    batch = model.encode(PROMPTS)
    with model.apply(*ops) as session:
        for site in sites:
            for layer in range(model.n_layers):
                session.add(site, layer, lambda x, ctx: seen.__setitem__((ctx.site, ctx.layer), x.clone()))
        with torch.inference_mode():
            model.hf(**batch.model_inputs())
    mask = batch.attention_mask.bool()
    return {k: (v[mask] @ r_hat) for k, v in seen.items()}


def test_ablation_zeroes_the_projection_everywhere(family_model):
    model = family_model
    d = _direction(model)
    r_hat = d.unit().at(1)
    proj = _projections(model, [Ablate(d)], ["resid_pre", "resid_post", "attn_out", "mlp_out"], r_hat)
    plain = _projections(model, [AddVector(d, coeff=0.0, layers=[0])], ["resid_post"], r_hat)
    for (site, layer), p in proj.items():
        scale = plain["resid_post", layer].abs().max()
        assert p.abs().max() <= 1e-4 * max(1.0, float(scale)), (site, layer)
    assert max(float(plain["resid_post", la].abs().max()) for la in range(model.n_layers)) > 1e-2


def test_addition_shifts_the_projection_by_the_coefficient():
    model = tiny_model("qwen2")
    d = _direction(model, layers=(1,))
    r_hat = d.unit().at(1)
    before = _projections(model, [AddVector(d, coeff=0.0)], ["resid_pre"], r_hat)
    after = _projections(model, [AddVector(d, coeff=2.5, unit=True)], ["resid_pre"], r_hat)
    torch.testing.assert_close(after["resid_pre", 1] - before["resid_pre", 1], torch.full_like(before["resid_pre", 1], 2.5), atol=1e-4, rtol=0)
    torch.testing.assert_close(after["resid_pre", 0], before["resid_pre", 0])  # layers before are untouched


def test_clamp_sets_the_projection():
    model = tiny_model("gemma2")
    d = _direction(model, layers=(2,))
    proj = _projections(model, [Clamp(d, value=-3.0, layers=[2])], ["resid_pre"], d.unit().at(2))
    torch.testing.assert_close(proj["resid_pre", 2], torch.full_like(proj["resid_pre", 2], -3.0), atol=1e-4, rtol=0)


@pytest.mark.parametrize("op_kind", ["add", "ablate"])
def test_ops_in_generate_same_tokens_with_and_without_cache(op_kind):
    model = tiny_model("llama")
    d = _direction(model, layers=(1,), seed=3)
    op = AddVector(d, coeff=2.0) if op_kind == "add" else Ablate(d)
    outs = []
    for use_cache in (True, False):
        with model.apply(op):
            outs.append(model.generate(PROMPTS, max_new_tokens=6, use_cache=use_cache))
    assert outs[0] == outs[1]
    if op_kind == "add":
        assert outs[0] != model.generate(PROMPTS, max_new_tokens=6)


def test_generated_only_addition_leaves_the_prompt_alone():
    model = tiny_model("llama")
    d = _direction(model, layers=(1,), seed=4)
    plain = model.generate(PROMPTS, max_new_tokens=1)
    with (
        pytest.raises(InterventionNotFiredError, match="never fired"),  # one new token: no generated position
        model.apply(AddVector(d, coeff=50.0, tokens="generated")),
    ):
        model.generate(PROMPTS, max_new_tokens=1)
    longer = model.generate(PROMPTS, max_new_tokens=4)
    with model.apply(AddVector(d, coeff=50.0, tokens="generated")):
        steered = model.generate(PROMPTS, max_new_tokens=4)
    with model.apply(AddVector(d, coeff=50.0, tokens="prompt")):
        prompt_only = model.generate(PROMPTS, max_new_tokens=1)
    assert all(s.startswith(p) for s, p in zip(steered, plain))  # the first new token sees prompt positions only
    assert steered != longer  # later tokens see the steered generated positions
    assert prompt_only != plain
    with (
        pytest.raises(UnknownPositionError, match="model.generate"),
        model.apply(AddVector(d, coeff=1.0, tokens="prompt")),
    ):
        model.hf(**model.encode(PROMPTS).model_inputs())


def test_bad_steering_inputs():
    model = tiny_model("llama")
    with (
        pytest.raises(ShapeError, match="d_model=64"),
        model.apply(AddVector(Direction(vectors=torch.randn(1, 10), layers=(0,)))),
    ):
        pass
    with pytest.raises(ShapeError, match="source_layer"), model.apply(Ablate(_direction(model, layers=(0, 1)))):
        pass
    with pytest.raises(EmptyInputError), model.apply():
        pass
    with pytest.raises(InterventionNotFiredError), model.apply(AddVector(_direction(model), coeff=1.0)):
        pass  # never ran the model


def test_probe_direction_matches_sklearn_and_separates():
    from sklearn.linear_model import LogisticRegression

    from steerlab.steering import probe_direction

    g = torch.Generator().manual_seed(5)
    axis = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    neg = torch.randn(400, 1, 16, generator=g)
    pos = torch.randn(400, 1, 16, generator=g) + 2 * axis
    d = probe_direction(pos, neg, layers=(0,))
    assert float(d.at(0) @ axis) > 0.9
    x = torch.cat([pos, neg])[:, 0].double()
    mean, std = x.mean(0), x.std(0)
    ref = torch.from_numpy(LogisticRegression(max_iter=2000).fit(((x - mean) / std).numpy(), [1] * 400 + [0] * 400).coef_[0]) / std
    torch.testing.assert_close(d.at(0).double(), ref / ref.norm(), atol=1e-5, rtol=1e-5)


def test_class_directions_at_t_inst_and_last_and_prompt_only_steering():
    from steerlab.steering import harmfulness_direction
    from steerlab.steering.harmfulness import class_directions, steer_prompt

    model = tiny_model("qwen3")
    harmful, harmless = PROMPTS, ["Give me three tips for studying.", "What is the capital of France?", "Explain tides."]
    dirs = class_directions(model, harmful, harmless, progress=False)
    assert set(dirs) == {"t_inst", "last"} and dirs["t_inst"].layers == tuple(range(model.n_layers))
    cos = dirs["t_inst"].cosine(dirs["last"])
    assert set(cos) == set(range(model.n_layers)) and all(-1 <= c <= 1 for c in cos.values())
    torch.testing.assert_close(harmfulness_direction(model, harmful, harmless, progress=False).vectors, dirs["t_inst"].vectors)
    op = steer_prompt(dirs["t_inst"], 1)
    assert op.tokens == "prompt" and op.coeff == 2.0
    with model.apply(op):
        model.generate(harmless, max_new_tokens=2)


def test_generate_batches_by_length_and_keeps_prompt_order():
    model = tiny_model("mistral")
    prompts = ["Hi", "Write a short poem about the sea, please, with rhymes.", "Tell me a joke.", "Explain tides."]
    one_by_one = [model.generate([p], max_new_tokens=5)[0] for p in prompts]
    assert model.generate(prompts, max_new_tokens=5, batch_size=3) == one_by_one
    assert len(set(one_by_one)) > 1
