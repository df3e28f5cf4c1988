"""Training data: masked encoding, refusal-token and DeRTa builders, JSONL, and data selection vs manual scores."""

import copy
import json

import pytest
import torch

from steerlab.chat import ChatFormat
from steerlab.errors import EmptyInputError, ShapeError
from steerlab.probes import LatentGuard, Probe, trace
from steerlab.steering import Direction
from steerlab.testing import tiny_model, tiny_tokenizer
from steerlab.training.data import (
    IGNORE_INDEX,
    SFTExample,
    TrainingDataError,
    control_tokens,
    derta_examples,
    encode_examples,
    end_of_turn_text,
    read_jsonl,
    refusal_token_examples,
    write_jsonl,
)
from steerlab.training.selection import Ranking, SelectionError, rank_by_direction, rank_by_guard, rank_by_probe

PROMPTS = ["Write a short poem about the sea.", "Hi", "Explain how vaccines work.", "Tell me a joke about cats.", "What is the capital of France?"]
RESPONSES = ["The sea is blue.", "Hello there!", "They train the immune system.", "Cats jump.", "Paris."]


def _tok_with_controls(template="chatml", tokens=("[refuse]", "[respond]")):
    tok = copy.deepcopy(tiny_tokenizer(template))  # the fixture tokenizer is shared: never add tokens to it
    tok.add_tokens(list(tokens), special_tokens=True)
    return tok


# ----- encoding and masking -----
@pytest.mark.parametrize("template,eot", [("chatml", "<|im_end|>\n"), ("llama3", "<|eot_id|>"), ("gemma", "<end_of_turn>\n"), ("mistral", "</s>")])
def test_end_of_turn_text_per_template(template, eot):
    assert end_of_turn_text(ChatFormat(tiny_tokenizer(template))) == eot


@pytest.mark.parametrize("template", ["chatml", "llama3", "gemma", "mistral"])
def test_only_target_and_end_of_turn_tokens_are_supervised(template):
    tok = _tok_with_controls(template)
    fmt = ChatFormat(tok)
    examples = [SFTExample(prompt=p, target="[respond]" + r) for p, r in zip(PROMPTS, RESPONSES)]
    encoded = encode_examples(fmt, examples)
    prompt_rows = fmt.tokenize(PROMPTS)
    eot_ids = tok(end_of_turn_text(fmt), add_special_tokens=False)["input_ids"]
    for enc, row, ex in zip(encoded, prompt_rows, examples):
        target_ids = tok(ex.target, add_special_tokens=False)["input_ids"]
        n_prompt = len(row[0])
        # the prompt is tokenized exactly as inference renders it, and carries no loss
        assert list(enc.input_ids[:n_prompt]) == list(row[0]) and enc.prompt_length == n_prompt
        assert all(label == IGNORE_INDEX for label in enc.labels[:n_prompt])
        # exactly the response tokens (target + end of turn) are supervised, with their own ids as labels
        assert enc.supervised == tuple(range(n_prompt, len(enc)))
        assert list(enc.labels[n_prompt:]) == target_ids + eot_ids == list(enc.input_ids[n_prompt:])
        assert enc.input_ids[n_prompt] == tok.convert_tokens_to_ids("[respond]")
        assert tok.decode([enc.input_ids[i] for i in enc.supervised]) == ex.target + end_of_turn_text(fmt)


def test_context_is_not_supervised_and_end_turn_can_be_left_out():
    tok = _tok_with_controls()
    fmt = ChatFormat(tok)
    ex = SFTExample(prompt="Hi", context="Step one: gather", target=" Sorry, no.", end_turn=False)
    enc = encode_examples(fmt, [ex])[0]
    n_prompt = len(fmt.tokenize(["Hi"])[0][0])
    n_ctx = len(tok("Step one: gather", add_special_tokens=False)["input_ids"])
    target_ids = tok(" Sorry, no.", add_special_tokens=False)["input_ids"]
    assert enc.supervised == tuple(range(n_prompt + n_ctx, len(enc)))
    assert [enc.labels[i] for i in enc.supervised] == target_ids  # no end-of-turn tokens
    assert tok.decode(enc.input_ids[n_prompt : n_prompt + n_ctx]) == "Step one: gather"


