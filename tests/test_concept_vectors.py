"""Parametric concept vectors (METHODS 8): column addressing, ColumnEdit hook vs baked weights on every family,
the vocabulary search finding a planted column, and the noise validation."""

from __future__ import annotations

import pytest
import torch

from steerlab.arch import resolve_path
from steerlab.errors import EmptyInputError, SteerlabError
from steerlab.eval import answer_probability, concept_effect
from steerlab.eval.answers import QA
from steerlab.eval.concepts import noise_validation
from steerlab.interventions import ColumnEdit, ColumnIndexError
from steerlab.interventions.columns import column_groups, layer_groups, noise_edit, resolve_column
from steerlab.measure import column_activations
from steerlab.measure.columns import random_columns
from steerlab.steering import find_concept_vectors
from steerlab.steering.concept_vectors import ConceptTokenError, VocabProjection, concept_token_ids
from steerlab.testing import FAMILIES, tiny_model
from steerlab.training import bake, parity
from steerlab.training.manifest import history

PROMPTS = ["Write a short poem about the sea.", "Hi there", "Tell me a joke about cats."]
TOL = 1e-4


def _logits(model, prompts=PROMPTS):
    batch = model.encode(prompts)
    with torch.inference_mode():
        out = model.hf(**batch.model_inputs()).logits
    return out[batch.attention_mask.bool()]


