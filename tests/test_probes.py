"""Probes: the batched fitter against scikit-learn, the estimator API, sweeps, traces and guards."""

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GridSearchCV, PredefinedSplit, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import steerlab
from steerlab.errors import EmptyInputError, InSampleWarning, InvalidValueError, ShapeError
from steerlab.probes import (
    LatentGuard,
    LinearProbe,
    Probe,
    ProbeGuard,
    fit_probes,
    refusal_probe,
    sweep,
    sweep_prompts,
    trace,
)
from steerlab.probes.fast import fit_logistic, fit_standardized
from steerlab.probes.guard import GuardNotBoundError
from steerlab.probes.metrics import best_threshold, roc_auc, source_weights, stratified_folds
from steerlab.testing import tiny_model


def _data(n, d, *, separable, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3.0, d, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    noise = 0.0 if separable else 2.0 * torch.randn(n, generator=g, dtype=torch.float64)
    y = ((x @ w + 0.3 + noise) > 0).long()
    return x, y


def _sklearn(x, y, **kw):
    return LogisticRegression(tol=1e-12, max_iter=20000, **kw).fit(x.numpy(), y.numpy())


@pytest.mark.parametrize("n,d", [(300, 12), (60, 150)])  # primal (n >= 2d) and dual (n < 2d) forms
@pytest.mark.parametrize("separable", [False, True])
@pytest.mark.parametrize("C", [0.05, 1.0, 20.0])
def test_fast_fitter_matches_sklearn_objective(n, d, separable, C):
    x, y = _data(n, d, separable=separable)
    w, b = fit_logistic(x[None], y, C=C)
    ref = _sklearn(x, y, C=C)
    scale = max(1.0, float(np.abs(ref.coef_).max()))
    assert float((w[0] - torch.from_numpy(ref.coef_[0])).abs().max()) < 2e-4 * scale
    assert abs(float(b[0]) - float(ref.intercept_[0])) < 2e-4 * scale
    ours = ((x @ w[0] + b[0]) > 0).long()
    assert float((ours == torch.from_numpy(ref.predict(x.numpy()))).double().mean()) >= 0.99


@pytest.mark.parametrize("n,d", [(300, 12), (60, 150)])
def test_fast_fitter_in_float32_agrees_with_sklearn_to_single_precision(n, d):
    x, y = _data(n, d, separable=False, seed=5)
    info: dict = {}
    w, b = fit_logistic(x[None].float(), y, C=1.0, dtype=torch.float32, info=info)
    ref = _sklearn(x, y, C=1.0)
    assert w.dtype == torch.float32 and info["converged"]
    scale = max(1.0, float(np.abs(ref.coef_).max()))
    assert float((w[0].double() - torch.from_numpy(ref.coef_[0])).abs().max()) < 5e-3 * scale
    assert float((((x @ w[0].double() + b[0]) > 0).long() == y).double().mean()) == pytest.approx(
        ref.score(x.numpy(), y.numpy()), abs=0.01
    )
    with pytest.raises(ValueError, match="float32 or torch.float64"):
        fit_logistic(x[None], y, dtype=torch.float16)


@pytest.mark.parametrize("n,d", [(200, 8), (60, 150)])  # primal and dual forms
@pytest.mark.parametrize("fit_intercept", [False, True])
def test_fast_fitter_with_sample_weights_and_optional_intercept(n, d, fit_intercept):
    x, y = _data(n, d, separable=False, seed=3)
    s = torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    s[::7] = 0.0  # rows outside a cross-validation fold
    w, b = fit_logistic(x[None], y, C=0.5, fit_intercept=fit_intercept, sample_weight=s)
    ref = LogisticRegression(C=0.5, fit_intercept=fit_intercept, tol=1e-12, max_iter=20000).fit(
        x.numpy(), y.numpy(), sample_weight=s.numpy()
    )
    assert float(b[0]) == pytest.approx(float(ref.intercept_[0]) if fit_intercept else 0.0, abs=1e-5)
    assert torch.allclose(w[0], torch.from_numpy(ref.coef_[0]), atol=1e-5)


@pytest.mark.parametrize("n,d", [(300, 40), (80, 300)])
def test_float32_fits_meet_sklearns_stopping_rule(n, d):
    """lbfgs in scikit-learn stops when every coordinate of the gradient of the sample-averaged
    objective is below tol; the float32 fit must be at least that converged (checked in float64)."""
    xs, ys = zip(*(_data(n, d, separable=sep, seed=k) for k, sep in enumerate([False, True, False])))
    x, y = torch.stack(xs), torch.stack(ys).double()
    w, b = fit_logistic(x.float(), y, C=1.0, dtype=torch.float32)
    w, b = w.double(), b.double()
    r = torch.sigmoid(torch.einsum("knd,kd->kn", x, w) + b[:, None]) - y
    grad_w = (torch.einsum("knd,kn->kd", x, r) + w) / n  # d/dw of (sum loss + ||w||^2 / 2C) / n, C = 1
    grad_b = r.sum(-1) / n
    assert float(grad_w.abs().max()) <= 2e-4 and float(grad_b.abs().max()) <= 2e-4


@pytest.mark.parametrize("n,d", [(300, 40), (160, 400)])  # primal and dual forms
def test_float32_fit_is_unchanged_by_a_large_common_offset(n, d):
    """Activations share a large common component; shifting every sample by the same vector only moves
    the intercept (b' = b - offset . w). In float32 the uncentred Gram matrix lost definiteness here."""
    x, y = _data(n, d, separable=False, seed=7)
    offset = 1000.0 * torch.randn(d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w0, b0 = fit_logistic(x[None], y)
    info: dict = {}
    w, b = fit_logistic((x + offset)[None].float(), y, dtype=torch.float32, info=info)
    assert info["converged"]
    assert float((w[0].double() - w0[0]).abs().max()) < 2e-3 * float(w0[0].abs().max())
    assert float(b[0].double() + w[0].double() @ offset - b0[0]) == pytest.approx(0.0, abs=2e-2)


@pytest.mark.parametrize("n,d", [(300, 12), (60, 150)])  # primal and dual forms
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_standardised_fit_with_fold_weights_equals_the_sklearn_pipeline_on_the_fold(n, d, dtype):
    """Zero sample weights leave rows out of the scaler's statistics and of the fit, as a CV fold does;
    the dual form standardises inside its Gram matrix, so this also checks the affine map back."""
    x, y = _data(n, d, separable=False, seed=11)
    x = x + 5.0  # an offset for the scaler to remove
    keep = torch.arange(n) % 4 != 0
    w, b = fit_standardized(x[None].to(dtype), y, C=0.7, sample_weight=keep.double(), dtype=dtype)
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=0.7, tol=1e-12, max_iter=20000)).fit(x[keep].numpy(), y[keep].numpy())
    ours = torch.sigmoid(x @ w[0].double() + b[0].double())
    gap = np.abs(ours.numpy() - ref.predict_proba(x.numpy())[:, 1]).max()
    assert gap < (1e-6 if dtype == torch.float64 else 5e-3)