def test_max_length_cuts_the_target_tail_and_rejects_examples_without_room():
    fmt = ChatFormat(_tok_with_controls())
    ex = SFTExample(prompt="Hi", target="[respond]" + "The quick brown fox jumps over the lazy dog. " * 3)
    full = encode_examples(fmt, [ex])[0]
    cut = encode_examples(fmt, [ex], max_length=full.prompt_length + 5)[0]
    assert len(cut) == full.prompt_length + 5 and cut.input_ids == full.input_ids[: len(cut)] and len(cut.supervised) == 5
    with pytest.raises(TrainingDataError, match="max_length"):
        encode_examples(fmt, [ex], max_length=full.prompt_length)
    with pytest.raises(TrainingDataError, match="empty target"):
        encode_examples(fmt, [SFTExample(prompt="Hi", target="")])
    with pytest.raises(EmptyInputError):
        encode_examples(fmt, [])


# ----- refusal-token builder -----
def test_refusal_token_examples_put_the_control_token_first():
    harmful, harmless = PROMPTS[:2], PROMPTS[2:]
    refusals = ["Sorry, no.", "I can not help."]
    ex = refusal_token_examples(harmful, harmless, answers=RESPONSES[2:], refusals=refusals, answers_complete=[True, False, True])
    assert [e.kind for e in ex] == ["refuse"] * 2 + ["respond"] * 3
    assert [e.prompt for e in ex] == harmful + harmless
    for e in ex[:2]:
        assert e.target.startswith("[refuse]") and e.target[len("[refuse]") :] in refusals
    assert [e.target for e in ex[2:]] == ["[respond]" + a for a in RESPONSES[2:]]
    assert [e.end_turn for e in ex[2:]] == [True, False, True]
    # seeded: same seed, same refusals
    again = refusal_token_examples(harmful, harmless, answers=RESPONSES[2:], refusals=refusals)
    assert [e.target for e in again[:2]] == [e.target for e in ex[:2]]
    # the first supervised token is the control token, in the encoded rows too
    tok = _tok_with_controls()
    enc = encode_examples(ChatFormat(tok), ex)
    first = [e.input_ids[e.supervised[0]] for e in enc]
    assert first == [tok.convert_tokens_to_ids("[refuse]")] * 2 + [tok.convert_tokens_to_ids("[respond]")] * 3


def test_per_category_refusal_tokens():
    tokens = {"crime": "[refuse:crime]", "weapons": "[refuse:weapons]"}
    assert control_tokens(tokens) == ["[refuse:crime]", "[refuse:weapons]", "[respond]"]
    ex = refusal_token_examples(["a", "b"], ["c"], answers=["C."], refusals=["No."], refuse_token=tokens, categories=["weapons", "crime"])
    assert [e.target for e in ex] == ["[refuse:weapons]No.", "[refuse:crime]No.", "[respond]C."]
    assert ex[0].meta == {"category": "weapons"}
    with pytest.raises(TrainingDataError, match="one category per harmful prompt"):
        refusal_token_examples(["a"], [], answers=[], refusals=["No."], refuse_token=tokens)
    with pytest.raises(TrainingDataError, match="no refusal token"):
        refusal_token_examples(["a"], [], answers=[], refusals=["No."], refuse_token=tokens, categories=["fraud"])
    with pytest.raises(TrainingDataError, match="one per prompt"):
        refusal_token_examples(["a"], ["b", "c"], answers=["B."], refusals=["No."])
    with pytest.raises(TrainingDataError, match="also a refusal token"):
        control_tokens("[x]", "[x]")


# ----- DeRTa builder -----
def test_derta_prefixes_are_within_bounds_and_a_third_have_none():
    n = 30
    harmful = [f"placeholder harmful request {i}" for i in range(n)]
    responses = [" ".join(f"w{i}_{j}" for j in range(3 + i % 9)) + "\nmore" for i in range(n)]  # 4..12 words
    refusals = ["I can't help with that.", "No, I won't do this."]
    ex = derta_examples(harmful, responses, refusals, seed=1)
    bare = [e for e in ex if e.meta["prefix_words"] == 0]
    assert len(bare) == round(n / 3) == 10
    for e, response in zip(ex, responses):
        words = response.split()
        assert e.meta["response_words"] == len(words) and e.kind == "derta"
        if e.meta["prefix_words"] == 0:
            assert e.context == "" and e.target in refusals
            continue
        k = e.meta["prefix_words"]
        assert 1 <= k <= len(words) - 2
        assert response.startswith(e.context) and e.context.split() == words[:k]  # ends at a word boundary
        assert e.target[0] == " " and e.target[1:] in refusals
    lengths = {e.meta["prefix_words"] for e in ex if e.meta["prefix_words"]}
    assert len(lengths) > 3  # random lengths, not one fixed cut
    assert [e.context for e in derta_examples(harmful, responses, refusals, seed=1)] == [e.context for e in ex]
    assert derta_examples(harmful[:3], responses[:3], refusals, no_prefix_fraction=1.0)[0].context == ""
    # encoded: the prefix is input only, the refusal is the whole loss
    tok = _tok_with_controls()
    fmt = ChatFormat(tok)
    e = next(e for e in ex if e.meta["prefix_words"] > 0)
    enc = encode_examples(fmt, [e])[0]
    assert tok.decode([enc.input_ids[i] for i in enc.supervised]) == e.target + end_of_turn_text(fmt)


