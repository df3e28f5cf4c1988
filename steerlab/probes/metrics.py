"""Small, dependency-free metrics for probes: ROC AUC (ties counted half) and stratified folds.

Example:
    >>> roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from steerlab.errors import EmptyInputError, InvalidValueError


def roc_auc(scores: Sequence[float] | torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (Mann-Whitney U / n+ n-)."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    y = torch.as_tensor(labels).flatten().bool()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise EmptyInputError(f"AUC needs both classes; got {n_pos} positive and {n_neg} negative")
    # average ranks handle ties
    _, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)
    ranks = ((ends - counts + 1 + ends) / 2)[inverse]
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def stratified_folds(labels: Sequence[int] | torch.Tensor, *, n_folds: int = 5, seed: int = 0) -> torch.Tensor:
    """Fold index ``[n]`` per sample; each class is spread evenly over the folds (shuffled, seeded)."""
    y = torch.as_tensor(labels).long()
    counts = torch.bincount(y)
    if n_folds < 2:
        raise InvalidValueError(f"n_folds must be at least 2; got {n_folds}")
    if int(counts[counts > 0].min()) < n_folds:
        raise EmptyInputError(f"every class needs at least {n_folds} samples for {n_folds}-fold CV; class counts {counts.tolist()}")
    gen = torch.Generator().manual_seed(seed)
    folds = torch.empty_like(y)
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        folds[idx] = torch.arange(len(idx)) % n_folds
    return folds


def grouped_folds(groups: Sequence[str], labels: Sequence[int] | torch.Tensor, *, n_folds: int = 5) -> torch.Tensor:
    """Fold index ``[n]`` that keeps every group (a prompt's source) whole: each class's groups go round-robin,
    largest first, so every fold holds out whole sources of both classes — cross-validation across sources.

    Example:
        >>> grouped_folds(["a", "a", "b", "c", "d"], [1, 1, 1, 0, 0], n_folds=2).tolist()
        [0, 0, 1, 0, 1]
    """
    y = torch.as_tensor(labels).long()
    if len(groups) != len(y):
        raise EmptyInputError(f"{len(groups)} group names for {len(y)} labels")
    if n_folds < 2:
        raise InvalidValueError(f"n_folds must be at least 2; got {n_folds}")
    folds = torch.empty_like(y)
    for c in torch.unique(y).tolist():
        members = [g for g, label in zip(groups, y.tolist()) if label == c]
        names = sorted(set(members), key=lambda g: (-members.count(g), g))
        if len(names) < n_folds:
            raise EmptyInputError(f"class {c} has {len(names)} sources but {n_folds} folds need at least {n_folds} (one per fold)")
        fold_of = {g: k % n_folds for k, g in enumerate(names)}
        for i, (g, label) in enumerate(zip(groups, y.tolist())):
            if label == c:
                folds[i] = fold_of[g]
    return folds


def source_weights(groups: Sequence[str]) -> torch.Tensor:
    """One weight per example so that every group (a prompt's source) carries the same total weight: a probe
    fitted with them learns from a 20-prompt source of hard cases as much as from a 200-prompt generic one.

    Example:
        >>> source_weights(["a", "a", "a", "b"]).tolist()
        [0.6666666666666666, 0.6666666666666666, 0.6666666666666666, 2.0]
    """
    if not len(groups):
        raise EmptyInputError("source_weights needs at least one example")
    names = sorted(set(groups))
    sizes = {g: 0 for g in names}
    for g in groups:
        sizes[g] += 1
    per_group = len(groups) / len(names)
    return torch.tensor([per_group / sizes[g] for g in groups], dtype=torch.float64)


def best_threshold(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """The threshold ``t`` (flag when ``score >= t``) with the highest balanced accuracy.

    Candidates are midpoints between consecutive distinct scores; ties go to the middle of the
    best run, so the threshold sits in the widest safe gap.

    Example:
        >>> round(best_threshold(torch.tensor([0.8, 0.9]), torch.tensor([0.1, 0.3])), 4)
        0.55
    """
    pos = torch.as_tensor(positive, dtype=torch.float64).flatten()
    neg = torch.as_tensor(negative, dtype=torch.float64).flatten()
    if not len(pos) or not len(neg):
        raise EmptyInputError(f"calibration needs both classes; got {len(pos)} positive and {len(neg)} negative scores")
    values = torch.unique(torch.cat([pos, neg]))  # sorted
    cuts = torch.cat([values[:1] - 1, (values[1:] + values[:-1]) / 2, values[-1:] + 1])
    tpr = (pos[None] >= cuts[:, None]).double().mean(1)
    tnr = (neg[None] < cuts[:, None]).double().mean(1)
    balanced = (tpr + tnr) / 2
    best = torch.nonzero(balanced == balanced.max()).flatten()
    return float(cuts[best[len(best) // 2]])