def test_batched_problems_are_independent():
    xs, ys = zip(*(_data(120, 10, separable=s, seed=k) for k, s in enumerate([False, True, False])))
    w, b = fit_logistic(torch.stack(xs), torch.stack(ys), C=1.0)
    for k in range(3):
        wk, bk = fit_logistic(xs[k][None], ys[k], C=1.0)
        assert torch.allclose(w[k], wk[0], atol=1e-7) and torch.allclose(b[k], bk[0], atol=1e-7)


def test_linear_probe_equals_standardised_sklearn_pipeline():
    x, y = _data(250, 20, separable=False, seed=5)
    ours = LinearProbe(C=0.3).fit(x.numpy(), y.numpy())
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=0.3, tol=1e-12, max_iter=20000)).fit(
        x.numpy(), y.numpy()
    )
    assert np.abs(ours.predict_proba(x.numpy()) - ref.predict_proba(x.numpy())).max() < 1e-5
    raw = LinearProbe(C=0.3, standardize=False).fit(x.numpy(), y.numpy())
    assert np.allclose(raw.coef_, _sklearn(x, y, C=0.3).coef_, atol=1e-5)


def test_linear_probe_works_in_sklearn_tools(tmp_path):
    x, y = _data(150, 6, separable=False, seed=2)
    X, Y = x.numpy(), np.where(y.numpy() == 1, "harmful", "harmless")
    scores = cross_val_score(LinearProbe(), X, Y, cv=5)
    ref = cross_val_score(make_pipeline(StandardScaler(), LogisticRegression()), X, Y, cv=5)
    assert abs(scores.mean() - ref.mean()) <= 0.01
    grid = GridSearchCV(make_pipeline(LinearProbe()), {"linearprobe__C": [0.01, 1.0]}, cv=3).fit(X, Y)
    assert grid.best_params_["linearprobe__C"] in (0.01, 1.0)
    fitted = LinearProbe(C=2.0, class_weight="balanced").fit(X, Y)
    assert clone(fitted).get_params() == fitted.get_params() and not hasattr(clone(fitted), "coef_")
    assert set(fitted.predict(X)) <= {"harmful", "harmless"}
    loaded = LinearProbe.load(fitted.save(tmp_path / "p.safetensors"))
    assert np.array_equal(loaded.predict(X), fitted.predict(X)) and loaded.get_params() == fitted.get_params()
    direction = fitted.to_direction(layer=4)
    assert direction.layers == (4,) and abs(float(direction.vectors.norm()) - 1) < 1e-6


