"""Choose the layers a pooled guard reads, by cross-validation on its own training pool.

A guard must separate harmful from harmless prompts of sources it never saw, and unsafe from safe prompts of a
*kind* it never saw (a safe-but-scary kind: the same style, harmless or not). One layer rarely does both best, so a
candidate is a set of layers read as one classifier (one probe per layer, the mean of their logits; see
:meth:`~steerlab.probes.probe.Probe.ensemble_proba`), and each candidate is scored on both questions, with whole
sources held out:

* **pooled**: folds that keep sources whole (:func:`~steerlab.probes.metrics.grouped_folds`); the AUC of every
  out-of-fold score, harmful vs harmless;
* **families**: a family is a set of sources that share a style but differ in harmfulness (a kind's safe and unsafe
  prompts). Hold one family out, fit on everything else, AUC of its harmful vs harmless prompts; mean over families.

The chosen candidate has the best *worse* of the two AUCs (maximin: a guard must do both; ties: fewer layers, then
earlier ones). Judged nested on the Qwen default (``experiments/guard_layer_ensembles.py``: in every split the rule
chooses on the training sources only), this rule met both of issue 19's targets (AUC >= 0.95 harmful vs harmless
on unseen public sets, >= 0.85 unsafe vs safe-but-scary on an unseen kind); the mean of the two, or either alone, did
not. Every candidate of a split comes from the same per-layer fits, so the search costs one fit per
fold and per family.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> y = torch.tensor([1, 0] * 60); groups = [f"{'h' if k else 's'}{i % 6}" for i, k in enumerate(y.tolist())]
    >>> x = torch.randn(120, 3, 4, generator=g)
    >>> x[:, 1, 0] += 3 * (y - 0.5)               # layer 1 separates the classes, layers 0 and 2 are noise
    >>> choice = choose_layers(x, y, layers=[4, 5, 6], groups=groups, families={}, n_folds=3, C=1.0)
    >>> choice.layers, choice.pooled_auc > 0.9
    ((5,), True)
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from steerlab._checks import layer_tuple
from steerlab.errors import EmptyInputError, InvalidValueError, ShapeError
from steerlab.probes.metrics import grouped_folds, roc_auc, source_weights
from steerlab.probes.probe import fit_probes

WINDOWS = (3, 4, 6)  # widths of the runs of neighbouring layers among the candidates


@dataclass(frozen=True)
class LayerChoice:
    """The chosen ``layers`` (model layer indices), their pooled and family-held-out AUCs, and every candidate's
    ``(pooled, families)`` AUCs in ``table`` (keyed by the candidate's layers)."""

    layers: tuple[int, ...]
    pooled_auc: float
    family_auc: float | None
    table: dict[tuple[int, ...], tuple[float, float | None]]

    def describe(self) -> str:
        """One line: the layers and both AUCs."""
        fam = "" if self.family_auc is None else f", family-held-out AUC {self.family_auc:.3f}"
        return f"layers {list(self.layers)} (source-held-out AUC {self.pooled_auc:.3f}{fam})"


def layer_candidates(n_layers: int) -> list[tuple[int, ...]]:
    """Positions (0-based, into the swept layers) of every candidate: each layer, each pair of layers, and each run
    of 3, 4 or 6 neighbouring layers.

    Example:
        >>> layer_candidates(3)
        [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    """
    if n_layers < 1:
        raise EmptyInputError("no layers to choose from")
    out = [(a,) for a in range(n_layers)] + list(itertools.combinations(range(n_layers), 2))
    for w in WINDOWS:
        out += [tuple(range(a, a + w)) for a in range(n_layers - w + 1) if w <= n_layers]
    return list(dict.fromkeys(out))


def _mixer(candidates: Sequence[tuple[int, ...]], n_layers: int) -> torch.Tensor:
    mix = torch.zeros(n_layers, len(candidates), dtype=torch.float64)
    for j, cand in enumerate(candidates):
        mix[list(cand), j] = 1.0 / len(cand)
    return mix


def _fit_scorer(x, y, weight, *, C: float, mix: torch.Tensor):
    probe = fit_probes(x, y, layers=list(range(x.shape[1])), C=C, balanced=True, sample_weight=weight)
    return lambda z: probe.decision_function(z).double() @ mix


def choose_layers(
    x: torch.Tensor,
    y: Sequence[int] | torch.Tensor,
    *,
    layers: Sequence[int],
    groups: Sequence[str],
    families: Mapping[str, str],
    n_folds: int = 5,
    C: float = 0.01,
    candidates: Sequence[tuple[int, ...]] | None = None,
) -> LayerChoice:
    """The candidate layer set with the best minimum of pooled source-held-out AUC and family-held-out AUC.

    ``x`` ``[n, n_layers, d]`` holds one position's activations at ``layers``; ``y`` is 1 for harmful; ``groups`` names
    each row's source; ``families`` maps a source to its family (sources not in it belong to none; an empty mapping
    scores the pooled AUC only). Probes are fitted as ``steerlab probe`` fits them: balanced classes, every source
    weighing the same, inverse L2 strength ``C``. ``candidates`` are tuples of positions into ``layers`` (default:
    :func:`layer_candidates`).
    """
    layers = layer_tuple(layers)
    y = torch.as_tensor(y).long()
    if x.dim() != 3 or x.shape[1] != len(layers) or len(x) != len(y) or len(groups) != len(y):
        raise ShapeError(f"need x [n, {len(layers)} layers, d] with one label and one source per row; got x "
                         f"{tuple(x.shape)}, {len(y)} labels, {len(groups)} sources")  # fmt: skip
    unknown = sorted(set(families) - set(groups))
    if unknown:
        raise InvalidValueError(f"families name sources that have no prompts: {unknown}")
    candidates = layer_candidates(len(layers)) if candidates is None else [tuple(c) for c in candidates]
    if not candidates or any(not c or min(c) < 0 or max(c) >= len(layers) for c in candidates):
        raise InvalidValueError(f"candidates must be non-empty tuples of positions 0..{len(layers) - 1}")
    mix = _mixer(candidates, len(layers))
    weight = source_weights(list(groups))

    folds = grouped_folds(groups, y, n_folds=n_folds)
    scores = torch.empty(len(y), len(candidates), dtype=torch.float64)
    for f in range(n_folds):
        test = folds == f
        scores[test] = _fit_scorer(x[~test], y[~test], weight[~test], C=C, mix=mix)(x[test])
    pooled = torch.tensor([roc_auc(scores[:, j], y) for j in range(len(candidates))])

    family_auc = None
    names = sorted(set(families.values()))
    if names:
        per_family = []
        for name in names:
            held = torch.tensor([families.get(g) == name for g in groups])
            if len(torch.unique(y[held])) != 2:
                raise EmptyInputError(f"family {name!r} needs harmful and harmless prompts")
            s = _fit_scorer(x[~held], y[~held], source_weights([g for g, h in zip(groups, held.tolist()) if not h]), C=C, mix=mix)(x[held])
            per_family.append([roc_auc(s[:, j], y[held]) for j in range(len(candidates))])
        family_auc = torch.tensor(per_family).mean(0)
    total = pooled if family_auc is None else torch.minimum(pooled, family_auc)
    best = max(range(len(candidates)), key=lambda j: (round(float(total[j]), 12), -len(candidates[j]), [-c for c in candidates[j]]))
    table = {tuple(layers[i] for i in c): (float(pooled[j]), None if family_auc is None else float(family_auc[j]))
             for j, c in enumerate(candidates)}  # fmt: skip
    chosen = tuple(layers[i] for i in candidates[best])
    return LayerChoice(layers=chosen, pooled_auc=table[chosen][0], family_auc=table[chosen][1], table=table)
