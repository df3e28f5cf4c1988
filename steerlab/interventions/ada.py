"""Any-Depth Alignment (ADA, METHODS 4): re-insert the assistant header during generation and ask again.

Every ``every`` generated tokens (and at depth 0, right after the prompt and any prefilled
response) the model's own assistant-header tokens (ChatML: ``<|im_end|>\\n<|im_start|>assistant\\n``)
are appended to each row on a temporary extension of the KV cache; the model's judgement is read
there, and the cache is cropped back (the main sequence never changes and the cache is never
copied). Two readers:

* ``ADA-LP`` (``mode="probe"``): a logistic probe on ``resid_pre`` at one layer, at the last header
  token; ``P(harmful) >= threshold`` stops the row. The forward pass stops at the probe's layer.
  A probe over several layers scores the mean of its per-layer probabilities (an extension of the
  paper's one-layer reader).
* ``ADA-RK`` (``mode="rethink"``): a short greedy look-ahead after the header, judged by the
  refusal-phrase judge; a refusal stops the row.

Rows stop independently; a stopped row's answer is ``refusal_text``. Active ``model.apply``
interventions apply to the generation (and to the checks).

Example:
    >>> guard = ADAGuard(probe=probe.select(12), every=25)                           # doctest: +SKIP
    >>> outs = ada_generate(model, prompts, guard, responses=prefills, max_new_tokens=64)  # doctest: +SKIP
    >>> [(o.stopped, o.fired_at) for o in outs]                                      # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from steerlab import compat
from steerlab.errors import EmptyInputError, ShapeError, SteerlabError
from steerlab.eval import is_refusal
from steerlab.hooks import StopForward, generation
from steerlab.probes.probe import Probe

if TYPE_CHECKING:
    from steerlab.chat import EncodedBatch
    from steerlab.model import Model

REFUSAL_TEXT = "I'm sorry, but I can't help with that."


@dataclass(frozen=True)
class ADAGuard:
    """How and when to check: a probe on the header state (ADA-LP; several layers score the mean
    probability) or a look-ahead judge (ADA-RK)."""

    probe: Probe | None = None
    mode: Literal["probe", "rethink"] = "probe"
    every: int = 25
    threshold: float = 0.5
    lookahead: int = 20
    header_ids: tuple[int, ...] | None = None  # default: the chat template's post-instruction span
    refusal_text: str = REFUSAL_TEXT

    def __post_init__(self) -> None:
        if self.mode not in ("probe", "rethink"):
            raise ValueError(f"mode must be 'probe' (ADA-LP) or 'rethink' (ADA-RK); got {self.mode!r}")
        if self.mode == "probe":
            if self.probe is None:
                raise ShapeError("ADA-LP needs a probe: ADAGuard(probe=probe.select(layer))")
            if self.probe.site != "resid_pre":
                raise ShapeError(f"ADA-LP reads resid_pre at the header; got a {self.probe.site} probe (fit it on resid_pre states)")
        if self.every < 1:
            raise ValueError(f"every must be at least 1 token; got {self.every}")


@dataclass(frozen=True)
class ADACheck:
    """One checkpoint of one row: depth (tokens generated before it), the score read there and, with
    ``ada_generate(..., record_layers=...)``, the header states ``[n_layers, d]`` (float32)."""

    depth: int
    score: float
    states: torch.Tensor | None = None


@dataclass(frozen=True)
class ADAOutput:
    """A row's result: the answer (``refusal_text`` if stopped), the partial generation, what fired where."""

    text: str
    stopped: bool
    fired_at: int | None
    partial: str
    checks: tuple[ADACheck, ...] = field(default=())
    token_ids: tuple[int, ...] = field(default=())  # generated ids (up to EOS or the firing check)


def _eos_ids(model: Model) -> set[int]:
    """The tokenizer's EOS plus any the generation config lists (Qwen has two)."""
    extra = getattr(getattr(model.hf, "generation_config", None), "eos_token_id", None)
    ids = {model.tokenizer.eos_token_id, *(extra if isinstance(extra, (list, tuple)) else [extra])}
    ids.discard(None)
    return {int(i) for i in ids}


