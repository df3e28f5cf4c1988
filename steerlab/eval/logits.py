"""Next-token distributions at the last prompt position, and KL between two of them.

Example:
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> lp = last_token_logprobs(model, ["Say hi.", "Write a poem."])
    >>> lp.shape == (2, model.hf.config.vocab_size), bool(abs(lp.exp().sum(-1) - 1).max() < 1e-4)
    (True, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from steerlab.errors import ShapeError
from steerlab.reader import PerPrompt, Tap, read

if TYPE_CHECKING:
    from steerlab.model import Model


def last_token_logprobs(model: Model, prompts: Sequence[str], *, batch_size: int = 16, chat: bool = True) -> torch.Tensor:
    """Log-probabilities [n, vocab] (float32, CPU) of the token after each prompt.

    Runs inside whatever ``model.apply(...)`` scope is active, so it measures interventions too.
    Only the last position goes through the unembedding.
    """
    logprobs = PerPrompt("last", fn=lambda logits: torch.log_softmax(logits.float(), dim=-1))
    return read(model, list(prompts), taps=[Tap("logits", None, logprobs)], batch_size=batch_size, chat=chat)[0]


def kl_divergence(base_logprobs: torch.Tensor, other_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(base || other) per row, in nats."""
    if base_logprobs.shape != other_logprobs.shape:
        raise ShapeError(f"shapes differ: {tuple(base_logprobs.shape)} vs {tuple(other_logprobs.shape)}")
    return (base_logprobs.exp() * (base_logprobs - other_logprobs)).sum(-1)
