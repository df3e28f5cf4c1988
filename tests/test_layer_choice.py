"""Guards over several layers: the mean-logit probe guard against scikit-learn, and the layer choice that holds
whole sources and whole safe-but-scary kinds out."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import steerlab
from steerlab.data import DEMO_HARMFUL, DEMO_HARMLESS
from steerlab.data.guard_sets import kind_families
from steerlab.errors import EmptyInputError, InvalidValueError, ShapeError
from steerlab.probes import ProbeGuard, fit_probes
from steerlab.probes.fitting import describe_guard
from steerlab.probes.layer_choice import choose_layers, layer_candidates
from steerlab.probes.metrics import grouped_folds, source_weights
from steerlab.probes.pipeline import out_of_fold_threshold
from steerlab.testing import tiny_model


def test_a_probe_guard_over_two_layers_scores_the_mean_of_sklearn_logits(tmp_path):
    model = tiny_model("qwen2")
    prompts, y = DEMO_HARMFUL[:8] + DEMO_HARMLESS[:8], [1] * 8 + [0] * 8
    x = steerlab.collect(model, prompts, layers=[1, 2], progress=False).get("resid_pre", "last")[:, :, -1]
    probe = fit_probes(x, y, layers=[1, 2], C=0.5, dtype=torch.float64, position="last")
    guard = ProbeGuard(probe, model=model)
    logits = []
    for i in range(2):
        sk = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, tol=1e-12, max_iter=10_000))
        logits.append(sk.fit(x[:, i].double().numpy(), y).decision_function(x[:, i].double().numpy()))
    expected = torch.sigmoid(torch.from_numpy(np.stack(logits)).mean(0)).float()
    scores = guard.score(prompts)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(guard.score_activations(x), scores)
    # one layer: the mean of one logit is the probe's own P(harmful)
    one = probe.select(2)
    torch.testing.assert_close(one.ensemble_proba(x[:, 1:]), one.predict_proba(x[:, 1:])[:, 0])
    loaded = ProbeGuard.load(guard.calibrate(DEMO_HARMFUL[8:12], DEMO_HARMLESS[8:12]).save(tmp_path / "g.safetensors"), model=model)
    assert loaded.probe.layers == (1, 2) and torch.allclose(loaded.score(prompts), scores)
    assert "layers 1, 2 (mean logit)" in describe_guard(loaded)


def _pool(seed=0, *, n=40, m=12):
    """Generic harmful / harmless sources, plus safe-but-scary kinds (a safe and an unsafe source each).

    Layer 0 reads style: generic harmful vs harmless apart, but every scary prompt looks harmful there. Layer 1 reads
    intent, more weakly, for every prompt. Layer 2 is noise."""
    g = torch.Generator().manual_seed(seed)
    rows, ys, groups = [], [], []
    for k in range(4):
        for harmful in (1, 0):
            sign = 1.0 if harmful else -1.0  # generic sources: style and intent agree
            rows.append(torch.tensor([[sign, sign]]).expand(n, 2))
            ys += [harmful] * n
            groups += [f"{'h' if harmful else 's'}{k}"] * n
        for harmful in (1, 0):
            rows.append(torch.tensor([[1.0, 1.0 if harmful else -1.0]]).expand(m, 2))
            ys += [harmful] * m
            groups += [f"scary_{'unsafe' if harmful else 'safe'}:kind{k}"] * m
    signal = torch.cat(rows)
    x = torch.randn(len(ys), 3, 4, generator=g)
    x[:, 0, 0] += 2.5 * signal[:, 0]
    x[:, 1, 0] += 1.2 * signal[:, 1]
    return x, torch.tensor(ys), groups


def test_choose_layers_holds_kinds_out_and_its_pooled_auc_is_the_hand_computed_cv():
    x, y, groups = _pool()
    families = kind_families(groups)
    assert len(families) == 8 and set(families.values()) == {f"kind{k}" for k in range(4)}
    pooled_only = choose_layers(x, y, layers=[5, 6, 7], groups=groups, families={}, n_folds=4, C=1.0)
    both = choose_layers(x, y, layers=[5, 6, 7], groups=groups, families=families, n_folds=4, C=1.0)
    assert 5 in pooled_only.layers and pooled_only.family_auc is None
    assert 6 in both.layers and both.family_auc > both.table[(5,)][1] + 0.2  # style alone cannot tell kinds apart
    assert both.table[(5,)][1] < 0.7 and both.table[(6,)][1] > 0.9

    # the pooled AUC of the pair (5, 7), by hand: source-whole folds, one probe per layer, mean of the two logits
    folds, weight = grouped_folds(groups, y, n_folds=4), source_weights(groups)
    scores = torch.empty(len(y), dtype=torch.float64)
    for f in range(4):
        test = folds == f
        probe = fit_probes(x[~test], y[~test], layers=[0, 1, 2], C=1.0, balanced=True, sample_weight=weight[~test])
        logits = probe.decision_function(x[test]).double()
        scores[test] = (logits[:, 0] + logits[:, 2]) / 2
    assert both.table[(5, 7)][0] == pytest.approx(roc_auc_score(y.numpy(), scores.numpy()), abs=1e-6)


def test_choose_layers_rejects_bad_input():
    x, y, groups = _pool(n=8, m=4)
    with pytest.raises(InvalidValueError, match="no prompts"):
        choose_layers(x, y, layers=[0, 1, 2], groups=groups, families={"nowhere": "k"}, n_folds=2)
    with pytest.raises(EmptyInputError, match="needs harmful and harmless"):
        choose_layers(x, y, layers=[0, 1, 2], groups=groups, families={"h0": "k"}, n_folds=2)
    with pytest.raises(ShapeError):
        choose_layers(x, y, layers=[0, 1], groups=groups, families={}, n_folds=2)
    with pytest.raises(InvalidValueError, match="candidates"):
        choose_layers(x, y, layers=[0, 1, 2], groups=groups, families={}, n_folds=2, candidates=[(3,)])
    assert len(layer_candidates(24)) == 24 + 276 + 22 + 21 + 19


def test_the_threshold_of_a_two_layer_probe_is_calibrated_on_its_mean_logit_out_of_fold():
    x, y, groups = _pool(n=10, m=4)
    folds = grouped_folds(groups, y, n_folds=2)
    t = out_of_fold_threshold(x[:, :2], y, C=1.0, n_folds=2, seed=0, folds=folds)
    scores = torch.empty(len(y))
    for f in range(2):
        test = folds == f
        scores[test] = fit_probes(x[~test][:, :2], y[~test], layers=[0, 1], C=1.0).ensemble_proba(x[test][:, :2])
    from steerlab.probes.metrics import best_threshold

    assert t == pytest.approx(best_threshold(scores[y == 1], scores[y == 0]))


def test_probe_sweep_on_pooled_sources_fits_the_guard_on_the_chosen_layers(tmp_path):
    import json
    from dataclasses import replace

    from steerlab.probes.pipeline import probe_data, probe_sweep, save_probe_run
    from steerlab.report import RunInfo

    model = tiny_model("llama")
    data = probe_data(files=None, seed=0, limit=4, n_folds=3)
    assert data.families == kind_families(data.groups)
    kw = {"site": "resid_pre", "positions": ["last"], "layers": None, "n_folds": 3, "C": 0.1, "metric": "auc", "seed": 0, "batch_size": 16}
    run = probe_sweep(model, data, **kw)
    x = steerlab.collect(model, data.positive + data.negative, layers=None, progress=False).get("resid_pre", "last")[:, :, -1]
    y = torch.tensor([1] * len(data.positive) + [0] * len(data.negative))
    choice = choose_layers(x, y, layers=range(x.shape[1]), groups=data.groups, families=data.families, n_folds=3, C=0.1)
    assert run.layer_choice.layers == run.probe.layers == choice.layers
    folds = grouped_folds(data.groups, y, n_folds=3)
    idx = list(choice.layers)
    t = out_of_fold_threshold(x[:, idx], y, C=0.1, n_folds=3, seed=0, folds=folds, balanced=True, sample_weight=source_weights(data.groups))
    assert run.probe.info["guard_threshold"] == pytest.approx(t, abs=1e-6)
    out = save_probe_run(run, tmp_path / "run", info=RunInfo.collect(model=model.name, dtype="float32"))
    assert json.loads((out / "sweep.json").read_text())["guard"]["layers"] == list(choice.layers)
    single = probe_sweep(model, data, **kw, choose_layers=False)
    assert single.layer_choice is None and single.probe.layers == (single.layer,)
    with pytest.raises(ShapeError, match="one position"):
        ProbeGuard(replace(single.probe, position="all"))


def test_the_guard_reads_the_position_whose_chosen_layers_do_best_on_both_axes():
    from steerlab.probes.pipeline import probe_data, probe_sweep

    model = tiny_model("qwen2")
    data = probe_data(files=None, seed=0, limit=4, n_folds=3)
    positions = ["t_inst", "post_inst", "last", "inst_to_last_mean"]  # post_inst is several columns: no guard reads it
    kw = {"site": "resid_pre", "layers": None, "n_folds": 3, "C": 0.1, "metric": "auc", "seed": 0, "batch_size": 16}
    run = probe_sweep(model, data, positions=positions, **kw)
    acts = steerlab.collect(model, data.positive + data.negative, layers=None, positions=positions, progress=False)
    y = torch.tensor([1] * len(data.positive) + [0] * len(data.negative))
    value = {}
    for p in ("t_inst", "last", "inst_to_last_mean"):
        c = choose_layers(acts.get("resid_pre", p)[:, :, -1], y, layers=acts.layers, groups=data.groups, families=data.families, n_folds=3, C=0.1)
        value[p] = (min(c.pooled_auc, c.family_auc), c.layers)
    best = max(value, key=lambda p: value[p][0])
    assert run.probe.position == best and run.probe.layers == value[best][1]
    assert len(set(v for v, _ in value.values())) > 1  # the positions differ, so a wrong pick would show
    assert probe_sweep(model, data, positions=["last"], **kw).probe.position == "last"


def test_probe_guard_fit_takes_one_layer_as_any_integer_or_several():
    model = tiny_model("llama")
    one = ProbeGuard.fit(model, DEMO_HARMFUL[:6], DEMO_HARMLESS[:6], layer=np.int64(1), position="last")
    two = ProbeGuard.fit(model, DEMO_HARMFUL[:6], DEMO_HARMLESS[:6], layer=(1, 2), position="last")
    assert one.probe.layers == (1,) and two.probe.layers == (1, 2)
    torch.testing.assert_close(two.probe.select(1).weights, one.probe.weights)  # each layer's probe is fitted alone