def _until_end(ids: list[int], eos: set[int]) -> list[int]:
    """Generated ids up to (not including) the first end-of-sequence token."""
    for k, t in enumerate(ids):
        if t in eos:
            return ids[:k]
    return ids


def _header(model: Model, guard: ADAGuard) -> torch.Tensor:
    ids = guard.header_ids if guard.header_ids is not None else model.chat().header_ids
    if not ids:
        raise ShapeError("the assistant header is empty; pass header_ids=... explicitly")
    return torch.tensor(ids, dtype=torch.long, device=model.device)


class _Run:
    """The state of one batch: cache, mask, positions, per-row flags."""

    def __init__(self, model: Model, batch: EncodedBatch) -> None:
        self.model = model
        self.cache = compat.dynamic_cache(model.hf.config)
        if hasattr(self.cache, "activate_past_recording"):  # sliding-window layers keep what a rollback needs
            self.cache.activate_past_recording()
        self.mask = batch.attention_mask.clone()
        self.pos = batch.position_ids[:, -1].clone()
        self.done = torch.zeros(len(batch), dtype=torch.bool, device=model.device)
        self.stopped = torch.zeros_like(self.done)

    def forward(self, ids: torch.Tensor):
        """Run ``ids`` [b, k] after the cache; returns (last-position logits, extended mask, positions)."""
        k = ids.shape[1]
        mask = torch.cat([self.mask, torch.ones(len(ids), k, dtype=self.mask.dtype, device=self.mask.device)], 1)
        pos = self.pos[:, None] + 1 + torch.arange(k, device=ids.device)[None]
        out = self.model.hf(**compat.with_cache(self.model.hf, self.cache, input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1))
        return out.logits[:, -1], mask, pos

    def advance(self, ids: torch.Tensor) -> torch.Tensor:
        """Append ``ids`` [b, k] to the sequences for good."""
        logits, self.mask, pos = self.forward(ids)
        self.pos = pos[:, -1]
        return logits

    def rollback(self, length: int) -> None:
        """Drop every cache entry past ``length``, layer by layer (a check may stop before the last layers)."""
        for layer in getattr(self.cache, "layers", ()):
            if not getattr(layer, "is_initialized", False):
                continue
            extra = layer.get_seq_length() - length
            if extra > 0:
                layer.crop(-extra)


