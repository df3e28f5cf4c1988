"""Probe fitting on every layer at once vs scikit-learn layer by layer, with held-out accuracy.

Activations of the embedded default are collected once (``resid_pre``, every layer) for the
128+128 training pairs and the 80+80 held-out test pairs. Each row fits one probe per problem:

* baseline: ``Pipeline(StandardScaler(), LogisticRegression(C=1, max_iter=1000))`` per layer (and
  per position), the way a user writes it with scikit-learn;
* steerlab: :func:`steerlab.probes.fit_standardized`, all problems in one batched Newton solve.

Same objective (L2 logistic, C=1, standardised features). Timing: interleaved repetitions,
medians; ratio = scikit-learn time / steerlab time. Accuracy columns: best held-out accuracy over
layers for each, and the largest per-problem accuracy gap between the two.

Run: ``python benchmarks/probes.py [--model NAME] [--reps R]``
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
from steerlab.probes import fit_standardized


def _sklearn_fit(x: torch.Tensor, y: torch.Tensor) -> list:
    """One pipeline per problem; x [k, n, d]."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)).fit(xk.numpy(), y.numpy()) for xk in x]


def _accuracies_sklearn(models, x_te, y_te) -> torch.Tensor:
    return torch.tensor([float((m.predict(xk.numpy()) == y_te.numpy()).mean()) for m, xk in zip(models, x_te)])


def _accuracies_ours(w, b, x_te, y_te) -> torch.Tensor:
    logits = torch.einsum("knd,kd->kn", x_te.double(), w) + b[:, None]
    return ((logits > 0).long() == y_te).double().mean(-1).float()


def _median_time(fn, reps: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
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
        f"{n_layers} layers, last token (n={len(y_tr)}, d={model.d_model})": (train[:, :, -1].transpose(0, 1), test[:, :, -1].transpose(0, 1), y_tr, y_te),
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
    print(f"model: {model.name}; torch threads {torch.get_num_threads()}; {args.reps} reps, medians")
    header = f"| {'problems':<52} | {'sklearn s':>9} | {'steerlab s':>10} | {'ratio':>6} | {'best acc sk':>11} | {'best acc ours':>13} | {'max gap':>7} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, (x_tr, x_te, ytr, yte) in setups.items():
        t_sk, t_ours = [], []
        for _ in range(args.reps):  # interleaved
            t, models = _median_time(lambda x_tr=x_tr, ytr=ytr: _sklearn_fit(x_tr, ytr), 1)
            t_sk.append(t)
            t, (w, b) = _median_time(lambda x_tr=x_tr, ytr=ytr: fit_standardized(x_tr, ytr, C=1.0), 1)
            t_ours.append(t)
        acc_sk = _accuracies_sklearn(models, x_te, yte)
        acc_ours = _accuracies_ours(w, b, x_te, yte)
        sk, ours = statistics.median(t_sk), statistics.median(t_ours)
        print(
            f"| {name:<52} | {sk:>9.2f} | {ours:>10.2f} | {sk / ours:>6.1f} | {float(acc_sk.max()):>11.3f} | "
            f"{float(acc_ours.max()):>13.3f} | {float((acc_sk - acc_ours).abs().max()):>7.3f} |"
        )


if __name__ == "__main__":
    main()
