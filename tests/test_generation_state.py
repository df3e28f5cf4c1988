"""Generation state: the past length of every step is read from the cache however the installed
transformers passes it (or the step raises), the prompt length lives exactly as long as one generation
call on every path, and an edit whose token selection leaves out every token counts as not fired."""

from __future__ import annotations

import pytest
import torch

from steerlab import compat
from steerlab.errors import EmptyInputError, GenerationStateError, HookSessionError, InterventionNotFiredError
from steerlab.hooks import generation, open_sessions
from steerlab.interventions.ada import ADAGuard, ada_generate
from steerlab.steering import AddVector, Direction
from steerlab.testing import FAMILIES, tiny_model

PROMPTS = ["Write a short poem about the sea.", "Hi there", "Tell me a joke about cats."]


def _direction(model, layer=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Direction(vectors=torch.randn(1, model.d_model, generator=g), layers=(layer,))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_decode_step_sees_the_true_past_length(family):
    """One step per new token; step k of a generation starts after prompt + k - 1 tokens (with padding)."""
    model = tiny_model(family)
    seen: list[tuple[int, int, int | None]] = []
    n_new = 4
    with model.hooks() as hooks:
        hooks.add("resid_pre", 0, lambda x, ctx: seen.append((ctx.step.past_length, x.shape[1], ctx.step.prompt_length)))
        model.generate(PROMPTS, max_new_tokens=n_new, min_new_tokens=n_new, batch_size=8)
    width = seen[0][1]
    assert seen[0] == (0, width, width)
    assert seen[1:] == [(width + k, 1, width) for k in range(n_new - 1)]


def test_generated_only_steering_changes_the_continuation_not_the_first_token():
    """The silent failure of transformers 5.24: past length stuck at 0 made positions='generated' a no-op."""
    model = tiny_model("qwen2")
    d = _direction(model, seed=3)
    plain = model.generate(PROMPTS, max_new_tokens=6, min_new_tokens=6)
    first = model.generate(PROMPTS, max_new_tokens=1, min_new_tokens=1)
    with model.apply(AddVector(d, coeff=40.0, tokens="generated")) as session:
        steered = model.generate(PROMPTS, max_new_tokens=6, min_new_tokens=6)
    assert steered != plain
    assert all(s.startswith(f) for s, f in zip(steered, first))
    assert all(h.count == 5 for h in session.handles)  # prefill masked out: 5 decode steps acted


def test_prompt_only_steering_acts_on_the_prefill_only():
    model = tiny_model("llama")
    with model.apply(AddVector(_direction(model), coeff=40.0, tokens="prompt")) as session:
        model.generate(PROMPTS, max_new_tokens=5, min_new_tokens=5)
    assert [h.count for h in session.handles] == [1]


def test_a_step_with_a_cache_steerlab_cannot_see_raises():
    model = tiny_model("llama")
    enc = model.encode(PROMPTS)
    with torch.inference_mode():
        out = model.hf(**enc.model_inputs(), use_cache=True)
    cache = compat.output_cache(out)
    assert cache is not None and cache.get_seq_length() == enc.input_ids.shape[1]
    nxt = out.logits[:, -1:].argmax(-1)
    mask = torch.cat([enc.attention_mask, torch.ones_like(nxt)], 1)

    class Hidden:  # a cache under a name and type steerlab does not know
        def __init__(self, inner):
            self.inner = inner

    with model.hooks() as hooks:
        hooks.add("resid_pre", 0, lambda x, ctx: None, required=False)
        with pytest.raises(GenerationStateError, match="no KV cache"):
            model.hf.model(input_ids=nxt, attention_mask=mask, use_cache=False, unknown_cache=Hidden(cache))
        with generation(model, enc.input_ids.shape[1]), pytest.raises(GenerationStateError, match="positions are unknown"):
            model.hf.model(input_ids=nxt, use_cache=False)  # no mask, no cache: a decode step we cannot place
        with pytest.raises(GenerationStateError, match="attention mask spans"):
            model.hf.model(input_ids=nxt, attention_mask=mask[:, 1:], **{compat.cache_kwarg(model.hf.model): cache})


def _hook_that_raises_on_decode(model):
    def fn(x, ctx):
        if ctx.step.past_length > 0:
            raise RuntimeError("boom")

    return fn


@pytest.mark.parametrize("loop", ["generate", "ada", "refusal_tokens"])
def test_prompt_length_is_reset_when_a_generation_loop_raises(loop):
    model = tiny_model("qwen2")
    with model.hooks() as hooks:
        hooks.add("resid_pre", 0, _hook_that_raises_on_decode(model))
        with pytest.raises(RuntimeError, match="boom"):
            if loop == "generate":
                model.generate(PROMPTS, max_new_tokens=4, min_new_tokens=4)
            elif loop == "ada":
                ada_generate(model, PROMPTS, ADAGuard(mode="rethink", every=100, threshold=2.0), max_new_tokens=4)
            else:
                from steerlab.interventions.refusal_tokens import RefusalTokens, generate_with_refusal_tokens

                ids = model.tokenizer.convert_tokens_to_ids(["[INST]", "[/INST]"])  # not EOS: decoding goes on
                tokens = RefusalTokens(refuse={"any": ids[0]}, respond=ids[1], default_tau=2.0)
                generate_with_refusal_tokens(model, PROMPTS, tokens, max_new_tokens=4)
        assert hooks.step.prompt_length is None
    assert open_sessions(model) == ()


def test_nested_generation_scopes_are_refused():
    model = tiny_model("llama")
    with model.hooks(), generation(model, 5), pytest.raises(GenerationStateError, match="nested"):
        with generation(model, 7):
            pass


def test_an_op_that_places_no_hook_or_never_acts_is_an_error():
    model = tiny_model("llama")
    d = _direction(model)
    with pytest.raises(EmptyInputError, match="no hook"), model.apply(AddVector(d, layers=[])):
        pass
    with pytest.raises(InterventionNotFiredError), model.apply(AddVector(d, coeff=2.0, tokens="generated")):
        model.generate(PROMPTS, max_new_tokens=1)


def test_a_hook_session_cannot_be_entered_twice():
    model = tiny_model("llama")
    session = model.hooks()
    with session:
        pass
    with pytest.raises(HookSessionError, match="already entered"), session:
        pass
