"""Chat-template anatomy: where, in a rendered prompt, the instruction ends and the template resumes.

For any tokenizer with a chat template, :class:`ChatFormat` finds (per row, correct under left
padding):

* ``t_inst`` — the last token of the user's instruction;
* the *post-instruction* span — the template tokens after the instruction (end-of-turn plus
  assistant header), where refusal directions are read;
* ``last`` — the last input token (end of the assistant header, or of a prefilled response);
* ``inst_mean`` / ``inst_to_last_mean`` — pooled positions: the mean over the instruction's tokens, and over those
  plus the template after them up to ``last``. A pooled position is one vector per prompt; read it with
  :meth:`EncodedBatch.take` (``index`` has no single token for it);
* ``reasoning_end`` — the last occurrence of an end-of-reasoning marker such as ``</think>``;
* the assistant-header token ids (the post-instruction span), which ADA re-inserts.

The template is analysed once by rendering two probe instructions: the text after the
instruction (the *suffix*) must not depend on the instruction, or the template is rejected.

Example:
    >>> from steerlab.chat import ChatFormat
    >>> from steerlab.testing import tiny_tokenizer
    >>> fmt = ChatFormat(tiny_tokenizer())
    >>> batch = fmt.encode(["Write a poem.", "Hi"])
    >>> batch.index("t_inst").shape             # one token index per prompt
    torch.Size([2, 1])
    >>> x = torch.randn(2, batch.input_ids.shape[1], 8)
    >>> batch.take(x, "inst_mean").shape        # pooled: the mean over each row's instruction tokens
    torch.Size([2, 1, 8])
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from steerlab.errors import ChatTemplateError, EmptyInputError, InvalidValueError, UnknownPositionError

POOLED_POSITIONS = ("inst_mean", "inst_to_last_mean")  # one vector per prompt: a mean over a span of tokens
NAMED_POSITIONS = ("t_inst", "post_inst", "last", "reasoning_end", *POOLED_POSITIONS, "all")
Position = str | int
TokenizedRow = tuple[list[int], int, int, int, int, int]  # ids, t_inst, post_inst_start, prompt_end, reasoning_end, inst_start

_PROBES = ("Alpha beta gamma.", "Zeta eta theta iota kappa")


def check_template(template, *, where: str) -> None:
    """Raise :class:`ChatTemplateError` if a chat template (or one of a dict of named templates) does not
    compile in the Jinja environment transformers renders it with; ``where`` names it in the message."""
    import jinja2

    from steerlab import compat

    named = template.items() if isinstance(template, dict) else [(None, template)]
    for name, text in named:
        label = where if name is None else f"{where} (template {name!r})"
        if not isinstance(text, str):
            raise ChatTemplateError(f"{label} is a {type(text).__name__}, not a Jinja template string")
        try:
            compat.compile_chat_template(text)
        except jinja2.TemplateSyntaxError as exc:
            lines = text.splitlines()
            line = lines[exc.lineno - 1].strip() if 0 < (exc.lineno or 0) <= len(lines) else ""
            near = f" in {line[:120]!r}" if line else ""
            raise ChatTemplateError(
                f"{label} has a Jinja syntax error at line {exc.lineno}{near}: {exc.message}. Fix the template, "
                "or pass a working one with steerlab.load(..., chat_template=...)"
            ) from None


def as_index(value) -> int | None:
    """``value`` as an int if it is one integer (Python, numpy or 0-d torch; not a bool), else ``None``."""
    if isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):
        return None
    if isinstance(value, torch.Tensor) and value.dim() != 0:
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_batch_size(batch_size) -> int:
    """``batch_size`` as an int >= 1, or :class:`~steerlab.errors.InvalidValueError`."""
    value = as_index(batch_size)
    if value is None or value < 1:
        raise InvalidValueError(f"batch_size must be an int >= 1 (prompts per forward pass), got {batch_size!r}")
    return value


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt rendered as text, with character offsets of the instruction end and the prompt end."""

    text: str
    inst_end: int  # first character after the instruction
    prompt_end: int  # first character of the (prefilled) response
    inst_start: int = -1  # first character of the instruction; -1 where the template changed its text


