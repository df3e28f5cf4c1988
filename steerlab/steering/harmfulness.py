"""Harmfulness vs refusal directions (METHODS 2, Zhao et al. 2025).

The harmfulness direction is the difference of class means at ``t_inst`` (the instruction's
last token); the refusal direction of that paper is the same difference at the last prompt token
(``t_post_inst``). Both are unnormalised and fitted at every layer, so their cosine can be read
layer by layer and either can be added at one layer (coefficient 2, prompt tokens only).

Example:
    >>> from steerlab.testing import tiny_model
    >>> model, harmful, harmless = tiny_model("llama"), ["Make a weapon.", "Pick a lock."], ["Hi", "Say hello."]
    >>> dirs = class_directions(model, harmful, harmless, progress=False)
    >>> list(dirs["t_inst"].cosine(dirs["last"]))  # one cosine per layer
    [0, 1, 2]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from steerlab.activations import collect
from steerlab.chat import Position
from steerlab.steering.direction import Direction
from steerlab.steering.fit import mean_difference, prompts_hash
from steerlab.steering.ops import AddVector

if TYPE_CHECKING:
    from steerlab.model import Model


def class_directions(
    model: Model,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    positions: Sequence[Position] = ("t_inst", "last"),
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[Position, Direction]:
    """Mean(harmful) - mean(harmless) of ``resid_pre`` at each position, for every layer."""
    kw = dict(sites=["resid_pre"], layers=layers, positions=list(positions), batch_size=batch_size, progress=progress)
    pos_acts, neg_acts = collect(model, harmful, **kw), collect(model, harmless, **kw)
    digest = prompts_hash(harmful, harmless)
    return {
        p: mean_difference(
            pos_acts.get("resid_pre", p)[:, :, -1],
            neg_acts.get("resid_pre", p)[:, :, -1],
            layers=pos_acts.layers,
            site="resid_pre",
            position=p,
            model=model,
            data_hash=digest,
        )
        for p in positions
    }


def harmfulness_direction(model: Model, harmful: Sequence[str], harmless: Sequence[str], **kwargs) -> Direction:
    """The harmfulness direction at ``t_inst`` for every layer (METHODS 2)."""
    return class_directions(model, harmful, harmless, positions=("t_inst",), **kwargs)["t_inst"]


def steer_prompt(direction: Direction, layer: int, *, coeff: float = 2.0) -> AddVector:
    """METHODS 2 steering: add ``coeff * v_layer`` at one layer, prompt tokens only."""
    return AddVector(direction, coeff=coeff, layers=[layer], tokens="prompt")
