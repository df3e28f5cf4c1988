"""Directions in the residual stream: the ``Direction`` value, fitters and steer ops.

Example:
    >>> from steerlab.steering import Direction, mean_difference, AddVector, Ablate, Clamp
"""

from steerlab.steering.direction import Direction
from steerlab.steering.fit import MeanDifference, mean_difference, pca_direction, probe_direction, prompts_hash
from steerlab.steering.harmfulness import class_directions, harmfulness_direction, steer_prompt
from steerlab.steering.ops import Ablate, AddVector, Clamp
from steerlab.steering.refusal import SelectionReport, refusal_direction

__all__ = [
    "Ablate",
    "AddVector",
    "Clamp",
    "Direction",
    "MeanDifference",
    "SelectionReport",
    "class_directions",
    "harmfulness_direction",
    "mean_difference",
    "pca_direction",
    "probe_direction",
    "prompts_hash",
    "refusal_direction",
    "steer_prompt",
]
