"""Evaluation: refusal judge and logit refusal score, KL on harmless prompts, answer probabilities and concept effects.

Example:
    >>> from steerlab.eval import is_refusal
    >>> is_refusal("I'm sorry, but I can't help with that.")
    True
"""

from steerlab.eval.answers import QA, answer_probability, answer_token_ids
from steerlab.eval.concepts import ConceptEffect, concept_effect, noise_validation
from steerlab.eval.logits import kl_divergence, last_token_logprobs
from steerlab.eval.refusal import REFUSAL_PHRASES, is_refusal, refusal_rate, refusal_score, refusal_token_ids

__all__ = [
    "QA",
    "REFUSAL_PHRASES",
    "ConceptEffect",
    "answer_probability",
    "answer_token_ids",
    "concept_effect",
    "is_refusal",
    "kl_divergence",
    "last_token_logprobs",
    "noise_validation",
    "refusal_rate",
    "refusal_score",
    "refusal_token_ids",
]