class _HeaderTap:
    """``resid_pre`` hooks that grab the last position of a header pass at some layers and stop the
    pass after the deepest of them (the rest of the forward is not needed)."""

    def __init__(self, layers: Sequence[int], *, stop: bool = True) -> None:
        self.layers = tuple(sorted({int(la) for la in layers}))
        self.stop = stop
        self.active = False
        self.grabbed: dict[int, torch.Tensor] = {}

    def hook(self, layer: int):
        def grab(x: torch.Tensor, ctx) -> None:
            if self.active:
                self.grabbed[layer] = x[:, -1].float().cpu()
                if self.stop and layer == self.layers[-1]:
                    raise StopForward

        return grab

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Grab during the enclosed forward pass; the early stop after the deepest layer ends it quietly."""
        self.active = True
        try:
            yield
        except StopForward:
            pass
        finally:
            self.active = False

    def install(self, hooks, *, name: str) -> None:
        for layer in self.layers:
            hooks.add("resid_pre", layer, self.hook(layer), name=f"{name}.{layer}", required=False)

    def take(self) -> torch.Tensor:
        """The grabbed states ``[b, n_layers, d]`` (in ``self.layers`` order); raises if a hook did not fire."""
        missing = [la for la in self.layers if la not in self.grabbed]
        if missing:
            raise SteerlabError(f"the ADA header hooks at layers {missing} did not fire during the header pass")
        states = torch.stack([self.grabbed[la] for la in self.layers], 1)
        self.grabbed.clear()
        return states


def _header_states(run: _Run, header: torch.Tensor, tap: _HeaderTap) -> torch.Tensor:
    """``resid_pre`` at the last injected header token at ``tap.layers``, ``[b, n_layers, d]``; the cache
    is cropped back."""
    length = run.cache.get_seq_length()
    try:
        with tap.reading():
            run.forward(header[None].expand(len(run.mask), -1))
    finally:
        run.rollback(length)
    return tap.take()


def _rethink_check(run: _Run, guard: ADAGuard, header: torch.Tensor, eos: set[int], tap: _HeaderTap) -> torch.Tensor:
    """1.0 where a greedy look-ahead after the injected header is a refusal, else 0.0; cache cropped back.
    ``tap`` (non-stopping) records the header states if it has layers."""
    length, mask, pos = run.cache.get_seq_length(), run.mask, run.pos
    try:
        with tap.reading():
            logits, run.mask, p = run.forward(header[None].expand(len(mask), -1))
        run.pos = p[:, -1]
        tokens = []
        for _ in range(guard.lookahead):
            nxt = logits.argmax(-1)
            tokens.append(nxt)
            if len(tokens) == guard.lookahead:
                break
            logits = run.advance(nxt[:, None])
    finally:
        run.rollback(length)
        run.mask, run.pos = mask, pos
    texts = run.model.tokenizer.batch_decode([[t for t in row if t not in eos] for row in torch.stack(tokens, 1).tolist()], skip_special_tokens=True)
    return torch.tensor([float(is_refusal(t)) for t in texts])


def checkpoint_states(
    model: Model,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    layer: int | Sequence[int],
    depths: Sequence[int],
    header_ids: Sequence[int] | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What an ADA-LP check reads, for training its probe: ``resid_pre`` at ``layer`` at the last token of
    ``prompt + response[:depth tokens] + header``, for every prompt and depth.

    Returns (states ``[n_prompts * n_depths, d]``, or ``[n_prompts * n_depths, n_layers, d]`` when
    ``layer`` is a list, depth of each row); depths longer than a response are clipped to its length.
    Rows are prompt-major (all depths of prompt 0 first).
    """
    from tqdm.auto import tqdm

    layers = model.layer_indices([layer] if isinstance(layer, int) else sorted(set(layer)))
    if not layers:
        raise EmptyInputError("no layers to read: pass layer=<int> or a non-empty list")
    prompts, responses = list(prompts), list(responses)
    if not prompts or len(prompts) != len(responses):
        raise EmptyInputError(f"need one response per prompt; got {len(prompts)} prompts and {len(responses)} responses")
    fmt = model.chat()
    header = list(header_ids) if header_ids is not None else list(fmt.header_ids)
    rows, used = [], []
    for prompt, response in zip(prompts, responses):
        base = fmt.tokenize([prompt])[0][0]
        ids = model.tokenizer(response, add_special_tokens=False).input_ids
        for depth in depths:
            d = min(int(depth), len(ids))
            rows.append(base + ids[:d] + header)
            used.append(d)
    states = torch.empty(len(rows), len(layers), model.d_model)
    tap = _HeaderTap(layers)
    with model.hooks() as hooks, torch.inference_mode():
        tap.install(hooks, name="ada.states")
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
        for start in tqdm(range(0, len(order), batch_size), desc="ADA header states", unit="batch", disable=not progress):
            idx = order[start : start + batch_size]
            width = max(len(rows[i]) for i in idx)
            ids = torch.tensor([[pad] * (width - len(rows[i])) + rows[i] for i in idx], device=model.device)
            mask = torch.tensor([[0] * (width - len(rows[i])) + [1] * len(rows[i]) for i in idx], device=model.device)
            with tap.reading():
                model.hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=False)
            states[torch.tensor(idx)] = tap.take()
    return (states[:, 0] if isinstance(layer, int) else states), torch.tensor(used)


