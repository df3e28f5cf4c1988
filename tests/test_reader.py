"""The one reader: taps on sites, modules and logits give what collect and plain forward passes give, in prompt
order, and the forward pass stops after the last layer a tap needs."""

import pytest
import torch

import steerlab
from steerlab.errors import EmptyInputError, InvalidValueError
from steerlab.reader import PerPrompt, Tap, TokenMean, read
from steerlab.testing import tiny_model

PROMPTS = ["Write a short poem about the sea.", "Hi there", "Tell me a joke about cats.", "Say hi."]


def test_site_taps_match_collect_in_prompt_order():
    model = tiny_model("qwen3")
    last, mean = PerPrompt("last"), TokenMean("all")
    got, token_mean = read(model, PROMPTS, taps=[Tap("resid_post", 1, last), Tap("resid_pre", 0, mean)], batch_size=3)
    acts = steerlab.collect(model, PROMPTS, sites=["resid_post"], layers=[1], positions=["last"], progress=False)
    torch.testing.assert_close(got.float(), acts.get("resid_post", "last")[:, 0, 0], atol=1e-5, rtol=1e-5)
    every = steerlab.collect(model, PROMPTS, sites=["resid_pre"], layers=[0], positions=["all"], progress=False)
    torch.testing.assert_close(token_mean, every.get("resid_pre", "all")[:, 0].double().mean(0).float(), atol=1e-5, rtol=1e-5)


def test_a_pooled_position_reads_as_in_collect():
    model = tiny_model("llama")
    pooled, heads = PerPrompt("inst_to_last_mean"), PerPrompt("inst_mean")
    got, per_head = read(model, PROMPTS, taps=[Tap("resid_pre", 2, pooled), Tap("head", 1, heads)], batch_size=3)
    acts = steerlab.collect(model, PROMPTS, sites=["resid_pre", "head"], layers=[1, 2], positions=["inst_to_last_mean", "inst_mean"], progress=False)
    torch.testing.assert_close(got.float(), acts.get("resid_pre", "inst_to_last_mean")[:, 1, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(per_head.float(), acts.get("head", "inst_mean")[:, 0, 0], atol=1e-5, rtol=1e-5)  # [n, H, dh]


def test_stops_after_the_last_tapped_layer_and_reads_module_inputs():
    model = tiny_model("llama")
    seen = []
    handle = model.spec.decoder_layers(model.hf)[-1].register_forward_hook(lambda *a: seen.append(1))
    try:
        (x,) = read(model, PROMPTS, taps=[Tap("input", 0, PerPrompt("last"), module=model.spec.down_proj)])
    finally:
        handle.remove()
    assert x.shape == (len(PROMPTS), model.hf.config.intermediate_size) and not seen


def test_logits_tap_is_the_last_position_distribution():
    model = tiny_model("qwen2")
    (lp,) = read(model, PROMPTS, taps=[Tap("logits", None, PerPrompt("last", fn=lambda z: z.float().log_softmax(-1)))])
    for i, prompt in enumerate(PROMPTS):
        batch = model.chat().encode([prompt]).to(model.device)
        with torch.inference_mode():
            ref = model.hf(**batch.model_inputs()).logits[0, -1].float().log_softmax(-1)
        torch.testing.assert_close(lp[i], ref.cpu(), atol=1e-4, rtol=1e-4)


def test_bad_input_is_a_clear_error():
    model = tiny_model("llama")
    with pytest.raises(EmptyInputError):
        read(model, [], taps=[Tap("resid_pre", 0, PerPrompt())])
    with pytest.raises(InvalidValueError, match="input"):
        read(model, PROMPTS, taps=[Tap("weights", 0, PerPrompt(), module="mlp.down_proj")])
