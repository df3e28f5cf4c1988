"""ULD (logit difference with a reversed-objective assistant): exact difference, cache parity, failure modes."""

from __future__ import annotations

import pytest
import torch

from steerlab.errors import SteerlabError
from steerlab.eval.answers import QA
from steerlab.testing import FAMILIES, tiny_model
from steerlab.training.unlearn import ULD, LoRA, Reversed, UnlearnConfig, UnlearnError, build_assistant, train_uld
from steerlab.training.unlearn.evaluate import answer_logprob
from steerlab.training.unlearn.losses import mean_nll

FORGET = [QA("Who created the Python language?", ("Guido",)), QA("What is pip for?", ("packages",))]
RETAIN = [QA("What is the capital of France?", ("Paris",)), QA("What colour is the sky?", ("blue",))]
PROMPTS = ["Who created the Python language?", "Hi", "Name three colours of the rainbow, please."]


@pytest.fixture(scope="module")
def trained():
    model = tiny_model("qwen2")
    return model, train_uld(model, FORGET, RETAIN, layers=1, alpha=0.8, config=UnlearnConfig(steps=8, lr=1e-2))


def _logits(model, batch):
    with torch.no_grad():
        return model.hf(**batch.model_inputs(), use_cache=False).logits


def test_assistant_is_the_first_layers_of_the_target():
    model = tiny_model("gemma2")  # per-layer layer_types in its config
    assistant = build_assistant(model, layers=2)
    assert assistant.n_layers == 2 and model.n_layers == 3
    assert assistant.config.num_hidden_layers == 2 and len(assistant.config.layer_types) == 2
    theirs = dict(model.hf.named_parameters())
    for name, p in assistant.hf.named_parameters():
        assert torch.equal(p, theirs[name]), name
    assert p.data_ptr() != theirs[name].data_ptr()  # a copy, not a view of the target
    with pytest.raises(SteerlabError, match="layers must be"):
        build_assistant(model, layers=4)


def test_applied_logits_are_the_exact_difference(trained):
    model, uld = trained
    batch = model.encode(PROMPTS)  # left-padded: the assistant must see the same mask
    plain, assistant = _logits(model, batch), _logits(uld.assistant, batch)
    with uld.applied(model):
        inside = _logits(model, batch)
    torch.testing.assert_close(inside, plain - 0.8 * assistant, rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(model, batch), plain, rtol=0, atol=0)  # hooks gone


def test_cached_generation_matches_full_recomputation(trained):
    """HF generate (KV caches on both models) vs a greedy loop that recomputes both from scratch each step."""
    model, uld = trained
    with uld.applied(model):
        fast = model.generate(PROMPTS[:2], max_new_tokens=6, batch_size=2)
    for prompt, text in zip(PROMPTS[:2], fast):
        ids = model.encode([prompt]).input_ids
        out = []
        for _ in range(6):
            with torch.no_grad():
                diff = model.hf(input_ids=ids, use_cache=False).logits[0, -1] - 0.8 * uld.assistant.hf(
                    input_ids=ids, use_cache=False).logits[0, -1]
            token = int(diff.argmax())
            out.append(token)
            if token in {model.tokenizer.eos_token_id}:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        assert text == model.tokenizer.decode(out, skip_special_tokens=True)


def test_forget_reply_falls_more_than_retain(trained):
    model, uld = trained
    before = answer_logprob(model, FORGET + RETAIN)
    with uld.applied(model):
        after = answer_logprob(model, FORGET + RETAIN)
    forget_drop, retain_drop = (before - after)[:2].mean(), (before - after)[2:].mean()
    assert forget_drop > 5 and forget_drop > 3 * retain_drop.abs()


def test_reversed_objective_learns_forget_and_flattens_retain():
    model = tiny_model("llama")
    assistant = build_assistant(model, layers=1)
    uld = train_uld(model, FORGET, RETAIN, layers=1, config=UnlearnConfig(steps=10, lr=1e-2))
    from steerlab.training.unlearn.trainer import as_examples  # noqa: F401  (the trainer's row builder)

    def entropy(m, items):
        batch = m.encode([q.question for q in items])
        logp = torch.log_softmax(_logits(m, batch)[:, -1], -1)
        return float(-(logp.exp() * logp).sum(-1).mean())

    assert answer_logprob(uld.assistant, FORGET).mean() > answer_logprob(assistant, FORGET).mean() + 3
    assert entropy(uld.assistant, RETAIN) > entropy(assistant, RETAIN)


def test_reversed_loss_by_hand():
    logits, labels = torch.randn(2, 5, 7), torch.tensor([[-100, -100, 3, 1, 2], [-100, 4, 0, -100, -100]])

    class Passes:
        def forget_logits(self):
            return logits, labels

        def retain_logits(self):
            return logits.flip(0), labels.flip(0)

    loss, parts = Reversed(retain_weight=0.5).loss(Passes())
    lp = torch.log_softmax(logits.flip(0)[:, :-1], -1)
    mask = labels.flip(0)[:, 1:] != -100
    flat = (-lp.mean(-1))[mask].mean()
    torch.testing.assert_close(loss, mean_nll(logits, labels) + 0.5 * flat)
    assert set(parts) == {"forget_nll", "retain_uniform_ce"}


