"""Directions in the residual stream: the ``Direction`` value, fitters and steer ops; truthfulness directions and
comparing / transferring directions across models; parametric concept vectors (down-projection columns).

Example:
    >>> from steerlab.steering import Direction, mean_difference, AddVector, Ablate, Clamp
"""

from steerlab.steering.compare import LayerCosines, compare_directions, map_layer, transfer_direction
from steerlab.steering.concept_vectors import (
    ConceptHit,
    ConceptSearch,
    ConceptTokenError,
    VocabProjection,
    concept_token_ids,
    find_concept_vectors,
)
from steerlab.steering.direction import Direction
from steerlab.steering.fit import MeanDifference, mean_difference, pca_direction, probe_direction, prompts_hash
from steerlab.steering.harmfulness import class_directions, harmfulness_direction, steer_prompt
from steerlab.steering.ops import Ablate, AddVector, Clamp
from steerlab.steering.refusal import SelectionReport, refusal_direction
from steerlab.steering.truthfulness import (
    JUDGE_TEMPLATE,
    SteeringEffect,
    TruthReport,
    projection_accuracy,
    statement_activations,
    steering_effect,
    truth_judgement,
    truthfulness_direction,
    truthfulness_report,
)

__all__ = [
    "JUDGE_TEMPLATE",
    "Ablate",
    "AddVector",
    "Clamp",
    "ConceptHit",
    "ConceptSearch",
    "ConceptTokenError",
    "Direction",
    "LayerCosines",
    "MeanDifference",
    "SelectionReport",
    "SteeringEffect",
    "TruthReport",
    "VocabProjection",
    "class_directions",
    "compare_directions",
    "concept_token_ids",
    "find_concept_vectors",
    "harmfulness_direction",
    "map_layer",
    "mean_difference",
    "pca_direction",
    "probe_direction",
    "projection_accuracy",
    "prompts_hash",
    "refusal_direction",
    "statement_activations",
    "steer_prompt",
    "steering_effect",
    "transfer_direction",
    "truth_judgement",
    "truthfulness_direction",
    "truthfulness_report",
]