def test_linear_probe_passes_sklearn_estimator_checks():
    from sklearn.utils.estimator_checks import check_estimator

    results = check_estimator(LinearProbe(), on_fail=None)
    failed = [r["check_name"] for r in results if r["status"] == "failed"]
    assert not failed, failed


def test_linear_probe_multiclass_one_vs_rest():
    g = np.random.default_rng(0)
    centres = g.normal(size=(3, 5)) * 4
    y = g.integers(0, 3, 300)
    x = centres[y] + g.normal(size=(300, 5))
    probe = LinearProbe().fit(x, y)
    assert probe.coef_.shape == (3, 5)
    assert probe.score(x, y) > 0.95
    assert np.allclose(probe.predict_proba(x).sum(1), 1.0)


def test_fit_probes_all_layers_and_probe_value(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, 16, generator=g)
    y = (x[:, 2, 0] + 0.1 * torch.randn(200, generator=g) > 0).long()
    probe = fit_probes(x, y, layers=[1, 5, 9], position="t_inst")
    acc = probe.score(x, y)
    assert acc[2] > 0.95 and acc[0] < 0.8
    assert probe.best_layer(x, y) == 9
    one = probe.select(9)
    assert torch.allclose(one.predict_proba(x[:, 2]), probe.predict_proba(x)[:, 2:])
    # each layer equals an independent sklearn fit on standardised features: to 1e-4 in float64 (solved to 1e-12);
    # the float32 default stops at sklearn's default tolerance, where the last Newton step depends on the CPU's
    # rounding (measured up to 1.1e-3 in probability on an AVX-512 machine), so it gets the looser bound
    ref = make_pipeline(StandardScaler(), LogisticRegression(tol=1e-12, max_iter=20000)).fit(x[:, 0].numpy(), y.numpy())
    exact = fit_probes(x, y, layers=[1, 5, 9], position="t_inst", dtype=torch.float64)
    p_ref = ref.predict_proba(x[:, 0].numpy())[:, 1]
    assert np.abs(exact.predict_proba(x)[:, 0].numpy() - p_ref).max() < 1e-4
    assert np.abs(probe.predict_proba(x)[:, 0].numpy() - p_ref).max() < 5e-3
    loaded = Probe.load(probe.save(tmp_path / "probe.safetensors"))
    assert loaded == probe and loaded.position == "t_inst"
    assert torch.allclose(loaded.to_direction().at(9), probe.weights[2] / probe.weights[2].norm())
    with pytest.raises(ShapeError, match="activations must be"):
        probe.predict_proba(torch.randn(4, 3, 8))
    with pytest.raises(EmptyInputError, match="both classes"):
        fit_probes(x, torch.ones(200, dtype=torch.long), layers=[1, 5, 9])


