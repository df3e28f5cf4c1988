"""GatedRefusal: per-row scores equal the guard's own, and each row's generation equals the generation under the
branch it was given (or plain generation for the band), on the same batches."""

from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

from steerlab.data import DEMO_HARMFUL, DEMO_HARMLESS
from steerlab.errors import GenerationStateError, InvalidValueError, ShapeError, UnknownSiteError
from steerlab.hooks import open_sessions
from steerlab.interventions.gated import GatedRefusal
from steerlab.interventions.token_guard import RefusalTokenGuard
from steerlab.probes import LatentGuard, ProbeGuard, fit_probes
from steerlab.probes.guard import GuardNotBoundError
from steerlab.steering import Ablate, AddVector
from steerlab.testing import tiny_direction, tiny_model
from steerlab.training.data import control_tokens
from steerlab.training.sft import add_tokens

PROMPTS = DEMO_HARMFUL[:4] + DEMO_HARMLESS[:4] + ["Hi", "Tell me a joke about cats and dogs, please."]


class _Plain:
    """A generation policy that changes nothing: the same greedy decoder, so outputs compare token for token."""

    @contextmanager
    def open(self, model):
        class Run:
            def start(self, decoder):
                pass

            def step(self, decoder, logits):
                return logits

            def finish(self, decoder):
                return [decoder.tokens(r) for r in range(len(decoder))]

        yield Run()


def _guards(model):
    latent = LatentGuard.fit(model, DEMO_HARMFUL[4:], DEMO_HARMLESS[4:], layers=[1, 2])
    acts = torch.randn(16, 1, model.d_model, generator=torch.Generator().manual_seed(0))
    probe = fit_probes(acts, [1] * 8 + [0] * 8, layers=[2], position="t_inst")
    return {"latent": latent.bind(model), "probe": ProbeGuard(probe, model=model)}


def _band(scores):
    """low / high splitting the scores into three non-empty groups."""
    s = sorted(scores.tolist())
    return (s[2] + s[3]) / 2, (s[-3] + s[-4]) / 2


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("kind", ["latent", "probe"])
def test_rows_follow_their_branch_exactly(family, kind):
    model = tiny_model(family)
    guard = _guards(model)[kind]
    d = tiny_direction(model, layer=1)
    refuse, comply = AddVector(d, coeff=8.0), Ablate(d)
    scores = guard.score(PROMPTS)
    low, high = _band(scores)
    gated = GatedRefusal(guard, refuse=refuse, comply=comply, low=low, high=high)
    outs = model.generate(PROMPTS, policy=gated, max_new_tokens=6, batch_size=4)
    torch.testing.assert_close(torch.tensor([o.score for o in outs]), scores, rtol=1e-4, atol=1e-5)
    assert {o.action for o in outs} == {"refuse", "comply", "leave"}
    plain = model.generate(PROMPTS, policy=_Plain(), max_new_tokens=6, batch_size=4)
    with model.apply(refuse):
        refused = model.generate(PROMPTS, policy=_Plain(), max_new_tokens=6, batch_size=4)
    with model.apply(comply):
        complied = model.generate(PROMPTS, policy=_Plain(), max_new_tokens=6, batch_size=4)
    expected = {"refuse": refused, "comply": complied, "leave": plain}
    for r, out in enumerate(outs):
        assert out.tokens == expected[out.action][r], (r, out.action)
    # the branches change generations, so the comparison above can fail
    assert refused != plain
    assert not open_sessions(model)


