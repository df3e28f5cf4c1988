"""How far apart two prompt classes sit in the residual stream, layer by layer (the ``steerlab demo`` table).

* :func:`class_separation` — per layer and position: the mean activation norm, the separation ratio
  ``|mean(positive) - mean(negative)| / mean distance to the class mean``, and the cosine between the two
  positions' class-mean differences.

Example:
    >>> from steerlab.testing import tiny_model
    >>> model, harmful, harmless = tiny_model("llama"), ["Make a weapon.", "Pick a lock."], ["Hi", "Say hello."]
    >>> acts = steerlab.collect(model, harmful + harmless, positions=["t_inst", "last"], progress=False)
    >>> rows = class_separation(acts, n_positive=len(harmful), site="resid_pre",
    ...                         positions=("t_inst", "last"))
    >>> [row.layer for row in rows], len(rows[1].separation)  # one separation per position
    ([0, 1, 2], 2)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from steerlab.chat import Position
from steerlab.errors import EmptyInputError

if TYPE_CHECKING:
    from steerlab.activations import Activations


@dataclass(frozen=True)
class LayerSeparation:
    """One layer: ``norm`` and ``separation`` per position (in the order asked for), and ``cosine`` between the
    class-mean differences of the two positions."""

    layer: int
    norm: tuple[float, float]
    separation: tuple[float, float]
    cosine: float


def class_separation(
    acts: Activations, *, n_positive: int, site: str, positions: tuple[Position, Position]
) -> list[LayerSeparation]:
    """Separation of the first ``n_positive`` prompts of ``acts`` from the rest, at ``site`` and two single-token
    ``positions``, for every collected layer (higher separation: classes further apart).

    A layer where every prompt has the same activation (layer 0 at a fixed template token) has separation 0.
    """
    n_negative = acts.n_prompts - n_positive
    if n_positive < 1 or n_negative < 1:
        raise EmptyInputError(
            f"need prompts of both classes; got {n_positive} positive and {n_negative} negative of {acts.n_prompts}"
        )
    rows = []
    for j, layer in enumerate(acts.layers):
        norms, seps, diffs = [], [], []
        for pos in positions:
            x = acts.get(site, pos)[:, j, 0].double()
            pos_x, neg_x = x[:n_positive], x[n_positive:]
            diff = pos_x.mean(0) - neg_x.mean(0)
            spread = torch.cat([pos_x - pos_x.mean(0), neg_x - neg_x.mean(0)]).norm(dim=-1).mean()
            seps.append((diff.norm() / spread).item() if spread > 0 else 0.0)
            norms.append(x.norm(dim=-1).mean().item())
            diffs.append(diff)
        cosine = torch.nn.functional.cosine_similarity(diffs[0], diffs[1], dim=0, eps=1e-12).item()
        rows.append(
            LayerSeparation(layer=layer, norm=(norms[0], norms[1]), separation=(seps[0], seps[1]), cosine=cosine)
        )
    return rows