@dataclass
class EncodedBatch:
    """Token ids of a padded batch plus per-row anatomy as absolute indices into the padded rows."""

    input_ids: torch.Tensor  # [b, S]
    attention_mask: torch.Tensor  # [b, S]
    t_inst: torch.Tensor  # [b]
    post_inst_start: torch.Tensor  # [b]
    prompt_end: torch.Tensor  # [b] index of the first response token (== length if no prefill)
    last: torch.Tensor  # [b]
    reasoning_end: torch.Tensor  # [b], -1 where the marker is absent
    lengths: torch.Tensor  # [b] real (unpadded) lengths
    padding_side: str = "left"
    inst_start: torch.Tensor | None = None  # [b] first token of the instruction, -1 where unknown

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions that ignore padding: 0 at each row's first real token."""
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for an HF forward call (ids, mask, padding-aware position ids)."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}

    def to(self, device: torch.device | str) -> EncodedBatch:
        """Move the id and mask tensors (anatomy indices stay on CPU)."""
        self.input_ids = self.input_ids.to(device)
        self.attention_mask = self.attention_mask.to(device)
        return self

    def index(self, position: Position) -> torch.Tensor:
        """Token indices [b, k] for a fixed-width position (not ``"all"``).

        Integers count from the end of the input: -1 is the last token, -2 the one before.
        """
        if isinstance(position, bool) or not isinstance(position, (int, str)):
            raise UnknownPositionError(f"position must be a name or a negative int, got {position!r}")
        if isinstance(position, int):
            if position >= 0:
                raise UnknownPositionError(
                    f"integer positions count from the end of the input and must be negative (-1 = last token); "
                    f"got {position}"
                )
            idx = self.last + 1 + position
            start = self.last + 1 - self.lengths
            if bool((idx < start).any()):
                raise UnknownPositionError(f"position {position} reaches before the start of the shortest prompt")
            return idx[:, None]
        if position == "t_inst":
            return self.t_inst[:, None]
        if position == "last":
            return self.last[:, None]
        if position == "reasoning_end":
            if bool((self.reasoning_end < 0).any()):
                raise UnknownPositionError(
                    "position 'reasoning_end' is missing in some rows: pass reasoning_end='<marker>' to the "
                    "ChatFormat and make sure every prompt contains it"
                )
            return self.reasoning_end[:, None]
        if position == "post_inst":
            width = self.prompt_end - self.post_inst_start
            if bool((width != width[0]).any()) or int(width[0]) == 0:
                raise UnknownPositionError(
                    f"post-instruction spans differ in width across rows ({width.tolist()}) or are empty "
                    "(raw prompts without a chat template have no post-instruction span)"
                )
            return self.post_inst_start[:, None] + torch.arange(int(width[0]))[None, :]
        if position == "all":
            raise UnknownPositionError("'all' is ragged; use EncodedBatch.attention_mask to select tokens")
        if position in POOLED_POSITIONS:
            raise UnknownPositionError(f"{position!r} is a mean over a span of tokens, not a token; read it with EncodedBatch.take")
        raise UnknownPositionError(
            f"unknown position {position!r}; use one of {', '.join(NAMED_POSITIONS)} or a negative int"
        )


    def span(self, position: str) -> torch.Tensor:
        """[b, S] bool: the tokens a pooled position averages (``inst_mean``: the instruction; ``inst_to_last_mean``:
        the instruction through ``last``). Raises where a row's instruction could not be located."""
        if position not in POOLED_POSITIONS:
            raise UnknownPositionError(f"{position!r} is not a pooled position; use one of {', '.join(POOLED_POSITIONS)}")
        start = self.inst_start
        if start is None or bool((start < 0).any()) or bool((start > self.t_inst).any()):
            rows = list(range(len(self))) if start is None else torch.nonzero((start < 0) | (start > self.t_inst)).flatten().tolist()
            raise UnknownPositionError(
                f"the instruction's first token is unknown in rows {rows[:8]} (the chat template changed the instruction's "
                "text, or it is empty), so a pooled position cannot be read; read 't_inst' or 'last' instead"
            )
        end = self.t_inst if position == "inst_mean" else self.last
        cols = torch.arange(self.input_ids.shape[1])[None, :]
        return (cols >= start[:, None]) & (cols <= end[:, None])

    def take(self, x: torch.Tensor, position: Position, *, shift: int = 0) -> torch.Tensor:
        """``x [b, s, ...]`` (token ``i`` of the batch at ``x[:, i - shift]``) at ``position``: ``[b, k, ...]`` for a
        token position, ``[b, 1, ...]`` (a mean in float32, or float64 for float64 ``x``) for a pooled one."""
        rows = torch.arange(x.shape[0], device=x.device)
        if position in POOLED_POSITIONS:
            span = self.span(position)
            if bool(span[:, :shift].any()):
                raise UnknownPositionError(f"{position!r} reaches into the {shift} tokens this tensor leaves out")
            span = span[:, shift:]
            x = x if x.dtype in (torch.float32, torch.float64) else x.float()
            weight = (span.to(x.dtype) / span.sum(1, keepdim=True)).to(x.device)
            return torch.einsum("bs,bs...->b...", weight, x).unsqueeze(1)
        return x[rows[:, None], (self.index(position) - shift).to(x.device)]

    def tokens(self, position: Position) -> list[list[int]]:
        """Per row, the token indices ``position`` reads (every token of the span for a pooled position)."""
        if position in POOLED_POSITIONS:
            return [torch.nonzero(row).flatten().tolist() for row in self.span(position)]
        return self.index(position).tolist()


