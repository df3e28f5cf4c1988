"""LoRA fine-tuning with refusal tokens on tiny models: behaviour, isolation, determinism, saving."""

import pytest
import torch

import steerlab
from steerlab.interventions.refusal_tokens import RefusalTokens, generate_with_refusal_tokens, refusal_token_probs
from steerlab.testing import tiny_model, tiny_tokenizer
from steerlab.training.data import control_tokens, encode_examples, refusal_token_examples
from steerlab.training.sft import FineTuneError, SFTConfig, add_tokens, collate, finetune, weighted_lm_loss

HARMFUL = ["Tell me a joke about cats.", "How do I bake bread at home?"]  # "refusal-labelled" stand-ins
HARMLESS = ["What is the capital of France?", "Write a short poem about the sea."]
ANSWERS = ["Paris.", "The sea is blue."]
REFUSALS = ["Sorry, no.", "I can not help."]
FAST = SFTConfig(r=8, alpha=16, lr=1e-2, token_lr=1e-2, epochs=30, batch_size=4, max_length=64, num_threads=1)


def _examples():
    return refusal_token_examples(HARMFUL, HARMLESS, answers=ANSWERS, refusals=REFUSALS)


def test_lora_run_learns_the_refusal_token_decision_and_leaves_the_base_model_alone():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.hf.state_dict().items()}
    n_vocab = len(model.tokenizer)
    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    result = finetune(model, _examples(), new_tokens=control_tokens(), config=FAST, progress=False)
    assert torch.get_num_threads() == threads and torch.equal(torch.random.get_rng_state(), rng)  # both restored

    # behaviour: p([refuse]) at the first step is higher on every refusal-labelled prompt than on any other
    tokens = RefusalTokens.from_tokenizer(result.model.tokenizer)
    p = refusal_token_probs(result.model, HARMFUL + HARMLESS, tokens)[:, 0]
    assert float(p[:2].min()) > float(p[2:].max())
    assert float(p[:2].min()) > 0.5 and float(p[2:].max()) < 0.1
    outs = generate_with_refusal_tokens(result.model, HARMFUL + HARMLESS, tokens, max_new_tokens=16)
    assert [o.refused for o in outs] == [True, True, False, False]
    assert [o.text for o in outs[2:]] == ANSWERS  # overfitted answers, control tokens hidden
    assert all(o.text in REFUSALS for o in outs[:2])
    assert result.losses[-1] < 0.2 * result.losses[0] and len(result.losses) == result.steps == 30

    # the new tokens exist in the result only; the caller's model and shared tokenizer are untouched
    assert set(result.new_token_ids) == {"[refuse]", "[respond]"} and min(result.new_token_ids.values()) >= n_vocab
    assert len(model.tokenizer) == n_vocab == len(tiny_tokenizer())
    assert all(torch.equal(v, model.hf.state_dict()[k]) for k, v in before.items())
    # only the new rows of the embedding and the LM head were trained (LoRA does not touch them)
    emb, head = result.model.hf.get_input_embeddings().weight, result.model.hf.get_output_embeddings().weight
    assert emb.shape[0] == n_vocab + 2 and head.shape[0] == n_vocab + 2
    assert torch.equal(emb[:n_vocab], before["model.embed_tokens.weight"]) and torch.equal(head[:n_vocab], before["lm_head.weight"])
    # the merged model is a plain transformers model: no peft wrappers left
    assert not any("lora" in name for name, _ in result.model.hf.named_parameters())


def test_per_category_refusal_tokens_pick_the_trained_category():
    model = tiny_model("llama")
    tokens = {"jokes": "[refuse:jokes]", "baking": "[refuse:baking]"}
    examples = refusal_token_examples(HARMFUL, HARMLESS, answers=ANSWERS, refusals=REFUSALS, refuse_token=tokens, categories=["jokes", "baking"])
    result = finetune(model, examples, new_tokens=control_tokens(tokens), config=FAST, progress=False)
    rt = RefusalTokens.from_tokenizer(result.model.tokenizer, refuse=tokens, tau=0.3)
    outs = generate_with_refusal_tokens(result.model, HARMFUL + HARMLESS, rt, max_new_tokens=4)
    assert [o.category for o in outs] == ["jokes", "baking", None, None]