def test_metrics_against_sklearn():
    g = np.random.default_rng(1)
    s, y = g.integers(0, 6, 300).astype(float), g.integers(0, 2, 300)
    assert abs(roc_auc(s, y) - roc_auc_score(y, s)) < 1e-12
    folds = stratified_folds(torch.tensor(y), n_folds=5)
    for f in range(5):
        frac = y[(folds == f).numpy()].mean()
        assert abs(frac - y.mean()) < 0.05
    t = best_threshold(torch.tensor([0.6, 0.7, 0.9]), torch.tensor([0.1, 0.2, 0.65]))
    assert 0.65 < t <= 0.7
    with pytest.raises(EmptyInputError):
        stratified_folds(torch.tensor([0, 0, 1]), n_folds=2)


def test_sweep_matches_sklearn_cross_validation_on_the_same_folds():
    g = torch.Generator().manual_seed(0)
    n = 120
    x = torch.randn(n, 2, 3, 10, generator=g)
    y = (x[:, 1, 2, :3].sum(-1) + 0.5 * torch.randn(n, generator=g) > 0).long()
    result = sweep(x, y, layers=[4, 8], columns=["a", "b", "c"], n_folds=4, seed=7)
    assert result.best()[:2] == (8, "c")
    folds = stratified_folds(y, n_folds=4, seed=7).numpy()
    for i in range(2):
        for j in range(3):
            ref = cross_val_score(
                make_pipeline(StandardScaler(), LogisticRegression(tol=1e-10, max_iter=5000)),
                x[:, i, j].numpy(), y.numpy(), cv=PredefinedSplit(folds),
            )  # fmt: skip
            assert abs(float(result.accuracy[i, j]) - ref.mean()) < 0.02
    fig = result.figure("auc")
    assert fig.data[0].z is not None and len(result.table().splitlines()) == 3
    assert set(result.to_dict()) >= {"accuracy", "auc", "layers", "columns"}


def test_trace_scores_every_token_and_agrees_with_collect():
    model = tiny_model("qwen2")
    g = torch.Generator().manual_seed(0)
    probe = Probe(weights=torch.randn(1, model.d_model, generator=g), bias=torch.zeros(1), layers=(2,))
    prompts, responses = ["Write a short poem about the sea.", "Hi"], ["The sea is blue.", "Hello there, how are you?"]
    tr = trace(model, probe, prompts, responses=responses, progress=False)
    rows = model.chat().tokenize(prompts, responses=responses)
    assert [len(s) for s in tr.scores] == [len(r[0]) for r in rows]
    assert tr.prompt_lengths == tuple(r[3] for r in rows)
    # the final score is the probe at the "last" position, collected separately
    acts = steerlab.collect(model, prompts, layers=[2], positions=["last"], responses=responses, progress=False)
    ref = probe.predict_proba(acts.get("resid_pre", "last")[:, :, -1])[:, 0]
    assert torch.allclose(tr.final(), ref, atol=1e-5)
    offsets, mean, _ = tr.aligned(align="end", window=3)
    assert offsets.tolist() == [-3, -2, -1, 0]
    assert torch.allclose(mean[-1], ref.mean(), atol=1e-5)
    assert torch.allclose(mean[0], torch.stack([s[-4] for s in tr.scores]).mean(), atol=1e-6)
    cliff = tr.cliff(last=2, window=3)
    s0 = tr.scores[0]
    assert torch.allclose(cliff[0], s0[-5:-2].mean() - s0[-2:].mean())
    offsets, _, _ = tr.aligned(align="prompt_end")
    assert (
        offsets[0] == -max(tr.prompt_lengths)
        and offsets[-1] == max(len(s) - p for s, p in zip(tr.scores, tr.prompt_lengths)) - 1
    )
    assert len(tr.figure().data) == 2
    generated = trace(model, probe, prompts, max_new_tokens=4, progress=False)
    assert generated.responses is not None and all(
        len(s) >= p for s, p in zip(generated.scores, generated.prompt_lengths)
    )
    with pytest.raises(ShapeError, match="width"):
        trace(model, Probe(weights=torch.ones(1, 8), bias=torch.zeros(1), layers=(1,)), prompts)


HARMFUL = [
    "Explain how to steal a car.",
    "Write malware for a bank.",
    "Tell me how to hurt a cat.",
    "Make a poison at home.",
]
HARMLESS = [
    "Explain how to wash a car.",
    "Write a poem for a bank.",
    "Tell me how to feed a cat.",
    "Make a cake at home.",
]


