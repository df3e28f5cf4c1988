"""The one generation loop: batching, prompt-length bookkeeping, decoding, and generation policies.

:func:`generate` (what ``Model.generate`` calls) renders prompts through the chat template, runs them
in length-sorted left-padded batches inside :func:`steerlab.hooks.generation` (so active
``model.apply`` edits tell prompt from generated tokens) and returns one result per prompt, in order.

Without a policy each batch goes through transformers ``generate`` (every sampling option works) and
the result is the decoded continuation. With a policy the loop decodes greedily, step by step, on a
:class:`Decoder` it owns (KV cache, attention mask, positions, per-row end flags) and consults the
policy at defined points; the result is the policy's per-row output object. A policy is a frozen
value (``ADAGuard``, ``RefusalTokens``) that follows :class:`GenerationPolicy`:

* ``policy.open(model)`` — once per call, a context manager: validate against the model, install any
  read hooks, yield a :class:`PolicyRun` (removed again on exit);
* ``run.start(decoder)`` — a new batch (reset per-row state);
* ``run.step(decoder, logits)`` — before each generated token (``decoder.depth`` tokens so far):
  return the logits to pick it from (e.g. force the first token), and/or stop rows
  (``decoder.stop(rows)``) after looking ahead on a branch of the cache (``with decoder.branch():``);
* ``run.finish(decoder)`` — per-row outputs (``decoder.tokens(r)`` are row r's generated ids).

Example:
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> len(generate(model, ["Hi", "Tell me a joke."], max_new_tokens=3))
    2
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from tqdm.auto import tqdm

from steerlab import compat
from steerlab.chat import EncodedBatch, check_batch_size
from steerlab.errors import InvalidValueError
from steerlab.hooks import generation

if TYPE_CHECKING:
    from steerlab.model import Model


class PolicyRun(Protocol):
    """A policy's mutable state during one :func:`generate` call (see the module docs)."""

    def start(self, decoder: Decoder) -> None: ...

    def step(self, decoder: Decoder, logits: torch.Tensor) -> torch.Tensor: ...

    def finish(self, decoder: Decoder) -> list[Any]: ...


@runtime_checkable
class GenerationPolicy(Protocol):
    """A frozen value the generation loop consults: ``open(model)`` yields its :class:`PolicyRun`."""

    def open(self, model: Model) -> AbstractContextManager[PolicyRun]: ...


def eos_ids(model: Model) -> set[int]:
    """The tokenizer's EOS plus any the generation config lists (Qwen has two)."""
    extra = getattr(getattr(model.hf, "generation_config", None), "eos_token_id", None)
    ids = {model.tokenizer.eos_token_id, *(extra if isinstance(extra, (list, tuple)) else [extra])}
    ids.discard(None)
    return {int(i) for i in ids}


def pad_id(model: Model) -> int:
    """The pad token id (EOS when the tokenizer has none)."""
    tok = model.tokenizer
    return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


class Decoder:
    """The generation state of one padded batch, owned by the loop: cache, mask, positions, end flags.

    ``depth`` is how many tokens have been generated; ``done`` marks rows that produced an end token,
    ``stopped`` rows a policy stopped (:meth:`stop`; ``stopped_at`` records the depth).
    """

    def __init__(self, model: Model, batch: EncodedBatch, *, eos: set[int]) -> None:
        self.model, self.batch, self.eos = model, batch, eos
        self.cache = compat.dynamic_cache(model.hf.config)
        if hasattr(self.cache, "activate_past_recording"):  # sliding-window layers keep what a rollback needs
            self.cache.activate_past_recording()
        self.mask = batch.attention_mask.clone()
        self.pos = batch.position_ids[:, -1].clone()
        self.done = torch.zeros(len(batch), dtype=torch.bool, device=model.device)
        self.stopped = torch.zeros_like(self.done)
        self.stopped_at: list[int | None] = [None] * len(batch)
        self.depth = 0
        self.generated: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.batch)

    @property
    def live(self) -> torch.Tensor:
        """Rows still generating ``[b]`` (bool)."""
        return ~(self.done | self.stopped)

    def stop(self, rows: Sequence[int]) -> None:
        """Stop ``rows`` at the current depth: they generate nothing more."""
        for r in rows:
            if not bool(self.stopped[r]):
                self.stopped[r] = True
                self.stopped_at[r] = self.depth

    def prefill(self) -> torch.Tensor:
        """Run the prompt through the cache; the first step's logits ``[b, vocab]``."""
        hf = self.model.hf
        out = hf(**compat.with_cache(hf, self.cache, **self.batch.model_inputs(), logits_to_keep=1))
        return out.logits[:, -1]

    def advance(self, ids: torch.Tensor) -> torch.Tensor:
        """Append ``ids`` ``[b, k]`` after the cache; the last position's logits ``[b, vocab]``."""
        k = ids.shape[1]
        self.mask = torch.cat([self.mask, torch.ones(len(ids), k, dtype=self.mask.dtype, device=self.mask.device)], 1)
        pos = self.pos[:, None] + 1 + torch.arange(k, device=ids.device)[None]
        self.pos = pos[:, -1]
        hf = self.model.hf
        out = hf(**compat.with_cache(hf, self.cache, input_ids=ids, attention_mask=self.mask, position_ids=pos, logits_to_keep=1))
        return out.logits[:, -1]

    @contextmanager
    def branch(self) -> Iterator[Decoder]:
        """A temporary extension: :meth:`advance` inside it is undone on exit (cache cropped back, never copied)."""
        length, mask, pos = self.cache.get_seq_length(), self.mask, self.pos
        try:
            yield self
        finally:
            compat.crop_cache(self.cache, length)
            self.mask, self.pos = mask, pos

    def tokens(self, row: int) -> list[int]:
        """Row ``row``'s generated ids, up to (not including) its end token or the step that stopped it."""
        ids = [int(t[row]) for t in self.generated[: self.stopped_at[row]]]
        for k, t in enumerate(ids):
            if t in self.eos:
                return ids[:k]
        return ids


