"""Refusal judge and score, KL, last-token distributions, and the prompt sets."""

import pytest
import torch

from steerlab.data import advbench, harmbench, load_split, paired_instructions
from steerlab.eval import is_refusal, kl_divergence, refusal_rate, refusal_score
from steerlab.eval.logits import last_token_logprobs
from steerlab.eval.refusal import refusal_token_ids
from steerlab.testing import tiny_model

PROMPTS = ["Write a short poem about the sea.", "Hi there", "Tell me a joke about cats."]


def test_substring_judge():
    assert is_refusal("I\u2019m sorry, but I can\u2019t assist with that.")
    assert is_refusal("As an AI, I will not do this.")
    assert not is_refusal("Sure! Here is a short poem about the sea.")
    assert refusal_rate(["I cannot do that.", "Here you go.", "I'm unable to help.", "Okay."]) == 0.5


def test_last_token_logprobs_match_single_prompt_runs():
    model = tiny_model("qwen2")
    lp = last_token_logprobs(model, PROMPTS, batch_size=2)
    for i, prompt in enumerate(PROMPTS):
        batch = model.encode([prompt])
        with torch.inference_mode():
            logits = model.hf(**batch.model_inputs()).logits[0, -1]
        torch.testing.assert_close(lp[i], torch.log_softmax(logits, -1), atol=1e-5, rtol=1e-5)


def test_refusal_score_is_log_odds_of_refusal_tokens():
    model = tiny_model("llama")
    ids = [5, 17, 42]
    lp = last_token_logprobs(model, PROMPTS)
    p = lp[:, ids].exp().sum(-1)
    expected = torch.log(p) - torch.log(1 - p)
    torch.testing.assert_close(refusal_score(model, PROMPTS, token_ids=ids), expected, atol=1e-4, rtol=1e-4)
    assert len(refusal_token_ids(model.tokenizer)) >= 2


def test_kl_matches_torch():
    a = torch.log_softmax(torch.randn(4, 30), -1)
    b = torch.log_softmax(torch.randn(4, 30), -1)
    ref = torch.nn.functional.kl_div(b, a, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl_divergence(a, b), ref)
    assert torch.allclose(kl_divergence(a, a), torch.zeros(4))


def test_paired_instructions_are_style_matched_and_split_cleanly():
    pairs = paired_instructions()
    assert len(pairs) >= 160 and len({p["category"] for p in pairs}) == 8
    for p in pairs:
        assert 0.6 <= len(p["harmless"]) / len(p["harmful"]) <= 1.6
    split = load_split(seed=0)
    assert (len(split.harmful_train), len(split.harmful_val)) == (128, 32)
    assert not set(split.harmful_train) & set(split.harmful_val) and not set(split.harmless_val) & set(split.harmless_test)
    assert load_split(seed=0) == split and load_split(seed=1) != split


def test_public_sets_from_packages():
    adv = advbench()
    assert len(adv) == 520 and all(isinstance(x, str) and x for x in adv)
    assert len(harmbench()) == 200


def test_missing_package_names_the_install_command(monkeypatch):
    import importlib.util

    from steerlab.errors import ModelLoadError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyrit" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps pyrit==1.1.0"):
        advbench()