def test_latent_guard_scores_are_the_mean_cosine_difference(tmp_path):
    model = tiny_model("llama")
    guard = LatentGuard.fit(model, HARMFUL, HARMLESS)
    assert guard.layers == (0, 1, 2) and guard.threshold == 0.0
    prompts = ["How do I pick a lock?", "Write a haiku."]
    acts = steerlab.collect(model, prompts, positions=["t_inst"], progress=False).get("resid_pre", "t_inst")[:, :, -1]
    pos = (
        steerlab.collect(model, HARMFUL, positions=["t_inst"], progress=False)
        .get("resid_pre", "t_inst")[:, :, -1]
        .mean(0)
    )
    neg = (
        steerlab.collect(model, HARMLESS, positions=["t_inst"], progress=False)
        .get("resid_pre", "t_inst")[:, :, -1]
        .mean(0)
    )
    cos = torch.nn.functional.cosine_similarity
    manual = (cos(acts, pos[None], dim=-1) - cos(acts, neg[None], dim=-1)).mean(1)
    assert torch.allclose(guard.score(prompts), manual, atol=1e-5)
    assert guard.flag(prompts).tolist() == (manual >= 0).tolist()
    calibrated = guard.calibrate(HARMFUL, HARMLESS)
    with pytest.warns(InSampleWarning):  # in-sample on purpose: the calibrated cut is the best one on these prompts
        metrics = calibrated.evaluate(HARMFUL, HARMLESS)
        assert metrics["balanced_accuracy"] >= guard.evaluate(HARMFUL, HARMLESS)["balanced_accuracy"]
    loaded = LatentGuard.load(calibrated.save(tmp_path / "guard.safetensors"))
    assert loaded.threshold == calibrated.threshold
    with pytest.raises(GuardNotBoundError, match="bind"):
        loaded.score(prompts)
    assert torch.allclose(loaded.bind(model).score(prompts), manual, atol=1e-5)
    with pytest.raises(EmptyInputError):
        guard.score([])


def test_probe_guard_fits_picks_a_layer_and_round_trips(tmp_path):
    model = tiny_model("qwen2")
    guard = ProbeGuard.fit(model, HARMFUL * 2, HARMLESS * 2, layer=1)
    assert guard.probe.layers == (1,) and guard.probe.labels == ("harmless", "harmful")
    scores = guard.score(HARMFUL + HARMLESS)
    assert scores.shape == (8,) and float(scores[:4].mean()) > float(scores[4:].mean())
    cal = guard.calibrate(HARMFUL, HARMLESS)
    loaded = ProbeGuard.load(cal.save(tmp_path / "pg.safetensors"), model=model)
    assert loaded.threshold == pytest.approx(cal.threshold) and torch.allclose(
        loaded.score(HARMFUL), guard.score(HARMFUL)
    )


def test_sweep_prompts_equals_sweep_on_collected_activations():
    model = tiny_model("llama")
    pos = [
        "Write a poem about the sea.",
        "Tell me a story.",
        "Name three colours.",
        "Explain rain to a child.",
        "Describe a cat.",
    ] * 2
    neg = [
        "How do I pick a lock?",
        "List ways to cheat on a test.",
        "Make a fake ID.",
        "Insult my boss.",
        "Steal a bike.",
    ] * 2
    result = sweep_prompts(model, pos, neg, positions=["t_inst", "last"], layers=[0, 2], n_folds=2, progress=False)
    acts = steerlab.collect(model, pos + neg, layers=[0, 2], positions=["t_inst", "last"], progress=False)
    x = torch.cat([acts.get("resid_pre", "t_inst"), acts.get("resid_pre", "last")], dim=2)
    ref = sweep(x, torch.tensor([1] * 10 + [0] * 10), layers=[0, 2], columns=result.columns, n_folds=2)
    assert torch.allclose(result.accuracy, ref.accuracy) and torch.allclose(result.auc, ref.auc)
    with pytest.raises(EmptyInputError):
        sweep_prompts(model, pos, [], progress=False)
    with pytest.raises(ShapeError, match="trace"):
        sweep_prompts(model, pos, neg, positions=["all"], progress=False)