def _decode_batch(model: Model, batch: EncodedBatch, run: PolicyRun, *, eos: set[int], max_new_tokens: int) -> list[Any]:
    """Greedy step-by-step decoding of one batch, consulting ``run``; its per-row outputs, in order."""
    dec = Decoder(model, batch, eos=eos)
    run.start(dec)
    end = torch.tensor(sorted(eos), device=model.device)  # built once, not per generated token
    pad = torch.tensor(pad_id(model), device=model.device)
    logits = dec.prefill()
    for depth in range(max_new_tokens):
        dec.depth = depth
        logits = run.step(dec, logits)
        if not bool(dec.live.any()):
            break
        nxt = torch.where(dec.live, logits.argmax(-1), pad)
        dec.generated.append(nxt)
        dec.done |= torch.isin(nxt, end)
        if depth + 1 < max_new_tokens and bool(dec.live.any()):
            logits = dec.advance(nxt[:, None])
    dec.depth = len(dec.generated)
    return run.finish(dec)


@torch.inference_mode()
def generate(
    model: Model,
    prompts: Sequence[str],
    *,
    policy: GenerationPolicy | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    chat: bool = True,
    system: str | None = None,
    responses: Sequence[str] | None = None,
    progress: bool = False,
    **kwargs: Any,
) -> list[Any]:
    """Generate for every prompt in length-sorted batches; one result per prompt, in prompt order.

    ``policy=None``: transformers ``generate`` (greedy unless ``kwargs`` say otherwise), decoded
    continuations (``list[str]``). With a policy: greedy decoding on a :class:`Decoder`, the policy's
    per-row outputs (``ADAOutput``, ``RefusalTokenOutput``); ``kwargs`` are not accepted then.
    ``responses`` prefills the start of each assistant turn; the continuation is what follows it.
    """
    check_batch_size(batch_size)
    from steerlab.policy_scope import active_policy

    scope = active_policy(model)
    if scope is not None and not scope.generating:  # a policy applied with model.apply: decode with it, return texts
        if policy is not None or kwargs:
            raise InvalidValueError(f"{type(scope.policy).__name__} is applied (model.apply), so generate decodes with it "
                                    "greedily; drop policy= and generation options inside the scope")  # fmt: skip
        scope.generating = True
        try:
            outputs = generate(model, prompts, policy=scope.policy, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               chat=chat, system=system, responses=responses, progress=progress)  # fmt: skip
        finally:
            scope.generating = False
        scope.session.policy_outputs.extend(outputs)
        return [o.text for o in outputs]
    if policy is not None and not isinstance(policy, GenerationPolicy):
        raise InvalidValueError(
            f"policy must be a generation policy such as ADAGuard(...) or RefusalTokens(...), not {type(policy).__name__}; "
            "pass policy=None for plain generation"
        )
    if policy is not None and kwargs:
        raise InvalidValueError(
            f"generation options {sorted(kwargs)} are not supported with a policy (it decodes greedily); drop them or pass policy=None"
        )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidValueError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}")
    fmt = model.chat(system=system, chat=chat)
    rows = fmt.tokenize(prompts, responses=responses)
    results: list[Any] = [None] * len(rows)
    bar = tqdm(total=len(rows), desc="generating", unit="prompt", disable=not progress)
    try:
        if policy is None:
            kwargs.setdefault("do_sample", False)
            kwargs.setdefault("pad_token_id", pad_id(model))
            for idx, batch in fmt.batches(rows, batch_size):
                batch = batch.to(model.device)
                width = int(batch.input_ids.shape[1])
                with generation(model, width):  # position-aware ops tell prompt from generated tokens
                    out = model.hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=max_new_tokens, **kwargs)
                for i, text in zip(idx, model.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)):
                    results[i] = text
                bar.update(len(idx))
            return results
        eos = eos_ids(model)
        with policy.open(model) as run:
            for idx, batch in fmt.batches(rows, batch_size):
                batch = batch.to(model.device)
                with generation(model, int(batch.input_ids.shape[1])):
                    outs = _decode_batch(model, batch, run, eos=eos, max_new_tokens=max_new_tokens)
                for i, out in zip(idx, outs):
                    results[i] = out
                bar.update(len(idx))
        return results
    finally:
        bar.close()
