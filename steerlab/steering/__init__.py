"""Directions in the residual stream: the ``Direction`` value, fitters and steer ops.

Example:
    >>> from steerlab.steering import Direction, mean_difference, AddVector, Ablate, Clamp
"""

from steerlab.steering.direction import Direction
from steerlab.steering.fit import MeanDifference, mean_difference, pca_direction, prompts_hash
from steerlab.steering.ops import Ablate, AddVector, Clamp

__all__ = ["Ablate", "AddVector", "Clamp", "Direction", "MeanDifference", "mean_difference", "pca_direction", "prompts_hash"]