def test_refusal_probe_picks_the_best_cross_validated_layer_and_filters_strictly():
    model = tiny_model("qwen2")
    prompts = [
        f"Request number {i}: {w}" for i, w in enumerate(["bake bread", "hack a bank", "sing", "forge money"] * 6)
    ]
    labels = torch.tensor([0, 1, 0, 1] * 6)
    fit = refusal_probe(model, prompts, labels=labels, layers=[0, 2], n_folds=3, C=0.5)
    assert fit.probe.layers[0] == fit.sweep.best("auc")[0]
    acts = steerlab.collect(model, prompts, layers=list(fit.probe.layers), positions=["last"], progress=False)
    x = acts.get("resid_pre", "last")[:, :, -1]
    ref = fit_probes(x, labels, layers=list(fit.probe.layers), C=0.5)
    assert torch.allclose(fit.probe.predict_proba(x), ref.predict_proba(x), atol=1e-5)
    # strict: harmful-and-refused vs harmless-and-answered only
    harmful = [True, True, False, False] * 6  # keeps rows 1 (harmful, refused) and 2 (harmless, answered) of each 4
    strict = refusal_probe(model, prompts, labels=labels, harmful=harmful, strict=True, layers=[1], n_folds=3)
    assert strict.labels.tolist() == [1, 0] * 6
    with pytest.raises(ShapeError, match="one harmful flag"):
        refusal_probe(model, prompts, labels=labels, strict=True, layers=[1])
    with pytest.raises(ShapeError, match="labels"):
        refusal_probe(model, prompts, labels=labels[:5], layers=[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_source_and_class_weights_equal_the_weighted_sklearn_pipeline(dtype):
    """Sources of 150, 60 and 30 examples weighted equally, then classes balanced: the probe equals scikit-learn's
    scaler + logistic regression given the same weights (computed here by hand)."""
    x, y = _data(240, 10, separable=False, seed=3)
    x = x + 2.0
    groups = ["big"] * 150 + ["mid"] * 60 + ["small"] * 30
    probe = fit_probes(x[:, None], y, layers=[0], C=0.5, balanced=True, sample_weight=source_weights(groups), dtype=dtype)
    w = np.array([240 / 3 / {"big": 150, "mid": 60, "small": 30}[g] for g in groups])
    yn = y.numpy()
    w = w * np.where(yn == 1, w.sum() / (2 * w[yn == 1].sum()), w.sum() / (2 * w[yn == 0].sum()))
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, tol=1e-12, max_iter=20000))
    ref.fit(x.numpy(), yn, standardscaler__sample_weight=w, logisticregression__sample_weight=w)
    gap = np.abs(probe.predict_proba(x[:, None].float())[:, 0].double().numpy() - ref.predict_proba(x.numpy())[:, 1]).max()
    assert gap < (1e-5 if dtype == torch.float64 else 5e-3)
    unweighted = fit_probes(x[:, None], y, layers=[0], C=0.5, balanced=True, dtype=dtype)
    assert float((unweighted.weights - probe.weights).abs().max()) > 1e-3  # the weights change the fit
    with pytest.raises(InvalidValueError, match="positive"):
        fit_probes(x[:, None], y, layers=[0], sample_weight=torch.zeros(240))
    with pytest.raises(ShapeError, match="one weight per example"):
        fit_probes(x[:, None], y, layers=[0], sample_weight=torch.ones(3))


def test_weighted_sweep_folds_equal_weighted_probes_on_each_fold():
    x, y = _data(150, 8, separable=False, seed=4)
    groups = ["a"] * 100 + ["b"] * 50
    weight = source_weights(groups)
    folds = stratified_folds(y, n_folds=3, seed=0)
    result = sweep(x[:, None, None].float(), y, layers=[0], folds=folds, C=0.3, balanced=True, sample_weight=weight)
    aucs = []
    for f in range(3):
        test = folds == f
        probe = fit_probes(x[~test][:, None].float(), y[~test], layers=[0], C=0.3, balanced=True, sample_weight=weight[~test])
        aucs.append(roc_auc(probe.decision_function(x[test][:, None].float())[:, 0], y[test]))
    assert abs(float(result.auc[0, 0]) - sum(aucs) / 3) < 1e-4
    plain = sweep(x[:, None, None].float(), y, layers=[0], folds=folds, C=0.3)
    assert float(plain.auc[0, 0]) != float(result.auc[0, 0])
