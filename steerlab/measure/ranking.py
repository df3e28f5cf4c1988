"""Ranking score tables: one ``top(k=None, *, fraction=None)`` convention for every score result.

``k`` is a count; ``fraction`` a share of all entries in (0, 1] (rounded, at least one), as
:meth:`steerlab.training.selection.Ranking.top` takes them.

Example:
    >>> import torch
    >>> rank_order(torch.tensor([0.1, -3.0, 2.0]), "abs").tolist()
    [1, 2, 0]
    >>> how_many(10, total=40), how_many(fraction=0.05, total=40)
    (10, 2)
"""

from __future__ import annotations

from typing import Literal

import torch

from steerlab.errors import InvalidValueError

Order = Literal["abs", "desc", "asc"]


def rank_order(scores: torch.Tensor, order: Order) -> torch.Tensor:
    """Flat indices of ``scores`` from most to least important under ``order`` (NaN last, ties in index order)."""
    flat = scores.flatten()
    if order == "abs":
        key = flat.abs()
    elif order == "desc":
        key = flat
    elif order == "asc":
        key = -flat
    else:
        raise InvalidValueError(f"order must be 'abs', 'desc' or 'asc', got {order!r}")
    key = torch.nan_to_num(key, nan=float("-inf"))
    return torch.argsort(key, descending=True, stable=True)


def how_many(k: int | None = None, *, fraction: float | None = None, total: int) -> int:
    """How many of ``total`` entries ``k`` (a count, capped at ``total``) or ``fraction`` select."""
    if (k is None) == (fraction is None):
        raise InvalidValueError("pass exactly one of k=... (a count) or fraction=... (a share in (0, 1])")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidValueError(f"k is a count of at least 1, got {k!r}; pass fraction=... for a share")
        return min(k, total)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise InvalidValueError(f"fraction must be in (0, 1], got {fraction!r}; pass k=... for a count")
    return max(1, round(float(fraction) * total))
