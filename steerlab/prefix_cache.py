"""Compute the prefix every prompt shares (the chat template's system turn) once per call, not once per row.

A batch of chat-templated prompts starts with the same tokens (``<|im_start|>system ... user\\n``).
:func:`shared_prefix_length` finds how many of them can be skipped: common to every row and before
every position the caller reads. The first batch runs in full with a KV cache
(:func:`new_cache`); :func:`take_prefix` keeps one row's keys and values for the shared tokens; each
later batch then runs only the rest of its rows (:func:`suffix_inputs`), laid out as
``[shared prefix (cached)] [padding] [row's own tokens]`` with the positions the full rows had, so
every real token sees the same context. Indices into a later batch move left by the prefix length.

Only plain full-attention KV caches qualify; other models (sliding windows, ...) keep the plain path.
A call with one batch runs exactly as before.

Example:
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> fmt = model.chat()
    >>> rows = fmt.tokenize(["Hi", "Say hello."])
    >>> first, batch = [b for _, b in fmt.batches(rows, 1)]            # two batches of one row
    >>> p = shared_prefix_length(rows, [first, batch], ["last"])
    >>> p                                                               # the system turn and "<|im_start|>user\\n"
    18
    >>> cache = new_cache(model)
    >>> _ = model.hf(**compat.with_cache(model.hf, cache, **first.model_inputs()))
    >>> kv = take_prefix(cache, first, p)
    >>> short = model.hf(**suffix_inputs(batch, kv, model)).logits      # runs only the tokens after the prefix
    >>> full = model.hf(**batch.model_inputs()).logits
    >>> short.shape[1] == full.shape[1] - p, torch.allclose(short[:, -1], full[:, -1], atol=1e-5)
    (True, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from steerlab import compat
from steerlab.chat import EncodedBatch, Position, TokenizedRow

MIN_SHARED = 8  # below this the saving is not worth a different code path
PrefixKV = list[tuple[torch.Tensor | None, torch.Tensor | None]]  # per decoder layer, [1, kv_heads, p, dh]


def shared_prefix_length(
    rows: Sequence[TokenizedRow], batches: Sequence[EncodedBatch], positions: Sequence[Position]
) -> int:
    """Tokens every row starts with that no requested position reads (0 if fewer than ``MIN_SHARED``).

    At least one token of each row stays outside the prefix. ``"all"`` reads every token: 0.
    """
    if len(batches) < 2 or "all" in positions:
        return 0
    first = rows[0][0]
    shared = min(len(r[0]) for r in rows) - 1
    for ids, *_ in rows[1:]:
        n = 0
        while n < shared and ids[n] == first[n]:
            n += 1
        shared = n
    for batch in batches:
        start = batch.input_ids.shape[1] - batch.lengths  # left padding: first real token of each row
        for p in positions:
            first = torch.tensor([min(row) for row in batch.tokens(p)])
            shared = min(shared, int((first - start).min()))
    return shared if shared >= MIN_SHARED else 0


def new_cache(model: Any) -> Any | None:
    """An empty KV cache for ``model``, or ``None`` if its layers are not all plain full attention."""
    cache = compat.dynamic_cache(model.hf.config)
    return cache if compat.has_only_full_attention(cache) else None


def take_prefix(cache: Any, batch: EncodedBatch, prefix_len: int) -> PrefixKV | None:
    """Keys and values of the first ``prefix_len`` real tokens of ``batch``'s first row (``None`` if the
    forward pass left the cache empty)."""
    start = int(batch.input_ids.shape[1] - batch.lengths[0])
    out: PrefixKV = []
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False) and layer.get_seq_length() >= start + prefix_len:
            cut = slice(start, start + prefix_len)
            out.append((layer.keys[:1, :, cut].clone(), layer.values[:1, :, cut].clone()))
        else:
            out.append((None, None))
    return out if out and out[0][0] is not None else None


def suffix_inputs(batch: EncodedBatch, prefix: PrefixKV, model: Any) -> dict[str, Any]:
    """Forward kwargs for ``batch`` without its shared prefix, which comes from ``prefix``'s cache."""
    b, width = batch.input_ids.shape
    prefix_len = int(prefix[0][0].shape[2])
    device = batch.input_ids.device
    start = (width - batch.lengths).to(device)  # first real token of each row
    cols = torch.arange(width - prefix_len, device=device)[None, :]
    idx = cols + prefix_len * (cols >= start[:, None])  # skip the prefix columns, keep padding in front
    mask = batch.attention_mask.gather(1, idx)
    expand = lambda t: None if t is None else t.expand(b, -1, -1, -1)
    cache = compat.dynamic_cache(model.hf.config, [(expand(k), expand(v)) for k, v in prefix])
    return compat.with_cache(
        model.hf,
        cache,
        input_ids=batch.input_ids.gather(1, idx),
        attention_mask=torch.cat([torch.ones(b, prefix_len, dtype=mask.dtype, device=device), mask], 1),
        position_ids=batch.position_ids.gather(1, idx),
    )
