"""Refusal tokens: first-step probabilities, forced decisions per category, hidden tokens, tau sweeps."""

import pytest
import torch

from steerlab.interventions.refusal_tokens import (
    ControlTokenError,
    RefusalTokens,
    generate_with_refusal_tokens,
    refusal_token_probs,
    tau_sweep,
)
from steerlab.testing import tiny_model

PROMPTS = ["Write a short poem about the sea.", "Hi", "Explain how vaccines work.", "Tell me a joke about cats."]


def _manual_probs(model, prompts, ids, temperature=1.0):
    rows = []
    for p in prompts:
        batch = model.encode([p])
        with torch.inference_mode():
            logits = model.hf(**batch.model_inputs()).logits[0, -1]
        rows.append(torch.softmax(logits / temperature, -1)[ids])
    return torch.stack(rows)


def test_probabilities_match_a_manual_softmax():
    model = tiny_model("llama")
    rt = RefusalTokens.from_tokenizer(model.tokenizer, refuse={"crime": "[INST]", "self-harm": "<bos>"}, respond="[/INST]", temperature=2.0)
    got = refusal_token_probs(model, PROMPTS, rt, batch_size=3)
    ref = _manual_probs(model, PROMPTS, list(rt.refuse.values()), temperature=2.0)
    assert torch.allclose(got, ref, atol=1e-5)


def test_forced_first_token_follows_the_thresholds_and_is_hidden():
    model = tiny_model("qwen2")
    rt = RefusalTokens.from_tokenizer(model.tokenizer, refuse={"crime": "[INST]", "other": "<bos>"}, respond="[/INST]")
    p = refusal_token_probs(model, PROMPTS, rt)
    # thresholds between the prompts' probabilities: half the prompts cross the "crime" threshold
    tau_crime = float(p[:, 0].median())
    rt = RefusalTokens(refuse=rt.refuse, respond=rt.respond, tau={"crime": tau_crime, "other": 2.0})
    outs = generate_with_refusal_tokens(model, PROMPTS, rt, max_new_tokens=4, batch_size=3)
    for out, row in zip(outs, p):
        expect = bool(row[0] >= tau_crime)
        assert out.refused == expect and out.category == ("crime" if expect else None)
        assert out.p_refuse["crime"] == pytest.approx(float(row[0]), abs=1e-5)
        assert "[INST]" not in out.text and "[/INST]" not in out.text
    # tau 0 refuses everything with the most probable category; tau > 1 never refuses
    always = generate_with_refusal_tokens(model, PROMPTS, RefusalTokens(refuse=rt.refuse, respond=rt.respond, default_tau=0.0), max_new_tokens=2)
    assert all(o.refused for o in always)
    assert [o.category for o in always] == [("crime" if r[0] >= r[1] else "other") for r in p.tolist()]
    never = generate_with_refusal_tokens(model, PROMPTS, RefusalTokens(refuse=rt.refuse, respond=rt.respond, default_tau=1.01), max_new_tokens=2)
    assert not any(o.refused for o in never)


def test_generation_after_the_forced_token_equals_prefilled_greedy():
    model = tiny_model("llama")
    rt = RefusalTokens.from_tokenizer(model.tokenizer, refuse="[INST]", respond="[/INST]", tau=1.01)  # always respond
    out = generate_with_refusal_tokens(model, ["Hi"], rt, max_new_tokens=5)[0]
    batch = model.encode(["Hi"])
    ids = torch.cat([batch.input_ids, torch.tensor([[rt.respond]])], 1)
    with torch.inference_mode():
        ref = model.hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    assert out.text == model.tokenizer.decode([t for t in ref[0, ids.shape[1] :].tolist() if t not in rt.control_ids], skip_special_tokens=True)


def test_tau_sweep_is_monotone_and_matches_counts():
    g = torch.Generator().manual_seed(0)
    harm, safe = torch.rand(50, generator=g) * 0.5 + 0.4, torch.rand(40, generator=g) * 0.5
    s = tau_sweep(harm, safe)
    assert bool((s.refusal_rate[1:] <= s.refusal_rate[:-1]).all()) and bool((s.over_refusal[1:] <= s.over_refusal[:-1]).all())
    i = 10  # tau 0.5
    assert float(s.taus[i]) == pytest.approx(0.5)
    assert float(s.refusal_rate[i]) == pytest.approx(float((harm >= 0.5).float().mean()))
    assert float(s.over_refusal[i]) == pytest.approx(float((safe >= 0.5).float().mean()))
    assert 0.8 < s.auc <= 1.0 and len(s.table().splitlines()) == 22 and len(s.figure().data) == 2


def test_bad_control_tokens_are_reported():
    model = tiny_model("llama")
    with pytest.raises(ControlTokenError, match="add_special_tokens"):
        RefusalTokens.from_tokenizer(model.tokenizer, refuse="[never-seen-token]", respond="[/INST]")
    with pytest.raises(Exception, match="unknown categories"):
        RefusalTokens(refuse={"a": 1}, respond=2, tau={"b": 0.5})


def _hook_counts(model):
    """Hooks on every module of the HF model (transformers may keep recorder hooks of its own)."""
    return [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.hf.modules()]


def test_refusal_tokens_are_a_policy_of_model_generate_and_compose_with_generated_token_steering():
    from steerlab.hooks import open_sessions
    from steerlab.steering import AddVector
    from steerlab.testing import tiny_direction

    model = tiny_model("llama")
    before = _hook_counts(model)
    rt = RefusalTokens.from_tokenizer(model.tokenizer, refuse="[INST]", respond="[/INST]", tau=1.01)  # always respond
    plain = model.generate(PROMPTS, policy=rt, max_new_tokens=6)
    assert plain == generate_with_refusal_tokens(model, PROMPTS, rt, max_new_tokens=6)
    with model.apply(AddVector(tiny_direction(model, layer=1), coeff=8.0, tokens="generated")) as session:
        steered = model.generate(PROMPTS, policy=rt, max_new_tokens=6)
    assert session.counts and all(n > 0 for n in session.counts.values())  # the edit fired during refusal-token generation
    assert [o.text for o in steered] != [o.text for o in plain]
    for s, p in zip(steered, plain):  # the decision reads the prompt only, which the edit leaves alone
        assert s.refused == p.refused and s.p_refuse == pytest.approx(p.p_refuse, abs=1e-6)
    assert not open_sessions(model)
    assert _hook_counts(model) == before  # every hook the scope and the policy added is gone
