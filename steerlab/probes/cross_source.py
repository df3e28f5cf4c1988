"""Judge a guard on sources it was not fitted on: leave-source-out evaluation.

A held-out slice of the training set shares its style, so it flatters a guard. Here every evaluation
leaves whole sources out: for a harmful source ``H`` and a harmless source ``S``, fit on every other
source, then score ``H`` against ``S`` (:func:`leave_sources_out`). The threshold is calibrated on a
validation slice of the *training* sources, so the reported TPR / FPR are what a deployed guard would see
on a new source. :func:`leave_kind_out` does the same for the safe-but-scary kinds (fit without kind
``k``, score its unsafe against its safe prompts).

``fit`` is any function ``(x_train, y_train) -> scorer`` where ``scorer(x) -> [n, m]`` scores ``m``
configurations at once (e.g. one probe per layer); metrics come back per configuration. With
``weigh_sources=True`` it is called as ``fit(x_train, y_train, sample_weight=w)``, ``w`` from
:func:`~steerlab.probes.metrics.source_weights` (every training source weighs the same).

Example:
    >>> import torch
    >>> from steerlab.data.guard_sets import PromptSet
    >>> g = torch.Generator().manual_seed(0)
    >>> def make(name, harmful, n=30):
    ...     x = torch.randn(n, 4, generator=g); x[:, 0] += 2.0 if harmful else -2.0
    ...     return PromptSet(name, harmful, "demo", tuple(f"{name}{i}" for i in range(n))), x
    >>> sets, feats = zip(*[make("h1", True), make("h2", True), make("s1", False), make("s2", False)])
    >>> def fit(x, y):
    ...     w = x[y == 1].mean(0) - x[y == 0].mean(0)
    ...     return lambda z: (z @ w)[:, None]
    >>> rows = leave_sources_out(dict(zip([s.name for s in sets], feats)), list(sets), fit)
    >>> len(rows), rows[0]["harmful"], rows[0]["harmless"], rows[0]["auc"][0] > 0.95
    (4, 'h1', 's1', True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from steerlab.data.guard_sets import PromptSet
from steerlab.errors import EmptyInputError, InvalidValueError
from steerlab.probes.metrics import best_threshold, roc_auc, source_weights

Scorer = Callable[[torch.Tensor], torch.Tensor]
Fit = Callable[..., Scorer]  # (x, y) -> scorer, or (x, y, sample_weight=w) -> scorer with weigh_sources


def _check(features: dict[str, torch.Tensor], sets: Sequence[PromptSet]) -> None:
    for s in sets:
        if s.name not in features and not s.kind:
            raise InvalidValueError(f"no features for prompt set {s.name!r}; collect them first")
    if not any(s.harmful for s in sets) or all(s.harmful for s in sets):
        raise EmptyInputError("leave-source-out needs harmful and harmless sets")


def _validation_mask(n: int, fraction: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[: max(1, round(n * fraction))]] = True
    return mask


def _fit_and_calibrate(train: list[tuple[torch.Tensor, bool]], fit: Fit, *, val_fraction: float, seed: int, weigh_sources: bool = False):
    """Fit on the training sources minus a validation slice of each; thresholds (one per configuration) from
    the slices (best balanced accuracy)."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float) or not 0.0 < val_fraction < 1.0:
        raise InvalidValueError(f"val_fraction must be between 0 and 1 (the share of each training source kept for the threshold); got {val_fraction!r}")
    xs, ys, vx, vy = [], [], [], []
    for i, (x, harmful) in enumerate(train):
        val = _validation_mask(len(x), val_fraction, seed + i)
        xs.append(x[~val]); ys.append(torch.full((int((~val).sum()),), int(harmful)))  # fmt: skip
        vx.append(x[val]); vy.append(torch.full((int(val.sum()),), int(harmful)))  # fmt: skip
    if weigh_sources:
        scorer = fit(torch.cat(xs), torch.cat(ys), sample_weight=source_weights([str(i) for i, y in enumerate(ys) for _ in range(len(y))]))
    else:
        scorer = fit(torch.cat(xs), torch.cat(ys))
    v_scores, v_labels = scorer(torch.cat(vx)), torch.cat(vy)
    thresholds = [best_threshold(v_scores[v_labels == 1, j], v_scores[v_labels == 0, j]) for j in range(v_scores.shape[1])]
    return scorer, torch.tensor(thresholds)


