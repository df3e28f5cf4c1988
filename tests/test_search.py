"""The parameter search of calibrated refusal: interpolation, objectives against per-row forwards, the front."""

import pytest
import torch

import steerlab
from steerlab.data import DEMO_HARMFUL, DEMO_HARMLESS
from steerlab.errors import InSampleWarning, InvalidValueError
from steerlab.eval.logits import kl_divergence, last_token_logprobs
from steerlab.eval.refusal import refusal_token_ids
from steerlab.probes import LatentGuard
from steerlab.steering import Ablate, Direction, mean_difference
from steerlab.steering.search import (
    GatedParams,
    Objectives,
    PromptSets,
    SearchSpace,
    evaluate,
    pareto_front,
    pareto_html,
    search,
)
from steerlab.testing import tiny_model

SETS = PromptSets(harmful=DEMO_HARMFUL[:4], safe=DEMO_HARMLESS[:4] + DEMO_HARMFUL[4:6], ordinary=DEMO_HARMLESS[4:10])


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("qwen2")
    guard = LatentGuard.fit(model, DEMO_HARMFUL[6:], DEMO_HARMLESS[6:], layers=[1, 2])
    acts = [steerlab.collect(model, p, positions=["last"], progress=False) for p in (DEMO_HARMFUL, DEMO_HARMLESS)]
    return model, guard, mean_difference(*acts, model=model)


def test_layer_interpolates_neighbouring_vectors(setup):
    _, _, r = setup
    layer, vec = GatedParams(layer=1.25, refuse_coeff=1.0, ablate_strength=1.0).vector(r)
    assert layer == 1
    torch.testing.assert_close(vec, 0.75 * r.at(1) + 0.25 * r.at(2))
    assert torch.equal(GatedParams(layer=2.0, refuse_coeff=1.0, ablate_strength=1.0).vector(r)[1], r.at(2))
    with pytest.raises(InvalidValueError, match="outside"):
        GatedParams(layer=7.0, refuse_coeff=1.0, ablate_strength=1.0).vector(r)
    with pytest.raises(InvalidValueError, match="ablate_strength"):
        GatedParams(layer=1.0, refuse_coeff=1.0, ablate_strength=0.0)
    with pytest.raises(InvalidValueError, match="low <= high"):
        SearchSpace(layers=(3.0, 1.0))
    with pytest.raises(InvalidValueError, match="ablate_strength"):
        SearchSpace(layers=(1.0, 2.0), ablate_strength=(0.0, 1.0))


def test_objectives_equal_each_row_measured_alone_under_its_branch(setup):
    model, guard, r = setup
    params = GatedParams(layer=1.5, refuse_coeff=6.0, ablate_strength=0.7, above=0.05)
    gated = params.build(guard, r)
    got = evaluate(model, gated, SETS)
    ids = refusal_token_ids(model.tokenizer)
    per_set = {}
    for name in ("harmful", "safe", "ordinary"):
        rows = []
        for prompt in getattr(SETS, name):
            action = gated.actions(guard.score([prompt]))[0]
            branch = {"refuse": gated.refuse, "comply": gated.comply}.get(action)
            if branch is None:
                rows.append(last_token_logprobs(model, [prompt]))
            else:
                with model.apply(branch):
                    rows.append(last_token_logprobs(model, [prompt]))
        per_set[name] = torch.cat(rows)
    plain = last_token_logprobs(model, list(SETS.ordinary))
    assert got.refusal == pytest.approx(float(torch.logsumexp(per_set["harmful"][:, ids], -1).exp().mean()), rel=1e-4)
    assert got.over_refusal == pytest.approx(float(torch.logsumexp(per_set["safe"][:, ids], -1).exp().mean()), rel=1e-4)
    assert got.kl == pytest.approx(float(kl_divergence(plain, per_set["ordinary"]).mean()), rel=1e-3, abs=1e-7)
    assert got.kl > 0  # the gate acted on the ordinary prompts, so the comparison can fail


def test_search_finds_a_front_and_writes_the_plot(setup, tmp_path):
    model, guard, r = setup
    single = Direction(vectors=r.at(1)[None], layers=(1,), site=r.site, model=r.model)
    baseline = GatedParams(layer=1.0, refuse_coeff=1.0, ablate_strength=1.0).build(guard, single)
    # the guard was fitted on 4 of the 6 ordinary prompts (DEMO_HARMLESS[6:10]): the search says so
    with pytest.warns(InSampleWarning, match=r"searching the guard on prompts it was fitted on \(4 of the 6 ordinary prompts\)"):
        result = search(model, guard, r, SETS, space=SearchSpace(layers=(0.0, 2.0)), n_trials=6, seed=0, baseline=baseline)
    assert len(result.params) == len(result.objectives) == 6 and result.baseline is not None
    front = [result.objectives[i] for i in result.pareto]
    assert front and not any(o.dominates(f) for o in result.objectives for f in front)
    assert set(result.dominating()) <= set(result.pareto)
    page = pareto_html(result, tmp_path / "pareto.html")
    assert "Pareto front" in page.read_text() and (tmp_path / "plotly.min.js").exists()
    assert result.to_dict()["trials"][0]["params"]["layer"] == result.params[0].layer


def test_pareto_front_and_partial_ablation_strength_checks():
    objs = [Objectives(0.5, 0.5, 0.1), Objectives(0.6, 0.5, 0.1), Objectives(0.6, 0.5, 0.1)]
    assert pareto_front(objs) == [1, 2]  # equal points do not dominate each other
    model = tiny_model("llama")
    d = Direction(vectors=torch.ones(1, model.d_model), layers=(1,))
    with pytest.raises(InvalidValueError, match="strength"):
        Ablate(d, strength=1.5)
    with pytest.raises(InvalidValueError, match="per_layer"):
        Ablate(d, strength=0.5, per_layer=True)
