"""What the current forward call is: batch shape, how many tokens the KV cache held before it, and whether
a generation is running. A :class:`~steerlab.hooks.HookSession` records one :class:`StepInfo` per call;
every hook it places reads it through its :class:`~steerlab.hooks.HookContext`.

Example:
    >>> from steerlab.step import StepInfo, past_length_of
    >>> import torch
    >>> step = StepInfo(batch_size=1, seq_len=3, attention_mask=torch.ones(1, 3))
    >>> past_length_of((), {}, step)
    0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from steerlab import compat
from steerlab.errors import GenerationStateError


@dataclass
class StepInfo:
    """What the current forward call is: how many tokens the cache held before it, how many it adds.

    ``past_length`` is read from the KV cache the call receives (under whichever keyword the installed
    transformers passes it) and checked against the attention mask's width; a call whose past length
    cannot be determined raises :class:`~steerlab.errors.GenerationStateError` instead of guessing 0.
    ``prompt_length`` is the padded prompt width of the generation in progress (``None`` outside one),
    set by :func:`generation` for the whole call.
    """

    batch_size: int = 0
    seq_len: int = 0
    past_length: int = 0
    attention_mask: torch.Tensor | None = None  # [b, past_length + seq_len] when given
    calls: int = 0
    prompt_length: int | None = None


def past_length_of(args: tuple, kwargs: dict, step: StepInfo) -> int:
    """How many tokens the KV cache held before this forward call.

    Read from the cache (whatever keyword the installed transformers passes it under) and checked
    against the attention mask, which spans cache + new tokens. With no cache, a mask wider than the
    new tokens, or a step inside a generation that is shorter than the prompt, means a cache this code
    cannot see: that raises :class:`~steerlab.errors.GenerationStateError` rather than report 0.
    """
    cache = compat.find_cache(args, kwargs)
    mask = step.attention_mask
    width = int(mask.shape[-1]) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    if cache is not None:
        past = int(cache.get_seq_length())
        if width is not None and width != past + step.seq_len:
            raise GenerationStateError(
                f"the KV cache holds {past} tokens and this call adds {step.seq_len}, but the attention mask spans "
                f"{width}: steerlab cannot tell which tokens are new. Pass a mask covering cache + new tokens."
            )
        return past
    if width is not None and width != step.seq_len:
        raise GenerationStateError(
            f"this forward call adds {step.seq_len} tokens under an attention mask of {width}, but steerlab finds no "
            f"KV cache among its arguments ({', '.join(sorted(kwargs))}); the installed transformers passes the cache "
            "in a way steerlab.compat does not know — use a transformers version in steerlab's tested range"
        )
    if width is None and step.prompt_length is not None and step.seq_len < step.prompt_length:
        raise GenerationStateError(
            f"a generation step of {step.seq_len} tokens (prompt: {step.prompt_length}) came without a KV cache or "
            "attention mask steerlab can read, so the tokens' positions are unknown"
        )
    return 0
