"""Next-token distributions at the last prompt position, and KL between two of them.

Example:
    >>> lp = last_token_logprobs(model, ["Say hi."])            # doctest: +SKIP
    >>> lp.shape                                                 # doctest: +SKIP
    torch.Size([1, 151936])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from steerlab.errors import EmptyInputError, ShapeError

if TYPE_CHECKING:
    from steerlab.model import Model


@torch.inference_mode()
def last_token_logprobs(model: Model, prompts: Sequence[str], *, batch_size: int = 16, chat: bool = True) -> torch.Tensor:
    """Log-probabilities [n, vocab] (float32, CPU) of the token after each prompt.

    Runs inside whatever ``model.apply(...)`` scope is active, so it measures interventions too.
    Only the last position goes through the unembedding (``logits_to_keep=1``).
    """
    prompts = list(prompts)
    if not prompts:
        raise EmptyInputError("the prompt list is empty; pass at least one prompt")
    fmt = model.chat(chat=chat)
    out = [None] * len(prompts)
    for idx, batch in fmt.batches(fmt.tokenize(prompts), batch_size):
        batch = batch.to(model.device)
        logits = model.hf(**batch.model_inputs(), use_cache=False, logits_to_keep=1).logits[:, -1]
        for row, i in enumerate(idx):
            out[i] = torch.log_softmax(logits[row].float(), dim=-1).cpu()
    return torch.stack(out)


def kl_divergence(base_logprobs: torch.Tensor, other_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(base || other) per row, in nats."""
    if base_logprobs.shape != other_logprobs.shape:
        raise ShapeError(f"shapes differ: {tuple(base_logprobs.shape)} vs {tuple(other_logprobs.shape)}")
    return (base_logprobs.exp() * (base_logprobs - other_logprobs)).sum(-1)
