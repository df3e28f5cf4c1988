"""Truthfulness direction (METHODS 9): the statements data, fitting and per-layer accuracy, steering along it,
and comparing / transferring directions between two tiny random models of the same width."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import steerlab
from steerlab.data import load_statements, true_false_statements
from steerlab.errors import LayerIndexError, ShapeError, SteerlabError
from steerlab.steering import AddVector, Direction, compare_directions, transfer_direction, truthfulness_direction
from steerlab.steering.compare import map_layer
from steerlab.steering.truthfulness import (
    SteeringEffect,
    projection_accuracy,
    statement_activations,
    steering_effect,
    truth_judgement,
    truthfulness_report,
)
from steerlab.testing import tiny_model, tiny_tokenizer

TRUE = ["Paris is the capital of France.", "Cats are animals.", "The sea is salty."]
FALSE = ["Paris is the capital of Spain.", "Cats are plants.", "The sea is sweet."]


@functools.cache
def _llama_hf(hidden: int, layers: int, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tiny_tokenizer()
    config = AutoConfig.for_model(
        "llama", hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return hf.eval()


def _llama(hidden: int = 64, layers: int = 3, seed: int = 0):
    return steerlab.load(_llama_hf(hidden, layers, seed), tiny_tokenizer())


def test_statements_are_pairs_and_the_split_keeps_them_together():
    pairs = true_false_statements()
    assert len(pairs) >= 150 and len({p["true"] for p in pairs} | {p["false"] for p in pairs}) == 2 * len(pairs)
    split = load_statements(seed=3, n_test=40)
    assert len(split.true_test) == len(split.false_test) == 40 and len(split.true_train) == len(pairs) - 40
    by_true = {p["true"]: p["false"] for p in pairs}
    assert all(by_true[t] == f for t, f in zip(split.true_test, split.false_test))
    assert not set(split.true_train) & set(split.true_test)
    assert load_statements(seed=3, n_test=40) == split and load_statements(seed=4, n_test=40) != split
    with pytest.raises(SteerlabError, match="n_test"):
        load_statements(n_test=0)


def test_direction_is_the_mean_difference_at_the_last_token():
    model = tiny_model("qwen2")
    d = truthfulness_direction(model, TRUE, FALSE)
    pos, layers = statement_activations(model, TRUE)
    neg, _ = statement_activations(model, FALSE)
    assert layers == list(range(model.n_layers)) and d.layers == tuple(layers)
    torch.testing.assert_close(d.vectors, pos.mean(0) - neg.mean(0), atol=1e-5, rtol=1e-5)
    assert d.info["n_layers"] == model.n_layers and d.position == "last" and d.model == model.name
    chat = truthfulness_direction(model, TRUE, FALSE, chat=True, layers=[1])
    assert chat.layers == (1,) and not torch.allclose(chat.vectors[0], d.at(1))


def test_projection_threshold_accuracy():
    g = torch.Generator().manual_seed(0)
    shift = torch.zeros(2, 8)
    shift[:, 0] = 4.0
    pos_tr, neg_tr = torch.randn(30, 2, 8, generator=g) + shift, torch.randn(30, 2, 8, generator=g) - shift
    pos_te, neg_te = torch.randn(20, 2, 8, generator=g) + shift, torch.randn(20, 2, 8, generator=g) - shift
    d = Direction(pos_tr.mean(0) - neg_tr.mean(0), (3, 5))
    thr, tr, te, auc = projection_accuracy(d, pos_tr, neg_tr, pos_te, neg_te)
    assert set(thr) == {3, 5} and tr[3] > 0.97 and te[5] > 0.97 and auc[3] > 0.99
    _, _, flipped, flipped_auc = projection_accuracy(d, pos_tr, neg_tr, neg_te, pos_te)  # labels swapped on test
    assert flipped[3] < 0.05 and flipped_auc[3] < 0.01
    # a few huge outliers in one class move a midpoint of means, not the fitted threshold
    outliers = pos_tr.clone()
    outliers[:3] += 1e4 * d.vectors / d.vectors.norm(dim=-1, keepdim=True)
    assert projection_accuracy(d, outliers, neg_tr, pos_te, neg_te)[2][3] > 0.97


def test_report_fits_on_train_and_scores_held_out_statements():
    model = tiny_model("llama")
    split = load_statements(n_test=10)
    report = truthfulness_report(model, split)
    assert report.n_train == 2 * len(split.true_train) and report.n_test == 20
    assert set(report.test_accuracy) == set(report.probe_test_accuracy) == set(range(model.n_layers))
    assert set(report.test_auc) == set(range(model.n_layers)) and report.train_accuracy[1] >= 0.5
    assert all(0.0 <= a <= 1.0 for a in report.test_accuracy.values())
    assert report.best_layer() in report.test_accuracy and "proj test" in report.table()
    expected = truthfulness_direction(model, split.true_train, split.false_train)
    torch.testing.assert_close(report.direction.vectors, expected.vectors, atol=1e-5, rtol=1e-5)


def test_steering_along_the_direction_moves_the_judgement():
    model = tiny_model("llama")
    d = truthfulness_direction(model, TRUE, FALSE)
    base = truth_judgement(model, TRUE)
    assert base.shape == (3,) and bool(((base >= -1) & (base <= 1)).all())
    eff = steering_effect(model, d, TRUE, FALSE, layers=[1], coeffs=(-3.0, 0.0, 3.0))
    torch.testing.assert_close(eff.steered_true[0.0], eff.base_true)
    with model.apply(AddVector(d, coeff=3.0, layers=[1])):
        torch.testing.assert_close(eff.steered_false[3.0], truth_judgement(model, FALSE))
    assert not torch.allclose(eff.steered_true[3.0], eff.base_true)
    assert "accuracy" in eff.table()
    with pytest.raises(ShapeError, match="statement"):
        truth_judgement(model, TRUE, template="no slot")
    raw = truth_judgement(model, TRUE, template="{statement} This statement is:", chat=False)
    assert raw.shape == (3,) and not torch.allclose(raw, base)


def test_normalized_effect_is_the_papers_fraction_of_the_gap():
    t = torch.tensor
    eff = SteeringEffect(
        layers=(1,), base_true=t([0.8, 0.6]), base_false=t([-0.6, -0.8]),
        steered_true={-1.0: t([0.0, 0.0]), 1.0: t([0.9, 0.9])}, steered_false={-1.0: t([-0.9, -0.9]), 1.0: t([0.7, 0.7])},
    )  # fmt: skip
    # gap 1.4; subtracting moves true by 0.7, adding moves false by 1.4 -> (0.7 + 1.4) / 2.8
    assert eff.normalized_effect(1.0) == pytest.approx(0.75)
    assert eff.base_accuracy == 1.0 and eff.accuracy(-1.0) == 0.5
    assert eff.swing(1.0) == pytest.approx(1.25)  # mean at +1 (0.9, 0.9, 0.7, 0.7) minus at -1 (0, 0, -0.9, -0.9)
    same = SteeringEffect((1,), t([0.1]), t([0.08]), {-1.0: t([0.0])}, {1.0: t([0.2])})
    assert math.isnan(same.normalized_effect(1.0))  # no baseline gap to normalise by
    with pytest.raises(ShapeError, match="coefficients"):
        eff.normalized_effect(2.0)


def test_compare_directions_per_layer_and_by_depth():
    g = torch.Generator().manual_seed(1)
    a = Direction(torch.randn(4, 16, generator=g), (0, 1, 2, 3), model="a", info={"n_layers": 4})
    assert compare_directions(a, a).as_dict() == pytest.approx({0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0})
    neg = Direction(-a.vectors, a.layers)
    assert compare_directions(a, neg).mean() == pytest.approx(-1.0)
    b = Direction(a.vectors[[2, 3]], (4, 6), model="b", info={"n_layers": 7})  # a 7-layer model: 2 -> 4, 3 -> 6
    by_depth = compare_directions(a, b, align="depth")
    assert [(x, y) for x, y, _ in by_depth.pairs] == [(2, 4), (3, 6)] and by_depth.mean() == pytest.approx(1.0)
    with pytest.raises(LayerIndexError, match="share no layers"):  # explicit depths override info
        compare_directions(a, b, align="depth", n_layers=(4, 4))
    assert map_layer(15, 30, 24) == 12 and map_layer(0, 1, 5) == 0
    with pytest.raises(LayerIndexError, match="share no layers"):
        compare_directions(a, b)
    with pytest.raises(LayerIndexError, match="n_layers"):
        compare_directions(Direction(a.vectors, a.layers), b, align="depth")
    wide = Direction(torch.randn(1, 24, generator=g), (0,), model="wide")
    with pytest.raises(ShapeError, match="a .*width 16 but b .*width 24"):
        compare_directions(a, wide)


def test_transfer_between_two_tiny_models_of_the_same_width():
    source, target = _llama(seed=0), _llama(seed=1)
    assert source.d_model == target.d_model and not torch.equal(source.hf.lm_head.weight, target.hf.lm_head.weight)
    d_src = truthfulness_direction(source, TRUE, FALSE)
    d_tgt = truthfulness_direction(target, TRUE, FALSE)
    moved = transfer_direction(d_src, target)
    assert moved.model == target.name and moved.info["transferred_from"] == source.name
    torch.testing.assert_close(moved.vectors, d_src.vectors, atol=0, rtol=0)
    cos = compare_directions(moved, d_tgt)
    assert set(cos.as_dict()) == {0, 1, 2} and all(-1 <= c <= 1 for c in cos.as_dict().values())
    eff = steering_effect(target, moved, TRUE, FALSE, layers=[1], coeffs=(2.0,))
    assert not torch.allclose(eff.steered_true[2.0], eff.base_true)

    deep = _llama(layers=5, seed=2)
    d_deep = truthfulness_direction(deep, TRUE, FALSE)
    with pytest.raises(LayerIndexError, match="align='depth'"):
        transfer_direction(d_deep, target)
    by_depth = transfer_direction(d_deep, target, align="depth")
    assert by_depth.layers == (0, 1, 2) and by_depth.info["source_layers"] == [0, 1, 2, 3, 4]
    torch.testing.assert_close(by_depth.at(1), d_deep.at(2))  # layer 2 of 5 sits at layer 1 of 3

    narrow = _llama(hidden=32, seed=3)
    with pytest.raises(ShapeError, match="width 64.*d_model=32") as info:
        transfer_direction(d_src, narrow)
    assert isinstance(info.value, SteerlabError)
    with pytest.raises(ShapeError, match="width 64 but .*width 32"):
        compare_directions(d_src, truthfulness_direction(narrow, TRUE, FALSE))