def test_derta_rejects_short_responses_and_mismatched_inputs():
    with pytest.raises(TrainingDataError, match="at least 3"):
        derta_examples(["a"], ["two words"], ["No."], no_prefix_fraction=0.0)
    with pytest.raises(TrainingDataError, match="one per prompt"):
        derta_examples(["a", "b"], ["one two three"], ["No."])
    with pytest.raises(TrainingDataError, match="no_prefix_fraction"):
        derta_examples(["a"], ["one two three"], ["No."], no_prefix_fraction=1.5)
    with pytest.raises(EmptyInputError):
        derta_examples(["a"], ["one two three"], [])


def test_jsonl_round_trip(tmp_path):
    ex = refusal_token_examples(["a"], ["b"], answers=["B."], refusals=["No."], refuse_token={"crime": "[r]"}, categories=["crime"])
    path = write_jsonl(tmp_path / "sft.jsonl", ex)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["messages"] == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "[r]No."}]
    assert rows[0]["kind"] == "refuse" and rows[0]["category"] == "crime"
    back = read_jsonl(path)
    assert [(e.prompt, e.target, e.kind) for e in back] == [(e.prompt, e.target, e.kind) for e in ex]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(TrainingDataError, match="final assistant turn"):
        read_jsonl(tmp_path / "bad.jsonl")


# ----- selection -----
def _hidden(model, prompt, response, layer, position="last"):
    """resid_pre of ``layer`` for one prompt (+ response), computed without steerlab's collector."""
    fmt = model.chat()
    ids = fmt.tokenize([prompt], responses=[response] if response is not None else None)[0]
    with torch.inference_mode():
        hs = model.hf(input_ids=torch.tensor([ids[0]]), output_hidden_states=True).hidden_states
    index = {"last": len(ids[0]) - 1, "t_inst": ids[1]}[position]
    return hs[layer][0, index]