def test_tied_embeddings_stay_tied_and_runs_are_seeded():
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tiny_tokenizer()
    cfg = AutoConfig.for_model(
        "llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = steerlab.load(AutoModelForCausalLM.from_config(cfg), tok)
    cfg_small = SFTConfig(r=8, alpha=16, lr=1e-2, token_lr=1e-2, max_steps=25, batch_size=2, grad_accum=2, max_length=64, seed=3, num_threads=1)
    a = finetune(model, _examples(), new_tokens=control_tokens(), config=cfg_small, progress=False)
    b = finetune(model, _examples(), new_tokens=control_tokens(), config=cfg_small, progress=False)
    assert a.losses == b.losses and len(a.losses) == 25
    hf = a.model.hf
    assert hf.get_input_embeddings().weight.data_ptr() == hf.get_output_embeddings().weight.data_ptr()
    p = refusal_token_probs(a.model, HARMFUL + HARMLESS, RefusalTokens.from_tokenizer(a.model.tokenizer))[:, 0]
    assert float(p[:2].min()) > float(p[2:].max())


def test_save_and_reload_round_trip(tmp_path):
    model = tiny_model("qwen2")
    result = finetune(model, _examples(), new_tokens=control_tokens(), config=SFTConfig(max_steps=2, batch_size=4, max_length=64, num_threads=1), progress=False)
    path = result.save(tmp_path / "model")
    again = steerlab.load(str(path))
    assert again.tokenizer.convert_tokens_to_ids("[refuse]") == result.new_token_ids["[refuse]"]
    batch = result.model.encode(HARMLESS)
    with torch.inference_mode():
        ref = result.model.hf(**batch.model_inputs()).logits[:, -1]
        got = again.hf(**again.encode(HARMLESS).model_inputs()).logits[:, -1]
    assert torch.allclose(ref, got, atol=1e-4)  # the reload picks sdpa attention, the tiny model eager


def test_weighted_loss_reduces_to_the_transformers_loss_and_weights_the_first_token():
    model = add_tokens(tiny_model("llama"), control_tokens())
    encoded = encode_examples(model.chat(), _examples())
    batch = collate(encoded, pad_id=model.tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (4, max(len(e) for e in encoded))
    assert torch.equal(batch["weights"] > 0, batch["labels"] != -100) and int(batch["attention_mask"].sum()) == sum(len(e) for e in encoded)
    with torch.no_grad():
        out = model.hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        ours = weighted_lm_loss(out.logits, batch["labels"], batch["weights"])
        assert float(ours) == pytest.approx(float(out.loss), rel=1e-5)
        heavy = collate(encoded, pad_id=0, first_token_weight=5.0)
        firsts = [e.supervised[0] for e in encoded]
        assert [float(heavy["weights"][i, j]) for i, j in enumerate(firsts)] == [5.0] * 4
        # by hand: per-token cross-entropy, the first supervised token of each row counted five times
        logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
        num = den = 0.0
        for i, e in enumerate(encoded):
            for j in e.supervised:
                w = 5.0 if j == e.supervised[0] else 1.0
                num += -w * float(logp[i, j - 1, e.labels[j]])
                den += w
        assert float(weighted_lm_loss(out.logits, heavy["labels"], heavy["weights"])) == pytest.approx(num / den, rel=1e-5)


def test_add_tokens_copies_and_settings_are_checked():
    model = tiny_model("llama")
    m2 = add_tokens(model, ["[refuse]", "[respond]", "[refuse]"])
    assert len(m2.tokenizer) == len(model.tokenizer) + 2 and m2.hf is not model.hf
    assert m2.hf.get_input_embeddings().weight.shape[0] == len(m2.tokenizer)
    with pytest.raises(FineTuneError, match="non-empty"):
        add_tokens(model, [""])
    with pytest.raises(FineTuneError, match="batch_size"):
        SFTConfig(batch_size=0)
    with pytest.raises(FineTuneError, match="lr"):
        SFTConfig(lr=0.0)
