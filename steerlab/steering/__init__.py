"""Directions in the residual stream: the ``Direction`` value, its fitters and the steer ops; refusal,
harmfulness and truthfulness directions; comparing and transferring directions across models; concept vectors.

Internals (selection reports, per-statement activations, vocabulary projections, ...) stay importable from
their modules: :mod:`~steerlab.steering.fit`, :mod:`~steerlab.steering.refusal`,
:mod:`~steerlab.steering.harmfulness`, :mod:`~steerlab.steering.truthfulness`,
:mod:`~steerlab.steering.compare`, :mod:`~steerlab.steering.concept_vectors`.

Example:
    >>> import torch
    >>> from steerlab.steering import mean_difference
    >>> d = mean_difference(torch.ones(4, 1, 8), torch.zeros(4, 1, 8), layers=[2])
    >>> d.layers, d.at(2).shape
    ((2,), torch.Size([8]))
"""

from steerlab.steering.compare import compare_directions, transfer_direction
from steerlab.steering.concept_vectors import find_concept_vectors
from steerlab.steering.direction import Direction
from steerlab.steering.fit import MeanDifference, mean_difference, pca_direction, probe_direction
from steerlab.steering.harmfulness import harmfulness_direction
from steerlab.steering.ops import Ablate, AddVector, Clamp
from steerlab.steering.refusal import refusal_direction
from steerlab.steering.truthfulness import truthfulness_direction

__all__ = [
    "Ablate",
    "AddVector",
    "Clamp",
    "Direction",
    "MeanDifference",
    "compare_directions",
    "find_concept_vectors",
    "harmfulness_direction",
    "mean_difference",
    "pca_direction",
    "probe_direction",
    "refusal_direction",
    "transfer_direction",
    "truthfulness_direction",
]
