"""ADA: header re-insertion on a temporary cache extension, against plain generation and manual forwards."""

import pytest
import torch

from steerlab.errors import ShapeError
from steerlab.hooks import open_sessions
from steerlab.interventions.ada import ADAGuard, ada_generate
from steerlab.probes import Probe
from steerlab.steering import AddVector, Direction
from steerlab.testing import tiny_model

PROMPTS = ["Write a short poem about the sea.", "Hi", "Explain how vaccines work.", "Tell me a joke about cats."]


def _probe(model, layer, seed=0, bias=0.0):
    g = torch.Generator().manual_seed(seed)
    return Probe(weights=torch.randn(1, model.d_model, generator=g), bias=torch.tensor([bias]), layers=(layer,))


def _manual_score(model, probe, ids):
    """P(positive) at the last of ``ids`` (prompt + generated + header) from a fresh full forward."""
    with torch.inference_mode():
        hs = model.hf(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    return float(probe.predict_proba(hs[probe.layers[0]][:, -1][:, None])[0, 0])


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "qwen2_moe"])
def test_checks_never_change_the_generation(family):
    model = tiny_model(family)
    guard = ADAGuard(probe=_probe(model, 1), every=3, threshold=2.0)  # reads but never fires
    outs = ada_generate(model, PROMPTS, guard, max_new_tokens=8, batch_size=3)
    plain = model.generate(PROMPTS, max_new_tokens=8, batch_size=3)
    assert [o.text for o in outs] == plain
    assert not any(o.stopped for o in outs)
    assert all(o.checks and o.checks[0].depth == 0 for o in outs)


def test_check_scores_equal_a_full_forward_with_the_header_appended():
    model = tiny_model("qwen2")
    probe = _probe(model, 2)
    guard = ADAGuard(probe=probe, every=3, threshold=2.0)
    prefills = ["The sea", ""]
    outs = ada_generate(model, PROMPTS[:2], guard, responses=prefills, max_new_tokens=7, batch_size=2)
    header = list(model.chat().header_ids)
    rows = model.chat().tokenize(PROMPTS[:2], responses=prefills)
    for out, row in zip(outs, rows):
        gen_ids = list(out.token_ids)
        for check in out.checks:
            ids = row[0] + gen_ids[: check.depth] + header
            assert check.score == pytest.approx(_manual_score(model, probe, ids), abs=1e-4)
        assert [c.depth for c in out.checks] == [d for d in (0, 3, 6) if d <= len(gen_ids)]


def test_rows_stop_independently_and_report_where():
    model = tiny_model("llama")
    probe = _probe(model, 1, seed=3)
    scores = [o.checks[0].score for o in ada_generate(model, PROMPTS, ADAGuard(probe=probe, threshold=2.0), max_new_tokens=1)]
    cut = sorted(scores)[1] + 1e-6  # the two highest-scoring prompts fire at depth 0
    outs = ada_generate(model, PROMPTS, ADAGuard(probe=probe, threshold=cut, refusal_text="[stopped]"), max_new_tokens=6, batch_size=4)
    plain = model.generate(PROMPTS, max_new_tokens=6)
    for out, score, ref in zip(outs, scores, plain):
        if score >= cut:
            assert out.stopped and out.fired_at == 0 and out.text == "[stopped]" and out.partial == ""
        else:
            assert not out.stopped and out.text == ref


def test_ada_applied_with_model_apply_returns_the_policys_texts():
    model = tiny_model("llama")
    probe = _probe(model, 1, seed=3)
    scores = [o.checks[0].score for o in ada_generate(model, PROMPTS, ADAGuard(probe=probe, threshold=2.0), max_new_tokens=1)]
    guard = ADAGuard(probe=probe, threshold=sorted(scores)[1] + 1e-6, refusal_text="[stopped]")
    expected = ada_generate(model, PROMPTS, guard, max_new_tokens=6, batch_size=4)
    with model.apply(guard) as session:
        texts = model.generate(PROMPTS, max_new_tokens=6, batch_size=4)
    assert texts == [o.text for o in expected] and "[stopped]" in texts
    assert [o.stopped for o in session.policy_outputs] == [o.stopped for o in expected]