def _random_probe(model, layer, seed=0):
    """A random probe scaled so its logits are O(1) on this model (no saturated, tied probabilities)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(1, model.d_model, generator=g)
    scale = 2.0 / (w.norm() * _hidden(model, PROMPTS[0], None, layer).norm())
    return Probe(weights=w * scale, bias=torch.tensor([0.1]), layers=(layer,))


def test_rank_by_probe_matches_a_manual_cliff_as_a_judge_ranking(tmp_path):
    model = tiny_model("llama")
    probe = _random_probe(model, 1)
    ranking = rank_by_probe(model, probe, PROMPTS, responses=RESPONSES, batch_size=2)
    w, b = probe.weights[0].double(), float(probe.bias[0])
    manual = torch.tensor([float(torch.sigmoid(_hidden(model, p, r, 1).double() @ w + b)) for p, r in zip(PROMPTS, RESPONSES)])
    assert torch.allclose(torch.tensor(ranking.scores, dtype=torch.float64), manual.double(), atol=1e-5)
    expected = sorted(range(len(PROMPTS)), key=lambda i: float(manual[i]))  # lowest refusal score first
    assert list(ranking.order) == expected
    # the same score as the position trace's final token
    final = trace(model, probe, PROMPTS, responses=RESPONSES, progress=False).final()
    assert torch.allclose(torch.tensor(ranking.scores, dtype=torch.float32), final, atol=1e-5)
    assert ranking.top(2) == tuple(expected[:2]) and ranking.top(fraction=0.4) == tuple(expected[:2])
    # JSONL ready for fine-tuning: best first, with score and rank, the scoring responses by default
    path = ranking.to_jsonl(tmp_path / "top.jsonl", k=3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["index"] for r in rows] == expected[:3] and [r["rank"] for r in rows] == [0, 1, 2]
    assert rows[0]["messages"] == [{"role": "user", "content": PROMPTS[expected[0]]}, {"role": "assistant", "content": RESPONSES[expected[0]]}]
    assert rows[0]["score"] == pytest.approx(float(manual[expected[0]]), abs=1e-5)
    # safety fine-tuning writes refusals instead of the scored responses
    safe = ranking.records(k=2, responses=lambda p: "Sorry, no.")
    assert {r["messages"][1]["content"] for r in safe} == {"Sorry, no."}
    assert [e.prompt for e in ranking.examples(k=2)] == [PROMPTS[i] for i in expected[:2]]


def test_rank_by_probe_generates_or_reads_the_last_prompt_token():
    model = tiny_model("qwen2")
    probe = _random_probe(model, 2, seed=3)
    generated = rank_by_probe(model, probe, PROMPTS[:3], max_new_tokens=3)
    assert generated.responses == tuple(model.generate(PROMPTS[:3], max_new_tokens=3))
    prompt_only = rank_by_probe(model, probe, PROMPTS[:3], lowest_first=False)
    w, b = probe.weights[0].double(), float(probe.bias[0])
    manual = [float(torch.sigmoid(_hidden(model, p, None, 2).double() @ w + b)) for p in PROMPTS[:3]]
    assert prompt_only.scores == pytest.approx(manual, abs=1e-5)
    assert list(prompt_only.order) == sorted(range(3), key=lambda i: -manual[i])
    with pytest.raises(SelectionError, match="no responses"):
        prompt_only.records(k=1)


def test_rank_by_guard_and_by_direction_match_manual_scores():
    model = tiny_model("llama")
    guard = LatentGuard.fit(model, PROMPTS[:2], PROMPTS[2:4], layers=[1, 2])
    ranking = rank_by_guard(guard, PROMPTS)
    scores = guard.score(PROMPTS)
    assert ranking.scores == pytest.approx(scores.tolist(), abs=1e-6)
    assert list(ranking.order) == sorted(range(len(PROMPTS)), key=lambda i: -float(scores[i]))  # most harmful first
    assert ranking.method == "guard:LatentGuard"

    g = torch.Generator().manual_seed(1)
    direction = Direction(vectors=torch.randn(1, model.d_model, generator=g), layers=(2,), position="t_inst")
    proj = rank_by_direction(model, direction, PROMPTS)
    v = direction.at(2).double()
    manual = torch.stack([_hidden(model, p, None, 2, "t_inst").double() for p in PROMPTS])
    assert proj.scores == pytest.approx((manual @ (v / v.norm())).tolist(), abs=1e-5)
    assert list(proj.order) == sorted(range(len(PROMPTS)), key=lambda i: -proj.scores[i])
    cos = rank_by_direction(model, direction, PROMPTS, metric="cosine", lowest_first=True)
    assert cos.scores == pytest.approx(torch.nn.functional.cosine_similarity(manual, v[None], dim=-1).tolist(), abs=1e-5)
    assert list(cos.order) == sorted(range(len(PROMPTS)), key=lambda i: cos.scores[i])
    with pytest.raises(SelectionError, match="metric"):
        rank_by_direction(model, direction, PROMPTS, metric="distance")
    with pytest.raises(ShapeError, match="'all'"):
        rank_by_direction(model, direction, PROMPTS, position="all")


def test_ranking_ties_counts_and_errors():
    r = Ranking.from_scores(["a", "b", "c", "d"], [0.5, 0.2, 0.5, 0.9], method="manual", lowest_first=True)
    assert r.order == (1, 0, 2, 3)  # ties keep input order
    assert r.top(fraction=0.1) == (1,) and r.count(fraction=1.0) == 4
    for kwargs in ({"k": 0}, {"k": 5}, {"fraction": 0.0}, {}, {"k": 1, "fraction": 0.5}):
        with pytest.raises(SelectionError):
            r.top(**kwargs)
    with pytest.raises(SelectionError, match="one response per candidate"):
        r.records(k=1, responses=["x"])
    with pytest.raises(SelectionError, match="NaN"):
        Ranking.from_scores(["a"], [float("nan")], method="m", lowest_first=True)
    with pytest.raises(EmptyInputError):
        rank_by_guard(object(), [])
