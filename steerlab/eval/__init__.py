"""Evaluation: refusal judge and logit refusal score, KL on harmless prompts, answer probabilities and concept effects.

Helpers (refusal phrases and token ids, last-token log-probabilities, answer token ids, noise baselines) stay
importable from their modules: :mod:`~steerlab.eval.refusal`, :mod:`~steerlab.eval.logits`,
:mod:`~steerlab.eval.answers`, :mod:`~steerlab.eval.concepts`.

Example:
    >>> from steerlab.eval import is_refusal, refusal_rate
    >>> is_refusal("I'm sorry, but I can't help with that.")
    True
    >>> refusal_rate(["I cannot help with that.", "Sure! Here is a poem."])
    0.5
"""

from steerlab.eval.answers import answer_probability
from steerlab.eval.concepts import concept_effect
from steerlab.eval.logits import kl_divergence
from steerlab.eval.refusal import is_refusal, refusal_rate, refusal_score

__all__ = [
    "answer_probability",
    "concept_effect",
    "is_refusal",
    "kl_divergence",
    "refusal_rate",
    "refusal_score",
]