def _some_columns(model) -> list:
    """Three columns of every group of every layer: dense MLPs, every routed expert, shared experts."""
    cols = []
    for layer in range(model.n_layers):
        for g in layer_groups(model, layer):
            cols += [g.address(0), g.address(g.n_columns // 2), g.address(-1)]
    return cols


@pytest.mark.parametrize("family", FAMILIES)
def test_column_edit_hook_matches_baked_weights_on_every_family(family):
    model = tiny_model(family)
    plain = _logits(model)
    cols = _some_columns(model)
    noise = torch.randn(len(cols), model.d_model, generator=torch.Generator().manual_seed(3)) * 0.3
    for iv in (ColumnEdit(cols, scale=0.0), ColumnEdit(cols, scale=2.5, add=noise)):
        baked = bake(model, iv)
        report = parity(model, baked, iv, PROMPTS, max_new_tokens=0)
        assert report.max_abs_logit_diff <= TOL, f"{family}: {report}"
        assert float((_logits(baked) - plain).abs().max()) > 1e-3, f"{family}: the edit changed nothing"
        assert history(baked.hf)[-1]["intervention"]["type"] == "ColumnEdit"
    torch.testing.assert_close(_logits(model), plain, atol=0, rtol=0)  # source untouched


@pytest.mark.parametrize(("family", "layer"), [("llama", 0), ("gemma2", 2), ("qwen2_moe", 1), ("deepseek_v3", 0)])
def test_ablating_a_linear_column_equals_zeroing_its_neuron(family, layer):
    """Independent oracle: zero the down projection's input at that neuron with a plain pre-hook
    (dense MLPs and shared experts)."""
    model = tiny_model(family)
    group = next(g for g in layer_groups(model, layer) if not isinstance(g.expert, int))
    down = resolve_path(model.hf, group.module)

    def zero(module, args):
        x = args[0].clone()
        x[..., [3, 7]] = 0.0
        return (x, *args[1:])

    handle = down.register_forward_pre_hook(zero)
    try:
        expected = _logits(model)
    finally:
        handle.remove()
    with model.apply(ColumnEdit([group.address(3), group.address(7)], scale=0.0)):
        got = _logits(model)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_greedy_generation_agrees_for_an_expert_edit():
    model = tiny_model("gpt_oss")
    iv = ColumnEdit([(1, 0, 3), (2, 3, 5), (2, 1, -1)], scale=0.0)
    report = parity(model, bake(model, iv), iv, PROMPTS[:2], max_new_tokens=6)
    assert report.generation_match == 1.0 and report.ok(TOL), report


def test_groups_cover_dense_routed_and_shared_columns():
    qwen_moe = tiny_model("qwen2_moe")
    groups = layer_groups(qwen_moe, 1)
    assert [g.expert for g in groups] == [0, 1, 2, 3, "shared"]
    assert {g.n_columns for g in groups[:4]} == {32} and groups[-1].n_columns == 48
    gpt = tiny_model("gpt_oss")
    g = layer_groups(gpt, 0)[2]
    assert g.neuron_axis == 0  # transposed: down_proj [E, I, d]
    torch.testing.assert_close(g.vectors(gpt), gpt.hf.model.layers[0].mlp.experts.down_proj[2].detach())
    ds = tiny_model("deepseek_v3")
    assert layer_groups(ds, 0)[0].expert is None and layer_groups(ds, 1)[-1].expert == "shared"
    assert sum(g.n_columns for g in column_groups(tiny_model("llama"))) == 3 * 96


def test_bad_addresses_name_the_problem():
    dense, moe = tiny_model("llama"), tiny_model("mixtral")
    cases = [
        (dense, (0, 1, 2), "dense MLP"),
        (moe, (1, 5), "MoE layer"),
        (moe, (1, "shared", 0), "no shared expert"),
        (moe, (1, 9, 0), "expert 9 is out of range"),
        (dense, (0, 96), "column 96 is out of range"),
        (dense, (7, 0), "layer 7 is out of range"),
        (dense, ("a", 0), "int indices"),
    ]
    for model, column, needle in cases:
        with pytest.raises(SteerlabError, match=needle):
            resolve_column(model, column)
    with pytest.raises(ColumnIndexError, match="listed twice"):
        ColumnEdit([(0, 1), (-3, 1)]).targets(dense)
    with pytest.raises(SteerlabError, match="add must be"):
        ColumnEdit([(0, 1)], add=torch.zeros(2, 64))
    with pytest.raises(SteerlabError, match="at least one"):
        ColumnEdit([])
    assert resolve_column(dense, (-1, -1))[1] == 95


def test_concept_tokens_cover_variants_and_refuse_unknown_words():
    tok = tiny_model("llama").tokenizer
    ids = concept_token_ids(tok, ["poem"])
    assert tok.encode(" poem", add_special_tokens=False)[0] in ids
    assert concept_token_ids(tok, [5, 7]) == (5, 7)
    with pytest.raises(ConceptTokenError, match="single token") as info:
        concept_token_ids(tok, ["Qzxjvw"])
    assert isinstance(info.value, SteerlabError) and "token ids" in str(info.value)
    with pytest.raises(ConceptTokenError, match="out of range"):
        concept_token_ids(tok, [10**6])


def test_vocab_zscores_are_exact():
    model = tiny_model("qwen2")
    vp = VocabProjection(model)
    x = vp.inputs(torch.randn(5, model.d_model, generator=torch.Generator().manual_seed(0)))
    full = vp.logits(x).double()
    expected = (full - full.mean(-1, keepdim=True)) / full.std(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(vp.zscores(x, [3, 50, 200]), expected[:, [3, 50, 200]], atol=1e-4, rtol=1e-4)


def _plant(model, column, token_id: int, *, gain: float = 1.0):
    """Set one column to (gain times) the unembedding row of ``token_id``; returns the edited model."""
    planted = bake(model, ColumnEdit([column], scale=0.0, add=gain * model.hf.lm_head.weight[token_id][None].detach()))
    return planted


@pytest.mark.parametrize(("family", "column"), [("llama", (1, 40)), ("qwen2_moe", (2, 3, 17)), ("gpt_oss", (1, 2, 5)),
                                                ("deepseek_v3", (2, "shared", 4)), ("gemma2", (0, 11))])  # fmt: skip
def test_search_finds_a_planted_column_first(family, column):
    model = tiny_model(family)
    token = model.tokenizer.encode(" poem", add_special_tokens=False)[0]
    planted = _plant(model, column, token, gain=-1.0 if family == "gpt_oss" else 1.0)
    search = find_concept_vectors(planted, [token], top_k=10, shortlist=50)
    first = search.hits[0]
    assert first.column == resolve_column(planted, column)[0].address(resolve_column(planted, column)[1])
    assert first.sign == (-1 if family == "gpt_oss" else 1)
    assert model.tokenizer.decode([token]) == first.top_tokens[0]
    assert "L" in search.table(3) and search.columns(1) == [first.column]
    assert search.edit(2).columns == tuple(search.columns(2)) and len(set(search.columns())) == len(search.columns())
    plus_only = find_concept_vectors(planted, [token], top_k=10, both_signs=False, shortlist=None)
    if family != "gpt_oss":
        assert plus_only.hits[0].column == first.column


def test_ranking_by_fraction_and_shortlist_agree_with_the_exhaustive_search():
    model = _plant(tiny_model("llama"), (2, 5), 40)
    exact = find_concept_vectors(model, [40, 41, 42], top_k=15, shortlist=None)
    short = find_concept_vectors(model, [40, 41, 42], top_k=15, shortlist=200)
    assert exact.columns(3) == short.columns(3)
    frac = find_concept_vectors(model, [40, 41, 42], top_k=15, rank_by="fraction", shortlist=None)
    counts = [h.n_in_top for h in frac.hits]
    assert counts == sorted(counts, reverse=True)
    scores = [h.score for h in exact.hits]
    assert scores == sorted(scores, reverse=True) and all(h.n_in_top >= 1 for h in exact.hits)


def test_noise_edit_is_methods_8_gaussian_noise():
    model = tiny_model("llama")
    cols = random_columns(model, 200, seed=1)
    edit = noise_edit(model, cols, seed=4)
    assert edit.scale == 1.0 and edit.add.shape == (200, model.d_model)
    assert abs(float(edit.add.mean())) < 0.005 and abs(float(edit.add.std()) - 0.1) < 0.002
    torch.testing.assert_close(noise_edit(model, cols, seed=4).add, edit.add, atol=0, rtol=0)
    assert not torch.equal(noise_edit(model, cols, seed=5).add, edit.add)
    baked = bake(model, edit)  # columns become v + eps
    group, j = resolve_column(model, cols[0])
    torch.testing.assert_close(
        group.vectors(baked, [j])[0], group.vectors(model, [j])[0] + edit.add[0], atol=1e-6, rtol=0
    )


def test_noise_validation_measures_concept_and_control_under_the_noise():
    model = tiny_model("llama")
    concept = [QA("Write a short poem", ("poem",)), QA("Tell me a poem", ("sea",))]
    control = [QA("How do I bake bread?", ("bread",)), QA("What is the capital of France?", ("Paris",))]
    cols = random_columns(model, 20, seed=2)
    effect = noise_validation(model, cols, concept, control, std=0.1, seed=3)
    with model.apply(noise_edit(model, cols, std=0.1, seed=3)):
        torch.testing.assert_close(effect.concept_after, answer_probability(model, concept))
        torch.testing.assert_close(effect.control_after, answer_probability(model, control))
    torch.testing.assert_close(effect.concept_before, answer_probability(model, concept))
    summary = effect.summary()
    assert summary["selectivity"] == pytest.approx(effect.concept_drop - effect.control_drop)
    two = noise_validation(model, cols, concept, control, seed=3, draws=2)
    other = noise_validation(model, cols, concept, control, seed=4)
    torch.testing.assert_close(two.concept_after, (effect.concept_after + other.concept_after) / 2)
    with pytest.raises(SteerlabError, match="draws"):
        noise_validation(model, cols, concept, control, draws=0)
    none = concept_effect(model, ColumnEdit(cols, scale=1.0), concept, control)
    assert abs(none.concept_drop) < 1e-5 and abs(none.control_logp) < 1e-5


def test_random_columns_are_distinct_valid_and_skip_exclusions():
    model = tiny_model("qwen2_moe")
    skip = [(1, 0, 0), (2, "shared", 3)]
    cols = random_columns(model, 50, seed=0, exclude=skip)
    assert len(set(cols)) == 50 and not set(cols) & set(skip)
    for c in cols:
        resolve_column(model, c)
    assert random_columns(model, 50, seed=0, exclude=skip) == cols
    with pytest.raises(ColumnIndexError, match="only"):
        random_columns(tiny_model("llama"), 10**6)


def _last_token_mlp_change(model, edit, site: str, layer: int) -> torch.Tensor:
    """The change of ``site``'s output at each prompt's last token when ``edit`` is applied (no later effects)."""
    out = {}

    def grab(key):
        def fn(x, ctx):
            out[key] = x[:, -1].detach().clone()

        return fn

    batch = model.encode(PROMPTS)
    with model.hooks() as hooks, torch.inference_mode():
        hooks.add(site, layer, grab("plain"))
        model.hf(**batch.model_inputs())
    with model.apply(edit) as session, torch.inference_mode():
        session.add(site, layer, grab("edited"))
        model.hf(**batch.model_inputs())
    return out["edited"] - out["plain"]


@pytest.mark.parametrize(
    ("family", "column", "site"),
    [("llama", (1, 7), "mlp_out"), ("phi3", (2, 50), "mlp_out"), ("mixtral", (1, 2, 9), "expert_out"),
     ("gpt_oss", (2, 1, 4), "expert_out"), ("deepseek_v3", (2, 3, 30), "expert_out")],
)  # fmt: skip
def test_column_activations_are_the_write_coefficients(family, column, site):
    """Oracle by linearity: adding u to the column changes the layer's write at a token by (coefficient) * u."""
    model = tiny_model(family)
    u = torch.zeros(1, model.d_model)
    u[0, 5] = 1.0
    change = _last_token_mlp_change(model, ColumnEdit([column], scale=1.0, add=u), site, column[0])
    other = layer_groups(model, 1)[-1].address(0)
    acts = column_activations(model, PROMPTS, [column, other, column])  # repeats are read once
    assert acts.shape == (len(PROMPTS), 3)
    torch.testing.assert_close(acts[:, 2], acts[:, 0], atol=0, rtol=0)
    torch.testing.assert_close(acts[:, 0], change[:, 5], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(change[:, :5], torch.zeros(len(PROMPTS), 5), atol=1e-5, rtol=0)


def test_in_context_keeps_the_columns_that_write_toward_the_concept():
    model = _plant(tiny_model("llama"), (2, 5), 40)
    search = find_concept_vectors(model, [40, 41], top_k=15, shortlist=None)
    kept = search.in_context(model, PROMPTS)
    acts = column_activations(model, PROMPTS, [h.column for h in search.hits]).mean(0)
    expected = list(dict.fromkeys(h.column for h, a in zip(search.hits, acts.tolist()) if h.sign * a > 0))
    assert kept.columns() == expected and 0 < len(kept) < len(search)
    assert all(h.activation is not None and h.sign * h.activation > 0 for h in kept.hits)
    assert "act" in kept.table(3) and kept.concept == search.concept
    assert len(search.in_context(model, PROMPTS, n=3)) <= 3


def test_answer_probability_is_the_next_token_mass_on_every_answer_variant():
    from steerlab.eval.answers import answer_token_ids

    model = tiny_model("llama")
    tok = model.tokenizer
    ids = answer_token_ids(tok, ["red"])
    for text in ("red", " red", "Red", " Red"):  # every variant's first token is counted
        assert tok.encode(text, add_special_tokens=False)[0] in ids
    items = [QA("What colour is a ripe tomato?", ("red",)), QA("Name a colour.", ("blue", "red"))]
    got = answer_probability(model, items)
    enc = model.encode([qa.question for qa in items])  # one row each, left-padded; the last column is the next token
    with torch.inference_mode():
        logits = model.hf(**enc.model_inputs()).logits[:, -1].float()
    probs = logits.softmax(-1)
    for i, qa in enumerate(items):
        assert abs(float(got[i]) - float(probs[i, list(answer_token_ids(tok, qa.answers))].sum())) < 1e-5
    with pytest.raises(EmptyInputError):
        answer_probability(model, [])
    with pytest.raises(EmptyInputError, match="non-empty"):
        answer_token_ids(tok, ["red", " "])
    with pytest.raises(EmptyInputError, match="non-empty"):
        QA("Name a colour.", ("",))