def ada_generate(
    model: Model,
    prompts: Sequence[str],
    guard: ADAGuard,
    *,
    responses: Sequence[str] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    record_layers: Sequence[int] | None = None,
    progress: bool = False,
) -> list[ADAOutput]:
    """Greedy generation with ADA checks at depth 0 and every ``guard.every`` tokens.

    ``responses`` prefills each assistant turn (a prefill attack of any length); depth counts the
    tokens generated after it. ``record_layers`` keeps the header states at those layers in every
    check (``check.states``): with ``threshold=float("inf")`` one run gives what any probe would read
    at every check, for fitting or calibrating one without generating again.
    """
    from tqdm.auto import tqdm

    prompts = list(prompts)
    if not prompts:
        raise EmptyInputError("the prompt list is empty; pass at least one prompt")
    if guard.probe is not None and guard.probe.width != model.d_model:
        raise ShapeError(f"the probe has width {guard.probe.width} but the model's residual stream is {model.d_model} wide")
    header = _header(model, guard)
    fmt = model.chat()
    tok = model.tokenizer
    eos = _eos_ids(model)
    eos_ids = torch.tensor(sorted(eos), device=model.device)  # built once, not per generated token
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    results: list[ADAOutput | None] = [None] * len(prompts)
    recorded = model.layer_indices(record_layers) if record_layers is not None else []
    read = list(guard.probe.layers) if guard.mode == "probe" else []
    tap = _HeaderTap(read + recorded, stop=guard.mode == "probe")
    probe_rows = [tap.layers.index(la) for la in read]
    record_rows = [tap.layers.index(la) for la in recorded]
    bar = tqdm(total=len(prompts), desc="ADA generate", unit="prompt", disable=not progress)
    with model.hooks() as hooks, torch.inference_mode():
        tap.install(hooks, name="ada.header")
        for idx, batch in fmt.batches(fmt.tokenize(prompts, responses=responses), batch_size):
            batch = batch.to(model.device)
            with generation(model, int(batch.input_ids.shape[1])):
                rows = _generate_batch(model, guard, batch, header, tap, probe_rows, record_rows, eos, eos_ids, pad, max_new_tokens)
            for r, i in enumerate(idx):
                results[i] = rows[r]
            bar.update(len(idx))
    bar.close()
    return results  # type: ignore[return-value]


def _generate_batch(model, guard, batch, header, tap, probe_rows, record_rows, eos, eos_ids, pad, max_new_tokens) -> list[ADAOutput]:
    """One batch of :func:`ada_generate`: the decoding loop with checks; one output per row, in order."""
    run = _Run(model, batch)
    out = model.hf(**compat.with_cache(model.hf, run.cache, **batch.model_inputs(), logits_to_keep=1))
    logits = out.logits[:, -1]
    generated: list[torch.Tensor] = []
    n = len(batch)
    checks: list[list[ADACheck]] = [[] for _ in range(n)]
    fired_at: list[int | None] = [None] * n
    for depth in range(max_new_tokens):
        if depth % guard.every == 0:
            live = ~(run.done | run.stopped)
            if guard.mode == "probe":
                states = _header_states(run, header, tap)
                scores = guard.probe.predict_proba(states[:, probe_rows]).mean(1)
            else:
                scores = _rethink_check(run, guard, header, eos, tap)
                states = tap.take() if tap.layers else None
            for r in torch.nonzero(live.cpu()).flatten().tolist():
                kept = states[r, record_rows].clone() if record_rows else None
                checks[r].append(ADACheck(depth=depth, score=float(scores[r]), states=kept))
                if float(scores[r]) >= guard.threshold:
                    run.stopped[r] = True
                    fired_at[r] = depth
        if bool((run.done | run.stopped).all()):
            break
        nxt = logits.argmax(-1)
        nxt = torch.where(run.done | run.stopped, torch.full_like(nxt, pad), nxt)
        generated.append(nxt)
        run.done |= torch.isin(nxt, eos_ids)
        if depth + 1 < max_new_tokens and not bool((run.done | run.stopped).all()):
            logits = run.advance(nxt[:, None])
    rows = torch.stack(generated, 1).tolist() if generated else [[] for _ in range(n)]
    outputs = []
    for r in range(n):
        ids = _until_end(rows[r][: fired_at[r]] if fired_at[r] is not None else rows[r], eos)
        partial = model.tokenizer.decode(ids, skip_special_tokens=True)
        stopped = bool(run.stopped[r])
        outputs.append(ADAOutput(
            text=guard.refusal_text if stopped else partial, stopped=stopped, fired_at=fired_at[r], partial=partial,
            checks=tuple(checks[r]), token_ids=tuple(ids),
        ))  # fmt: skip
    return outputs