def fit_on(
    features: dict[str, torch.Tensor], sets: Sequence[PromptSet], fit: Fit, *, val_fraction: float = 0.2, seed: int = 0, weigh_sources: bool = False
):
    """``(scorer, thresholds)`` fitted on ``sets`` (minus a validation slice of each, which sets the thresholds)."""
    _check(features, sets)
    train = [(features[s.name], s.harmful) for s in sets]
    return _fit_and_calibrate(train, fit, val_fraction=val_fraction, seed=seed, weigh_sources=weigh_sources)


def score_pairs(scorer: Scorer, thresholds: torch.Tensor, features: dict[str, torch.Tensor], pairs: Sequence[tuple[str, str]]) -> list[dict]:
    """Metrics of a fitted ``scorer`` on each (harmful set, harmless set) pair of ``features``."""
    return [{"harmful": h, "harmless": s, **_metrics(scorer(features[h]), scorer(features[s]), thresholds)} for h, s in pairs]


def _metrics(pos: torch.Tensor, neg: torch.Tensor, thresholds: torch.Tensor) -> dict[str, list[float]]:
    labels = [1] * len(pos) + [0] * len(neg)
    both = torch.cat([pos, neg])
    tpr = (pos >= thresholds).float().mean(0)
    fpr = (neg >= thresholds).float().mean(0)
    return {
        "auc": [roc_auc(both[:, j], labels) for j in range(both.shape[1])],
        "tpr": tpr.tolist(),
        "fpr": fpr.tolist(),
        "balanced_accuracy": ((tpr + 1 - fpr) / 2).tolist(),
    }


def leave_sources_out(
    features: dict[str, torch.Tensor],
    sets: Sequence[PromptSet],
    fit: Fit,
    *,
    pairs: Sequence[tuple[str, str]] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    weigh_sources: bool = False,
) -> list[dict]:
    """For each (harmful source, harmless source) in ``pairs`` (default: every combination), fit on all other
    sets and report AUC, and TPR / FPR / balanced accuracy at the threshold calibrated on the training
    sources' validation slices, per configuration. ``features[name]`` holds the set's features ``[n, ...]``."""
    _check(features, sets)
    names = [s.name for s in sets]
    if pairs is None:
        pairs = [(h.name, s.name) for h in sets if h.harmful for s in sets if not s.harmful]
    rows = []
    for held_h, held_s in pairs:
        if held_h not in names or held_s not in names:
            raise InvalidValueError(f"held-out pair ({held_h}, {held_s}) names a set not in {names}")
        train = [(features[s.name], s.harmful) for s in sets if s.name not in (held_h, held_s)]
        scorer, thresholds = _fit_and_calibrate(train, fit, val_fraction=val_fraction, seed=seed, weigh_sources=weigh_sources)
        rows.append({"harmful": held_h, "harmless": held_s, **_metrics(scorer(features[held_h]), scorer(features[held_s]), thresholds)})
    return rows


def leave_kind_out(
    features: dict[str, torch.Tensor],
    sets: Sequence[PromptSet],
    kinds: dict[tuple[str, bool], torch.Tensor],
    fit: Fit,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    weigh_sources: bool = False,
) -> list[dict]:
    """For each kind ``k`` of ``kinds`` (``(kind, harmful) -> features``), fit on ``sets`` (pass them without the
    safe-but-scary sets) plus every other kind, and score kind ``k``'s unsafe prompts against its safe ones."""
    kind_names = sorted({k for k, _ in kinds})
    rows = []
    for kind in kind_names:
        if (kind, True) not in kinds or (kind, False) not in kinds:
            raise EmptyInputError(f"kind {kind!r} needs both safe and unsafe prompts")
        train = [(features[s.name], s.harmful) for s in sets]
        train += [(x, harmful) for (k, harmful), x in kinds.items() if k != kind]
        scorer, thresholds = _fit_and_calibrate(train, fit, val_fraction=val_fraction, seed=seed, weigh_sources=weigh_sources)
        rows.append({"kind": kind, **_metrics(scorer(kinds[(kind, True)]), scorer(kinds[(kind, False)]), thresholds)})
    return rows


def summarize(rows: Sequence[dict], metric: str = "auc") -> torch.Tensor:
    """Mean of ``metric`` over rows, per configuration ``[m]``.

    Example:
        >>> summarize([{"auc": [0.75, 0.5]}, {"auc": [0.25, 0.5]}]).tolist()
        [0.5, 0.5]
    """
    if not rows:
        raise EmptyInputError("no rows to summarize")
    return torch.tensor([r[metric] for r in rows]).mean(0)