def test_rethink_mode_fires_on_a_refusal_lookahead(monkeypatch):
    model = tiny_model("llama")
    from steerlab.interventions import ada

    seen = []

    def judge(text):
        seen.append(text)
        return True

    monkeypatch.setattr(ada, "is_refusal", judge)
    outs = ada_generate(model, PROMPTS[:2], ADAGuard(mode="rethink", lookahead=4), max_new_tokens=5)
    assert all(o.stopped and o.fired_at == 0 for o in outs) and len(seen) == 2
    monkeypatch.setattr(ada, "is_refusal", lambda text: False)
    outs = ada_generate(model, PROMPTS[:2], ADAGuard(mode="rethink", lookahead=4, every=2), max_new_tokens=5)
    assert [o.text for o in outs] == model.generate(PROMPTS[:2], max_new_tokens=5)


def test_ada_composes_with_steering_and_cleans_up():
    model = tiny_model("qwen2")
    d = Direction(vectors=torch.randn(1, model.d_model, generator=torch.Generator().manual_seed(1)), layers=(1,))
    guard = ADAGuard(probe=_probe(model, 2), threshold=2.0)
    with model.apply(AddVector(d, coeff=3.0)):
        steered = model.generate(PROMPTS[:2], max_new_tokens=5)
        outs = ada_generate(model, PROMPTS[:2], guard, max_new_tokens=5)
    assert [o.text for o in outs] == steered
    assert not open_sessions(model)
    layer = model.spec.decoder_layers(model.hf)[2]
    assert not layer._forward_pre_hooks


def test_bad_guards_are_reported():
    model = tiny_model("llama")
    with pytest.raises(ShapeError, match="needs a probe"):
        ADAGuard()
    with pytest.raises(ShapeError, match="resid_pre"):
        ADAGuard(probe=Probe(weights=torch.ones(1, 64), bias=torch.zeros(1), layers=(0,), site="resid_post"))
    with pytest.raises(ShapeError, match="wide"):
        ada_generate(model, ["Hi"], ADAGuard(probe=Probe(weights=torch.ones(1, 8), bias=torch.zeros(1), layers=(0,))))
    with pytest.raises(ValueError, match="every"):
        ADAGuard(probe=_probe(model, 0), every=0)


