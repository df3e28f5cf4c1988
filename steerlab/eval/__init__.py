"""Evaluation: refusal judge and logit refusal score, KL on harmless prompts.

Example:
    >>> from steerlab.eval import is_refusal
    >>> is_refusal("I'm sorry, but I can't help with that.")
    True
"""

from steerlab.eval.logits import kl_divergence, last_token_logprobs
from steerlab.eval.refusal import REFUSAL_PHRASES, is_refusal, refusal_rate, refusal_score, refusal_token_ids

__all__ = [
    "REFUSAL_PHRASES",
    "is_refusal",
    "kl_divergence",
    "last_token_logprobs",
    "refusal_rate",
    "refusal_score",
    "refusal_token_ids",
]