def _token_guard(model, *, seed=0):
    """A refusal-token guard from a perturbed copy of ``model`` (untrained tokens: its scores are arbitrary but
    differ from prompt to prompt, and its forward differs from the plain model's)."""
    tuned = add_tokens(model, control_tokens())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.hf.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return RefusalTokenGuard.from_model(tuned)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_refusal_token_guard_decides_and_the_plain_model_generates(family):
    model = tiny_model(family)
    guard = _token_guard(model)
    d = tiny_direction(model, layer=1)
    refuse, comply = AddVector(d, coeff=8.0), Ablate(d)
    scores = guard.score(PROMPTS)  # the oracle: the fine-tuned model's own chat formatting and read path
    low, high = _band(scores)
    outs = model.generate(PROMPTS, policy=GatedRefusal(guard, refuse=refuse, comply=comply, low=low, high=high), max_new_tokens=6, batch_size=4)
    torch.testing.assert_close(torch.tensor([o.score for o in outs]), scores, rtol=1e-4, atol=1e-7)
    assert {o.action for o in outs} == {"refuse", "comply", "leave"}
    plain = model.generate(PROMPTS, policy=_Plain(), max_new_tokens=6, batch_size=4)
    with model.apply(refuse):
        refused = model.generate(PROMPTS, policy=_Plain(), max_new_tokens=6, batch_size=4)
    with model.apply(comply):
        complied = model.generate(PROMPTS, policy=_Plain(), max_new_tokens=6, batch_size=4)
    guard_text = guard.model.generate(PROMPTS, max_new_tokens=6, batch_size=4)
    expected = {"refuse": refused, "comply": complied, "leave": plain}
    for r, out in enumerate(outs):
        assert out.tokens == expected[out.action][r], (r, out.action)
    # the guard's model generates differently, so rows generated by it instead of the plain model would fail above
    assert guard_text != model.generate(PROMPTS, max_new_tokens=6, batch_size=4)
    assert not open_sessions(model) and not open_sessions(guard.model)


def test_refusal_token_guard_checks():
    model = tiny_model("llama")
    d = tiny_direction(model, layer=1)
    guard = _token_guard(model)
    with pytest.raises(GuardNotBoundError):
        model.generate(["Hi"], policy=GatedRefusal(replace(guard, model=None), comply=Ablate(d)), max_new_tokens=2)
    other = _token_guard(model)
    other.model.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ShapeError, match="chat template"):
        model.generate(["Hi"], policy=GatedRefusal(other, comply=Ablate(d)), max_new_tokens=2)
    with pytest.raises(InvalidValueError, match="threshold"):
        replace(guard, threshold=float("nan"))
    with pytest.raises(InvalidValueError, match="own model"):
        GatedRefusal(guard, comply=Ablate(d)).score_states(torch.zeros(1, 1, model.d_model))
    assert not open_sessions(model)


def test_default_band_is_the_guard_threshold():
    model = tiny_model("llama")
    guard = _guards(model)["latent"]
    gated = GatedRefusal(guard, comply=Ablate(tiny_direction(model, layer=1)))
    assert gated.low == gated.high == guard.threshold
    assert gated.actions(torch.tensor([guard.threshold, guard.threshold - 1e-3])) == ["refuse", "comply"]


def test_checks():
    model = tiny_model("llama")
    guard = _guards(model)["latent"]
    d = tiny_direction(model, layer=1)
    with pytest.raises(InvalidValueError, match="at least one side"):
        GatedRefusal(guard)
    with pytest.raises(InvalidValueError, match="low <= high"):
        GatedRefusal(guard, comply=Ablate(d), low=1.0, high=0.0)
    with pytest.raises(InvalidValueError, match="ProbeGuard, LatentGuard or RefusalTokenGuard"):
        GatedRefusal(d, comply=Ablate(d))
    other = tiny_model("gemma2")
    if other.d_model != model.d_model:
        with pytest.raises(ShapeError, match="width"):
            other.generate(["Hi"], policy=GatedRefusal(guard, comply=Ablate(d)), max_new_tokens=2)


def test_module_interventions_are_refused():
    from steerlab.interventions import LinearRedirect

    model = tiny_model("llama")
    guard = _guards(model)["latent"]
    g = torch.Generator().manual_seed(1)
    width = model.config.intermediate_size
    redirect = LinearRedirect(1, torch.randn(width, generator=g), torch.randn(width, generator=g))
    with pytest.raises(UnknownSiteError, match="acts on modules"):
        model.generate(["Hi"], policy=GatedRefusal(guard, refuse=redirect), max_new_tokens=2)
    assert not open_sessions(model)


def test_a_forward_without_a_decision_raises_and_hooks_go():
    model = tiny_model("llama")
    gated = GatedRefusal(_guards(model)["latent"], comply=Ablate(tiny_direction(model, layer=1)))
    with pytest.raises(GenerationStateError, match="no row has been scored"):
        with gated.open(model):
            model.hf(**model.encode(["Hi"]).model_inputs())
    assert not open_sessions(model)