def test_checkpoint_states_are_the_header_states_a_check_reads():
    from steerlab.interventions.ada import checkpoint_states

    model = tiny_model("qwen2")
    probe = _probe(model, 2)
    prompts, responses = PROMPTS[:2], ["The sea is wide and blue.", "Hello there"]
    states, depths = checkpoint_states(model, prompts, responses, layer=2, depths=[0, 3, 100], batch_size=4)
    assert states.shape == (6, model.d_model)
    both, _ = checkpoint_states(model, prompts, responses, layer=[2, 0], depths=[0, 3, 100], batch_size=4)
    first, _ = checkpoint_states(model, prompts, responses, layer=0, depths=[0, 3, 100], batch_size=4)
    assert both.shape == (6, 2, model.d_model)  # layers in ascending order
    torch.testing.assert_close(both[:, 0], first, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[:, 1], states, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(first, states)
    header = list(model.chat().header_ids)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        base = model.chat().tokenize([prompt])[0][0]
        ids = model.tokenizer(response, add_special_tokens=False).input_ids
        assert depths[3 * i + 2] == len(ids)
        for j, d in enumerate([0, 3, len(ids)]):
            got = float(probe.predict_proba(states[3 * i + j][None, None])[0, 0])
            assert got == pytest.approx(_manual_score(model, probe, base + ids[:d] + header), abs=1e-4)


@pytest.mark.parametrize("mode", ["probe", "rethink"])
def test_recorded_header_states_equal_a_full_forward_with_the_header_appended(mode):
    model = tiny_model("qwen2")
    guard = ADAGuard(probe=_probe(model, 1), every=3, threshold=2.0) if mode == "probe" else ADAGuard(mode="rethink", lookahead=2, every=3)
    outs = ada_generate(model, PROMPTS[:3], guard, max_new_tokens=7, batch_size=2, record_layers=[0, 2])
    header = list(model.chat().header_ids)
    assert max(len(o.checks) for o in outs) >= 2
    for row, out in zip(model.chat().tokenize(PROMPTS[:3]), outs):
        for check in out.checks:
            ids = row[0] + list(out.token_ids)[: check.depth] + header
            with torch.inference_mode():
                hs = model.hf(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            want = torch.stack([hs[0][0, -1], hs[2][0, -1]])
            assert check.states.shape == (2, model.d_model)
            torch.testing.assert_close(check.states, want, atol=1e-4, rtol=1e-4)


def test_a_probe_over_several_layers_scores_the_mean_logit():
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(5)
    weights = 0.1 * torch.randn(2, model.d_model, generator=g)  # logits up to ~5: mean logit and mean probability differ
    probe = Probe(weights=weights, bias=torch.tensor([0.3, -0.2]), layers=(0, 2))
    outs = ada_generate(model, PROMPTS, ADAGuard(probe=probe, every=4, threshold=2.0), max_new_tokens=5, record_layers=[0, 2])
    for out in outs:
        for check in out.checks:
            assert check.score == pytest.approx(float(torch.sigmoid(probe.decision_function(check.states[None]).mean())), abs=1e-6)
    singles = [ada_generate(model, PROMPTS, ADAGuard(probe=probe.select(la), every=4, threshold=2.0), max_new_tokens=5) for la in (0, 2)]
    for out, a, b in zip(outs, *singles):
        for c, ca, cb in zip(out.checks, a.checks, b.checks):
            logit = (torch.logit(torch.tensor(ca.score, dtype=torch.float64)) + torch.logit(torch.tensor(cb.score, dtype=torch.float64))) / 2
            assert c.score == pytest.approx(float(torch.sigmoid(logit)), abs=1e-5)


def _hook_counts(model):
    """Hooks on every module of the HF model (transformers may keep recorder hooks of its own)."""
    return [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.hf.modules()]


def test_ada_is_a_policy_of_model_generate_and_composes_with_generated_token_steering():
    from steerlab.testing import tiny_direction

    model = tiny_model("qwen2")
    before = _hook_counts(model)
    guard = ADAGuard(probe=_probe(model, 2), every=2, threshold=2.0)
    plain = model.generate(PROMPTS[:3], policy=guard, max_new_tokens=6)
    assert [(o.text, o.checks) for o in plain] == [(o.text, o.checks) for o in ada_generate(model, PROMPTS[:3], guard, max_new_tokens=6)]
    steer = AddVector(tiny_direction(model, layer=1), coeff=8.0, tokens="generated")
    with model.apply(steer) as session:
        steered = model.generate(PROMPTS[:3], policy=guard, max_new_tokens=6)
        fired = dict(session.counts)
        reference = model.generate(PROMPTS[:3], max_new_tokens=6)
    assert fired and all(n > 0 for n in fired.values())  # the edit fired during the ADA generation
    assert [o.text for o in steered] == reference != [o.text for o in plain]
    assert not open_sessions(model)
    assert _hook_counts(model) == before  # every hook the scope and the policy added is gone


def test_a_policy_rejects_sampling_options_and_non_policies():
    from steerlab.errors import InvalidValueError

    model = tiny_model("llama")
    guard = ADAGuard(probe=_probe(model, 1))
    with pytest.raises(InvalidValueError, match="policy=None"):
        model.generate(PROMPTS, policy=guard, do_sample=True)
    with pytest.raises(InvalidValueError, match="ADAGuard"):
        model.generate(PROMPTS, policy="ada")
    with pytest.raises(InvalidValueError, match="max_new_tokens"):
        model.generate(PROMPTS, policy=guard, max_new_tokens=0)
    assert not open_sessions(model)