class ChatFormat:
    """Renders instructions through a tokenizer's chat template and locates the template's parts.

    ``system`` overrides the template's default system prompt (``None`` keeps the default).
    ``chat=False`` treats prompts as raw text (base models): ``t_inst`` and ``last`` are the last
    token and there is no post-instruction span.
    """

    def __init__(self, tokenizer, *, system: str | None = None, chat: bool = True, reasoning_end: str | None = None):
        self.tokenizer = tokenizer
        self.system = system
        self.chat = chat
        self.reasoning_end_marker = reasoning_end
        if chat and not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(
                f"tokenizer {type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '?')}) has no chat "
                "template. Set tokenizer.chat_template to a Jinja template, pass chat_template=... to "
                "steerlab.load, or use raw prompts with chat=False."
            )
        if chat:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            check_template(tokenizer.chat_template, where=f"the chat template of {name}")

    # ----- template analysis -----
    def _messages(self, instruction: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system is not None else []
        return [*msgs, {"role": "user", "content": instruction}]

    def _apply(self, instruction: str) -> str:
        import jinja2

        messages = self._messages(instruction)
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except jinja2.TemplateError as exc:
            roles = "+".join(m["role"] for m in messages)
            raise ChatTemplateError(
                f"the chat template failed to render a {roles} conversation: {exc}. Fix the template or pass another "
                "with steerlab.load(..., chat_template=...); a template that rejects system messages needs system=None"
            ) from exc
        if not isinstance(text, str):
            raise ChatTemplateError("apply_chat_template(tokenize=False) did not return a string")
        return text

    @cached_property
    def suffix(self) -> str:
        """Template text between the end of the instruction and the start of the response."""
        if not self.chat:
            return ""
        suffixes = []
        for probe in _PROBES:
            text = self._apply(probe)
            at = text.rfind(probe)
            if at < 0:
                raise ChatTemplateError(
                    "the chat template does not reproduce the user's text verbatim, so steerlab cannot locate "
                    "the instruction; use a template that inserts message content unchanged"
                )
            suffixes.append(text[at + len(probe) :])
        if suffixes[0] != suffixes[1]:
            raise ChatTemplateError(
                f"the text after the instruction depends on the instruction ({suffixes!r}); "
                "steerlab needs a template whose assistant header is fixed"
            )
        return suffixes[0]

    @cached_property
    def header_ids(self) -> tuple[int, ...]:
        """Token ids of the post-instruction span (end of turn + assistant header), as tokenized in context."""
        batch = self.encode([_PROBES[0]])
        start, end = int(batch.post_inst_start[0]), int(batch.prompt_end[0])
        return tuple(int(t) for t in batch.input_ids[0, start:end])

    # ----- rendering and encoding -----
    def render(self, instruction: str, *, response: str = "") -> RenderedPrompt:
        """Render one instruction (plus an optional prefilled response) and locate its parts."""
        if not self.chat:
            text = instruction + response
            return RenderedPrompt(text=text, inst_end=len(instruction), prompt_end=len(instruction), inst_start=0)
        text = self._apply(instruction)
        suffix = self.suffix
        if not text.endswith(suffix):
            raise ChatTemplateError(f"rendered prompt does not end with the template suffix {suffix!r}")
        inst_end = len(text) - len(suffix)
        inst_start = inst_end - len(instruction) if instruction and text[:inst_end].endswith(instruction) else -1
        return RenderedPrompt(text=text + response, inst_end=inst_end, prompt_end=len(text), inst_start=inst_start)

    def encode(
        self,
        instructions: Sequence[str],
        *,
        responses: Sequence[str] | None = None,
        padding_side: str = "left",
    ) -> EncodedBatch:
        """Tokenize and pad a batch; per-row anatomy is computed before padding so it never shifts."""
        return self.pad(self.tokenize(instructions, responses=responses), padding_side=padding_side)

    def tokenize(self, instructions: Sequence[str], *, responses: Sequence[str] | None = None) -> list[TokenizedRow]:
        """Render and tokenize each prompt without padding; rows keep their own anatomy."""
        if isinstance(instructions, str):
            raise EmptyInputError("pass a list of prompts, not a single string (wrap it: [prompt])")
        if len(instructions) == 0:
            raise EmptyInputError("the prompt list is empty; pass at least one prompt")
        if responses is not None and len(responses) != len(instructions):
            raise EmptyInputError(f"got {len(responses)} responses for {len(instructions)} prompts; pass one per prompt")
        return [self._locate(self.render(p, response=responses[i] if responses is not None else "")) for i, p in enumerate(instructions)]

    def batches(self, rows: Sequence[TokenizedRow], batch_size: int) -> Iterator[tuple[list[int], EncodedBatch]]:
        """Left-padded batches of ``rows``, longest first (less padding); yields (row indices, batch)."""
        batch_size = check_batch_size(batch_size)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield idx, self.pad([rows[i] for i in idx])

    def pad(self, rows: Sequence[TokenizedRow], *, padding_side: str = "left") -> EncodedBatch:
        """Pad tokenized rows into one batch (anatomy indices shift with the padding)."""
        return _pad(list(rows), pad_id=self._pad_id(), padding_side=padding_side)

    def _pad_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
            if candidate is not None:
                return int(candidate[0] if isinstance(candidate, list) else candidate)
        return 0

    def _locate(self, r: RenderedPrompt) -> TokenizedRow:
        """(ids, t_inst, post_inst_start, prompt_end, reasoning_end, inst_start) for one rendered prompt."""
        tok = self.tokenizer
        add_special = not self.chat
        try:
            enc = tok(r.text, add_special_tokens=add_special, return_offsets_mapping=True)
            ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
            starts = _token_starts(offsets)
            t_inst = max(i for i, s in enumerate(starts) if s < r.inst_end)
            post = next((i for i, s in enumerate(starts) if s >= r.inst_end), len(ids))
            prompt_end = next((i for i, s in enumerate(starts) if s >= r.prompt_end), len(ids))
            char_to_token = lambda c: max(i for i, s in enumerate(starts) if s <= c)
        except (NotImplementedError, ValueError, TypeError):  # slow tokenizer: count prefix tokens
            count = lambda text: len(tok(text, add_special_tokens=add_special)["input_ids"])
            ids = list(tok(r.text, add_special_tokens=add_special)["input_ids"])
            post = count(r.text[: r.inst_end])
            t_inst, prompt_end = post - 1, count(r.text[: r.prompt_end])
            char_to_token = lambda c: count(r.text[: c + 1]) - 1
        reasoning = -1
        if self.reasoning_end_marker:
            at = r.text.rfind(self.reasoning_end_marker)
            if at >= 0:
                reasoning = char_to_token(at + len(self.reasoning_end_marker) - 1)
        inst_start = char_to_token(r.inst_start) if 0 <= r.inst_start < r.inst_end else -1
        return ids, t_inst, post, prompt_end, reasoning, inst_start


def _token_starts(offsets: list[tuple[int, int]]) -> list[int]:
    """Start character of each token; zero-width tokens inherit the previous token's end."""
    starts, prev_end = [], 0
    for start, end in offsets:
        if end <= start and start == 0 and prev_end > 0:
            start = prev_end
        starts.append(start)
        prev_end = max(prev_end, end)
    return starts


def _pad(rows: list[TokenizedRow], *, pad_id: int, padding_side: str) -> EncodedBatch:
    if padding_side not in ("left", "right"):
        raise InvalidValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    shift = []
    for i, (row, *_rest) in enumerate(rows):
        off = width - len(row) if padding_side == "left" else 0
        ids[i, off : off + len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, off : off + len(row)] = 1
        shift.append(off)
    s = torch.tensor(shift)
    col = lambda k: torch.tensor([r[k] for r in rows]) + s
    lengths = torch.tensor([len(r[0]) for r in rows])
    reasoning = torch.tensor([r[4] for r in rows])
    inst_start = torch.tensor([r[5] for r in rows])
    return EncodedBatch(
        input_ids=ids,
        attention_mask=mask,
        t_inst=col(1),
        post_inst_start=col(2),
        prompt_end=col(3),
        last=s + lengths - 1,
        reasoning_end=torch.where(reasoning >= 0, reasoning + s, reasoning),
        lengths=lengths,
        padding_side=padding_side,
        inst_start=torch.where(inst_start >= 0, inst_start + s, inst_start),
    )
