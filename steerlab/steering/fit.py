"""Fitters: accumulate statistics (float64) and return a frozen :class:`Direction`.

``MeanDifference`` streams: call ``update`` batch by batch, then ``result``. ``mean_difference``
and ``pca_direction`` are the one-call forms over collected activations.

Example:
    >>> import torch
    >>> fit = MeanDifference(layers=(0, 1))
    >>> fit.update(torch.ones(3, 2, 4), positive=True); fit.update(torch.zeros(5, 2, 4), positive=False)
    >>> fit.result().at(1).tolist()
    [1.0, 1.0, 1.0, 1.0]
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from steerlab.errors import EmptyInputError, ShapeError
from steerlab.steering.direction import Direction


def prompts_hash(*prompt_sets: Sequence[str]) -> str:
    """Short stable hash of the prompt sets a direction was fitted on."""
    digest = hashlib.sha256()
    for prompts in prompt_sets:
        for p in prompts:
            digest.update(p.encode() + b"\0")
        digest.update(b"\1")
    return digest.hexdigest()[:16]


@dataclass
class MeanDifference:
    """Streaming mean(positive) - mean(negative) per layer, summed in float64."""

    layers: tuple[int, ...]
    site: str = "resid_pre"
    position: str | int = "last"
    model: str = ""
    data_hash: str = ""
    _sums: dict[bool, torch.Tensor] = field(default_factory=dict, repr=False)
    _counts: dict[bool, int] = field(default_factory=lambda: {True: 0, False: 0}, repr=False)

    def update(self, acts: torch.Tensor, *, positive: bool) -> None:
        """Add a batch of activations ``[n, n_layers, d]`` to one class."""
        if acts.dim() != 3 or acts.shape[1] != len(self.layers):
            raise ShapeError(f"expected [n, {len(self.layers)} layers, d] activations, got {tuple(acts.shape)}")
        total = acts.double().sum(0)
        self._sums[positive] = self._sums[positive] + total if positive in self._sums else total
        self._counts[positive] += int(acts.shape[0])

    def result(self) -> Direction:
        """The fitted direction (unnormalised difference of class means)."""
        if not self._counts[True] or not self._counts[False]:
            raise EmptyInputError(f"both classes need examples; got {self._counts[True]} positive, {self._counts[False]} negative")
        diff = self._sums[True] / self._counts[True] - self._sums[False] / self._counts[False]
        return Direction(
            vectors=diff.float(),
            layers=self.layers,
            site=self.site,
            position=self.position,
            method="mean_diff",
            model=self.model,
            data_hash=self.data_hash,
            info={"n_positive": self._counts[True], "n_negative": self._counts[False]},
        )


def mean_difference(positive: torch.Tensor, negative: torch.Tensor, *, layers: Sequence[int], **meta) -> Direction:
    """Direction = mean(positive) - mean(negative), each ``[n, n_layers, d]``."""
    fit = MeanDifference(layers=tuple(layers), **meta)
    fit.update(positive, positive=True)
    fit.update(negative, positive=False)
    return fit.result()


def pca_direction(positive: torch.Tensor, negative: torch.Tensor, *, layers: Sequence[int], **meta) -> Direction:
    """Top principal axis of the paired differences ``positive[i] - negative[i]`` per layer.

    The differences are not centred (centring would remove the shared shift we are after), so
    this is the top right-singular vector of the difference matrix; its sign is chosen to point
    along the mean difference. Unit norm.
    """
    if positive.shape != negative.shape:
        raise ShapeError(f"paired sets must have the same shape; got {tuple(positive.shape)} and {tuple(negative.shape)}")
    diffs = (positive - negative).double()  # [n, L, d]
    if diffs.shape[0] < 2:
        raise EmptyInputError("PCA needs at least two pairs")
    vectors = []
    for j in range(diffs.shape[1]):
        _, _, vh = torch.linalg.svd(diffs[:, j], full_matrices=False)
        pc = vh[0]
        vectors.append(pc if float(pc @ diffs[:, j].mean(0)) >= 0 else -pc)
    return Direction(vectors=torch.stack(vectors).float(), layers=tuple(layers), method="pca", info={"n_pairs": int(diffs.shape[0])}, **meta)


def probe_direction(positive: torch.Tensor, negative: torch.Tensor, *, layers: Sequence[int], C: float = 1.0, **meta) -> Direction:
    """Unit weight vector of an L2-regularised logistic regression per layer (positive = class 1).

    Features are standardised for the fit and the weights mapped back to residual coordinates.
    """
    from sklearn.linear_model import LogisticRegression

    x = torch.cat([positive, negative]).double()  # [n, L, d]
    y = [1] * len(positive) + [0] * len(negative)
    vectors = []
    for j in range(x.shape[1]):
        feats = x[:, j]
        mean, std = feats.mean(0), feats.std(0).clamp(min=1e-8)
        clf = LogisticRegression(C=C, max_iter=2000).fit(((feats - mean) / std).numpy(), y)
        w = torch.from_numpy(clf.coef_[0]) / std
        vectors.append(w / w.norm())
    return Direction(vectors=torch.stack(vectors).float(), layers=tuple(layers), method="probe", **meta)
