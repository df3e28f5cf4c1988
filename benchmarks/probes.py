"""Probe fitting on every layer at once vs scikit-learn layer by layer, with held-out accuracy.

Activations of the embedded default are collected once (``resid_pre``, every layer) for the
128+128 training pairs and the 80+80 held-out test pairs. Each row fits one probe per problem:

* raw features: scikit-learn ``LogisticRegression(C=1, max_iter=1000)`` per problem on the raw
  activations (the default lbfgs solver; ``max_iter`` raised from 100 so that it converges) vs
  :func:`steerlab.probes.fit_logistic`, all problems in one batched Newton solve;
* standardised: ``Pipeline(StandardScaler(), LogisticRegression(C=1, max_iter=1000))`` per problem
  (the well-conditioned way to use lbfgs) vs :func:`steerlab.probes.fit_standardized`.

steerlab runs in float64 (the default, solved to 1e-12) and in float32 (``dtype=torch.float32``).
Same objective within each pair (L2 logistic, C=1). Timing: interleaved repetitions, medians;
ratio = scikit-learn time / steerlab time. Accuracy: best held-out accuracy over problems for
scikit-learn / float64 / float32, and the largest per-problem accuracy gap to scikit-learn.

Run: ``python benchmarks/probes.py [--model NAME] [--reps R] [--rows last,positions,pooled]``
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import steerlab
from steerlab.data import load_split
from steerlab.probes.fast import fit_logistic, fit_standardized


def _sklearn_fit(x: torch.Tensor, y: torch.Tensor, *, standardize: bool) -> list:
    """One estimator per problem; x [k, n, d]."""

    def make():
        lr = LogisticRegression(C=1.0, max_iter=1000)
        return make_pipeline(StandardScaler(), lr) if standardize else lr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [make().fit(xk.numpy(), y.numpy()) for xk in x]


def _accuracies_sklearn(models, x_te, y_te) -> torch.Tensor:
    return torch.tensor([float((m.predict(xk.numpy()) == y_te.numpy()).mean()) for m, xk in zip(models, x_te)])


def _accuracies_ours(w, b, x_te, y_te) -> torch.Tensor:
    logits = torch.einsum("knd,kd->kn", x_te.double(), w.double()) + b.double()[:, None]
    return ((logits > 0).long() == y_te).double().mean(-1).float()


def _timed(fn, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rows", default="last,positions,pooled", help="comma-separated subset of: last, positions, pooled")
    args = parser.parse_args()
    rows = set(args.rows.split(","))
    if not rows <= {"last", "positions", "pooled"}:
        parser.error(f"--rows takes last, positions and/or pooled; got {args.rows!r}")
    model = steerlab.load(args.model)
    split = load_split()

    def acts(prompts):
        a = steerlab.collect(model, prompts, positions=["t_inst", "post_inst"], batch_size=16, progress=False)
        return torch.cat([a.get("resid_pre", "t_inst"), a.get("resid_pre", "post_inst")], dim=2)  # [n, L, P, d]

    train = torch.cat([acts(split.harmful_train), acts(split.harmless_train)])
    test = torch.cat([acts(split.harmful_test), acts(split.harmless_test)])
    y_tr = torch.tensor([1] * len(split.harmful_train) + [0] * len(split.harmless_train))
    y_te = torch.tensor([1] * len(split.harmful_test) + [0] * len(split.harmless_test))
    n_layers, n_pos = train.shape[1], train.shape[2]

    setups = {
        f"{n_layers} layers, last token (n={len(y_tr)}, d={model.d_model})": (
            train[:, :, -1].transpose(0, 1),
            test[:, :, -1].transpose(0, 1),
            y_tr,
            y_te,
        ),
        f"{n_layers} layers x {n_pos} positions (t_inst + post_inst)": (
            train.flatten(1, 2).transpose(0, 1),
            test.flatten(1, 2).transpose(0, 1),
            y_tr,
            y_te,
        ),
        f"{n_layers} layers, post_inst tokens pooled (n={len(y_tr) * (n_pos - 1)})": (
            train[:, :, 1:].transpose(1, 2).flatten(0, 1).transpose(0, 1),
            test[:, :, 1:].transpose(1, 2).flatten(0, 1).transpose(0, 1),
            y_tr.repeat_interleave(n_pos - 1),
            y_te.repeat_interleave(n_pos - 1),
        ),
    }
    setups = {name: value for key, (name, value) in zip(("last", "positions", "pooled"), setups.items()) if key in rows}
    print(f"model: {model.name}; torch threads {torch.get_num_threads()}; {args.reps} reps, medians")
    header = (
        f"| {'problems':<50} | {'features':<8} | {'sklearn s':>9} | {'ours f64 s':>10} | {'ratio':>5} | {'ours f32 s':>10} | {'ratio':>5} "
        f"| {'best acc sk / f64 / f32':>23} | {'max gap':>7} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, (x_tr, x_te, ytr, yte) in setups.items():
        for standardize in (False, True):
            fit = fit_standardized if standardize else fit_logistic
            t_sk, t64, t32 = [], [], []
            for _ in range(args.reps):  # interleaved
                t, models = _timed(_sklearn_fit, x_tr, ytr, standardize=standardize)
                t_sk.append(t)
                t, (w64, b64) = _timed(fit, x_tr, ytr, C=1.0)
                t64.append(t)
                t, (w32, b32) = _timed(fit, x_tr, ytr, C=1.0, dtype=torch.float32)
                t32.append(t)
            acc_sk = _accuracies_sklearn(models, x_te, yte)
            acc64, acc32 = _accuracies_ours(w64, b64, x_te, yte), _accuracies_ours(w32, b32, x_te, yte)
            sk, o64, o32 = (statistics.median(t) for t in (t_sk, t64, t32))
            gap = max(float((acc_sk - acc64).abs().max()), float((acc_sk - acc32).abs().max()))
            accs = f"{float(acc_sk.max()):.3f} / {float(acc64.max()):.3f} / {float(acc32.max()):.3f}"
            print(
                f"| {name:<50} | {'std' if standardize else 'raw':<8} | {sk:>9.3f} | {o64:>10.3f} | {sk / o64:>5.1f} | {o32:>10.3f} | {sk / o32:>5.1f} "
                f"| {accs:>23} | {gap:>7.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