def test_unknown_cache_state_raises(trained):
    model, uld = trained
    batch = model.encode(["Hi"])
    from steerlab import compat

    with torch.no_grad():
        out = model.hf(**compat.with_cache(model.hf, None, **batch.model_inputs()))  # cache filled outside
    cache = compat.output_cache(out)
    step = {"input_ids": torch.tensor([[5]]), "attention_mask": torch.ones(1, batch.input_ids.shape[1] + 1, dtype=torch.long)}
    with pytest.raises(UnlearnError, match="cannot follow this KV cache"), uld.applied(model), torch.no_grad():
        model.hf(**compat.with_cache(model.hf, cache, **step))
    torch.testing.assert_close(_logits(model, batch), _logits(model, batch))
    assert not model.hf._forward_hooks and not model.hf._forward_pre_hooks  # removed on the exception


def test_a_block_where_the_model_never_ran_raises(trained):
    model, uld = trained
    with pytest.raises(UnlearnError, match="no forward pass"), uld.applied(model):
        pass


def test_an_assistant_of_another_model_is_refused(trained):
    _, uld = trained
    import copy

    import steerlab

    base = tiny_model("qwen2")
    hf = copy.deepcopy(base.hf)  # tiny models are shared: never edit one in place
    hf.resize_token_embeddings(416)  # another vocabulary
    other = steerlab.load(hf, base.tokenizer)
    with pytest.raises(SteerlabError, match="vocabulary"), uld.applied(other):
        pass


def test_save_and_load_round_trip(trained, tmp_path):
    model, uld = trained
    path = uld.save(tmp_path / "uld")
    again = ULD.load(path)
    assert again.alpha == 0.8
    batch = model.encode(PROMPTS)
    # last positions: padded ones differ between attention kernels (the reload picks sdpa)
    torch.testing.assert_close(_logits(again.assistant, batch)[:, -1], _logits(uld.assistant, batch)[:, -1])
    assert ULD.load(path, alpha=0.3).alpha == 0.3


def test_lora_assistant_trains_only_adapters():
    model = tiny_model("llama")
    uld = train_uld(model, FORGET, RETAIN, layers=2, target=LoRA(r=2), config=UnlearnConfig(steps=3, lr=1e-2))
    assert uld.assistant.n_layers == 2
    assert not any("lora" in n for n, _ in uld.assistant.hf.named_parameters())  # merged back


def test_forgetting_report_measures_inside_the_scope(trained):
    from steerlab.eval.answers import answer_probability
    from steerlab.training.unlearn.evaluate import forgetting_report

    model, uld = trained
    report = forgetting_report(model, model, FORGET, RETAIN, ["Say hello."], max_new_tokens=2, after_scope=uld.applied)
    with uld.applied(model):
        inside = float(answer_probability(model, FORGET).mean())
    assert report.forget_p[1] == pytest.approx(inside) and report.forget_p[0] != pytest.approx(inside)
    assert report.kl_harmless > 0


def test_a_cropped_cache_is_followed(trained):
    """The policy decoder's look-ahead: advance, crop the target cache back, advance differently — the assistant follows."""
    from steerlab import compat

    model, uld = trained
    batch = model.encode(["Hi there"])
    ids, mask = batch.input_ids, batch.attention_mask

    def step(cache, token, length):
        inputs = {"input_ids": torch.tensor([[token]]), "attention_mask": torch.ones(1, length, dtype=torch.long)}
        return model.hf(**compat.with_cache(model.hf, cache, **inputs)).logits[0, -1]

    with uld.applied(model), torch.no_grad():
        out = model.hf(**compat.with_cache(model.hf, None, input_ids=ids, attention_mask=mask))
        cache, n = compat.output_cache(out), ids.shape[1]
        step(cache, 7, n + 1)
        step(cache, 8, n + 2)  # a branch two tokens deep ...
        compat.crop_cache(cache, n)  # ... undone
        got = step(cache, 9, n + 1)
    full = torch.cat([ids, torch.tensor([[9]])], dim=1)
    with torch.no_grad():
        want = model.hf(input_ids=full, use_cache=False).logits[0, -1] - 0.8 * uld.assistant.hf(
            input_ids=full, use_cache=False).logits[0, -1]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_bad_alpha_fails_before_training():
    with pytest.raises(SteerlabError, match="alpha"):
        train_uld(tiny_model("llama"), FORGET, RETAIN, layers=1, alpha=0.0, config=UnlearnConfig(steps=1))


@pytest.mark.parametrize("family", FAMILIES)
def test_assistant_of_every_family_runs_the_first_layers(family):
    model = tiny_model(family)
    assistant = build_assistant(model, layers=2)
    ids = model.encode(["Hi there"]).input_ids
    with torch.no_grad():
        ours = assistant.hf(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        theirs = model.hf(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    torch.testing.assert_close(ours[1], theirs[1])  # layer 0's output (the last entry is the final norm's)
    for name, value in vars(assistant.config).items():
        if isinstance(value, list) and name != "mlp_only_layers":
            assert len(value) != 3, f"{family}: {name} still has one entry per original layer"
