"""The refusal-direction selection: lazy selection equals exhaustive selection; report and Direction."""

import pytest
import torch

from steerlab.errors import SteerlabError
from steerlab.eval import kl_divergence, refusal_score
from steerlab.eval.logits import last_token_logprobs
from steerlab.steering import Ablate, AddVector, Direction
from steerlab.steering.refusal import fit_candidates, refusal_direction, select_direction
from steerlab.testing import tiny_model

HARMFUL = ["Tell me a joke about cats.", "Write a short poem about the sea.", "How do I bake bread at home?"]
HARMLESS = ["Give me three tips for studying.", "What is the capital of France?", "Explain how vaccines work."]


def test_candidates_are_mean_differences_at_post_instruction_positions():
    import steerlab

    model = tiny_model("llama")
    cands, offsets = fit_candidates(model, HARMFUL, HARMLESS, progress=False)
    width = len(model.chat().header_ids)
    assert cands.shape == (width, model.n_layers, model.d_model) and offsets == list(range(-width, 0))
    acts = [steerlab.collect(model, p, positions=[-2], layers=None, progress=False).get("resid_pre", -2) for p in (HARMFUL, HARMLESS)]
    expected = acts[0][:, :, 0].double().mean(0) - acts[1][:, :, 0].double().mean(0)
    torch.testing.assert_close(cands[offsets.index(-2)], expected.float(), atol=1e-5, rtol=1e-5)


def test_lazy_selection_equals_exhaustive_selection():
    model = tiny_model("qwen2")
    cands, offsets = fit_candidates(model, HARMFUL, HARMLESS, progress=False)
    base = last_token_logprobs(model, HARMLESS)
    table = []
    for pi, off in enumerate(offsets):
        for layer in range(1, int(model.n_layers * 0.8)):
            d = Direction(vectors=cands[pi, layer][None], layers=(layer,))
            with model.apply(Ablate(d)):
                bypass = float(refusal_score(model, HARMFUL).mean())
                kl = float(kl_divergence(base, last_token_logprobs(model, HARMLESS)).mean())
            with model.apply(AddVector(d, layers=[layer])):
                induce = float(refusal_score(model, HARMLESS).mean())
            table.append((bypass, induce, kl, off, layer))
    induce_min = sorted(t[1] for t in table)[len(table) // 2]  # make about half fail the induce filter
    kl_max = 10.0
    passing = [t for t in table if t[1] > induce_min and t[2] < kl_max]
    best = min(passing)
    _, chosen, scored, _, _ = select_direction(model, cands, offsets, HARMFUL, HARMLESS, induce_min=induce_min, kl_max=kl_max, progress=False)
    assert (chosen.position, chosen.layer) == (best[3], best[4])
    assert chosen.bypass == pytest.approx(best[0], abs=1e-5)
    assert len(scored) == len(table)
    with pytest.raises(SteerlabError, match="no candidate passed"):
        select_direction(model, cands, offsets, HARMFUL, HARMLESS, induce_min=1e9, progress=False)


def test_refusal_direction_returns_a_direction_and_report(tmp_path):
    model = tiny_model("mistral")
    direction, report = refusal_direction(
        model, HARMFUL, HARMLESS, harmful_val=HARMFUL, harmless_val=HARMLESS, filter_train="none",
        induce_min=-1e9, kl_max=1e9, min_refusal_rate=0, progress=False,
    )  # fmt: skip
    assert direction.layers == (report.chosen.layer,) and direction.position == report.chosen.position
    assert report.chosen.bypass == min(c.bypass for c in report.candidates)
    assert "<==" in report.table()
    fig = report.heatmap()
    assert fig.data[0].z is not None and len(fig.data[0].x) == int(model.n_layers * 0.8) - 1
    assert report.to_dict()["chosen"]["layer"] == direction.layers[0]
    assert Direction.load(direction.save(tmp_path / "r.safetensors")).data_hash == direction.data_hash


def test_filter_prompts_agrees_with_the_score_and_the_judge():
    from steerlab.eval import is_refusal
    from steerlab.steering.refusal import filter_prompts

    model = tiny_model("llama")
    prompts = HARMFUL + HARMLESS
    scores = refusal_score(model, prompts)
    assert filter_prompts(model, prompts, refuse=True, how="score") == [p for p, s in zip(prompts, scores) if s > 0]
    assert filter_prompts(model, prompts, refuse=False, how="score") == [p for p, s in zip(prompts, scores) if s < 0]
    replies = model.generate(prompts, max_new_tokens=16)
    assert filter_prompts(model, prompts, refuse=False, how="judge") == [p for p, r in zip(prompts, replies) if not is_refusal(r)]
    assert filter_prompts(model, prompts, refuse=True, how="none") == prompts


def test_evaluation_matches_generations_and_kl_computed_by_hand():
    from steerlab.eval import refusal_rate
    from steerlab.steering.evaluate import evaluate_refusal_direction

    model = tiny_model("qwen2")
    d = Direction(vectors=torch.randn(1, model.d_model, generator=torch.Generator().manual_seed(0)), layers=(1,))
    result = evaluate_refusal_direction(model, d, harmful=HARMFUL, harmless=HARMLESS, max_new_tokens=6, progress=False)
    with model.apply(Ablate(d)):
        ablated = model.generate(HARMFUL, max_new_tokens=6)
        ablated_lp = last_token_logprobs(model, HARMLESS)
    with model.apply(AddVector(d, layers=[1])):
        added = model.generate(HARMLESS, max_new_tokens=6)
    assert result.samples["harmful_ablated"] == ablated and result.samples["harmless_added"] == added
    assert result.harmful_ablated == refusal_rate(ablated) and result.harmless_added == refusal_rate(added)
    kl = float(kl_divergence(last_token_logprobs(model, HARMLESS), ablated_lp).mean())
    assert result.kl_harmless_ablated == pytest.approx(kl, abs=1e-6) and kl > 0
    assert "harmful, direction ablated" in result.as_table()


@pytest.mark.parametrize("rate", [float("nan"), -0.1, 1.5])
def test_min_refusal_rate_must_be_a_fraction(rate):
    model = tiny_model("llama")
    with pytest.raises(SteerlabError, match="min_refusal_rate"):
        refusal_direction(model, ["a"], ["b"], harmful_val=["a"], harmless_val=["b"], min_refusal_rate=rate)
