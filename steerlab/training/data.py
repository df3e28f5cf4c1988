"""Supervised fine-tuning data: chat examples, refusal-token and DeRTa builders, masked encoding, JSONL.

An :class:`SFTExample` is one user prompt and one assistant turn split in two: an unsupervised
``context`` (a prefilled start of the turn, e.g. DeRTa's harmful prefix) and the supervised
``target``. :func:`encode_examples` renders the prompt through the model's chat template exactly
as inference does (:class:`~steerlab.chat.ChatFormat`), appends the context, the target and the
template's end-of-turn tokens, and labels only the target and end-of-turn tokens (``-100``
elsewhere), so the loss never trains the prompt.

Builders:

* :func:`refusal_token_examples` (METHODS 5): harmful prompts get ``[refuse]`` + a refusal text,
  harmless ones ``[respond]`` + their answer; per-category refusal tokens are supported.
* :func:`derta_examples` (METHODS 11): harmful prompt + a random-length prefix of a harmful
  response (1 to len-2 words; a third of the examples without prefix) + a refusal as target.

Example:
    >>> ex = refusal_token_examples(["Say something cruel."], ["Name a fruit."],
    ...                             answers=["An apple."], refusals=["No, I will not."])
    >>> [e.target for e in ex]
    ['[refuse]No, I will not.', '[respond]An apple.']
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerlab.chat import ChatFormat
from steerlab.errors import EmptyInputError, SteerlabError

IGNORE_INDEX = -100
REFUSE_TOKEN = "[refuse]"
RESPOND_TOKEN = "[respond]"


class TrainingDataError(SteerlabError, ValueError):
    """Training examples are inconsistent, too long, or cannot be built from the inputs."""


@dataclass(frozen=True)
class SFTExample:
    """One chat example: the assistant turn is ``context`` (not trained) followed by ``target`` (trained).

    ``end_turn=False`` leaves the template's end-of-turn tokens out (for a target cut short, so
    the model is not taught to stop mid-answer). ``kind`` labels the example ("refuse",
    "respond", "derta", ...); ``meta`` carries anything else (a score, a category).
    """

    prompt: str
    target: str
    context: str = ""
    end_turn: bool = True
    kind: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def response(self) -> str:
        """The full assistant turn (context + target)."""
        return self.context + self.target

    def messages(self) -> list[dict[str, str]]:
        """Chat messages ``[user, assistant]`` as fine-tuning frameworks expect them."""
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.response}]


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one example and its labels (``-100`` where no loss is taken)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    prompt_length: int  # tokens of the rendered prompt (template + instruction + assistant header)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def supervised(self) -> tuple[int, ...]:
        """Positions whose token is trained."""
        return tuple(i for i, label in enumerate(self.labels) if label != IGNORE_INDEX)


# ----- encoding -----
def end_of_turn_text(fmt: ChatFormat) -> str:
    """The text the chat template puts after an assistant message (e.g. ``"<|im_end|>\\n"``).

    Falls back to the tokenizer's EOS token when the template adds nothing; raw formats
    (``chat=False``) use the EOS token too.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> end_of_turn_text(tiny_model("llama").chat())
        '<|im_end|>\\n'
    """
    tok = fmt.tokenizer
    if fmt.chat:
        marker = "Omega psi chi."
        msgs = [{"role": "system", "content": fmt.system}] if fmt.system is not None else []
        msgs += [{"role": "user", "content": "Alpha beta."}, {"role": "assistant", "content": marker}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
        at = text.rfind(marker) if isinstance(text, str) else -1
        if at >= 0 and text[at + len(marker) :]:
            return text[at + len(marker) :]
    if tok.eos_token is None:
        raise TrainingDataError("the tokenizer has no EOS token and the template adds no end-of-turn text; set tokenizer.eos_token")
    return str(tok.eos_token)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode_examples(fmt: ChatFormat, examples: Sequence[SFTExample], *, max_length: int | None = None) -> list[EncodedExample]:
    """Tokenize examples with the prompt rendered as at inference and the loss masked to the target.

    Each row is ``prompt ids`` (from ``fmt.tokenize``, so identical to what generation sees) +
    ``context`` + ``target`` + end-of-turn; only ``target`` and end-of-turn are supervised. The
    pieces are tokenized separately, so the first target token is exactly the token the model
    must emit after the context. ``max_length`` cuts the target's tail; an example whose prompt
    and context alone leave no room for a target token raises :class:`TrainingDataError`.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> enc = encode_examples(model.chat(), [SFTExample("Hi", "[respond]Hello!")])
        >>> model.tokenizer.decode([enc[0].input_ids[i] for i in enc[0].supervised])
        '[respond]Hello!<|im_end|>\\n'
    """
    examples = list(examples)
    if not examples:
        raise EmptyInputError("no training examples; pass at least one SFTExample")
    tok = fmt.tokenizer
    prompt_rows = fmt.tokenize([e.prompt for e in examples])
    end_ids = _ids(tok, end_of_turn_text(fmt))
    out = []
    for i, (ex, row) in enumerate(zip(examples, prompt_rows)):
        if not ex.target:
            raise TrainingDataError(f"example {i} has an empty target: nothing to train on")
        prompt_ids = list(row[0])
        context_ids = _ids(tok, ex.context)
        target_ids = _ids(tok, ex.target) + (end_ids if ex.end_turn else [])
        fixed = len(prompt_ids) + len(context_ids)
        if max_length is not None:
            if fixed >= max_length:
                raise TrainingDataError(
                    f"example {i} has {fixed} prompt and context tokens, leaving no room for its target under "
                    f"max_length={max_length}; raise max_length or shorten the prompt ({ex.prompt[:60]!r})"
                )
            target_ids = target_ids[: max_length - fixed]
        ids = prompt_ids + context_ids + target_ids
        labels = [IGNORE_INDEX] * fixed + target_ids
        out.append(EncodedExample(input_ids=tuple(ids), labels=tuple(labels), prompt_length=len(prompt_ids)))
    return out


# ----- builders -----
def _pick(texts: Sequence[str], n: int, rng: random.Random, what: str) -> list[str]:
    texts = list(texts)
    if not texts:
        raise EmptyInputError(f"no {what} given; pass at least one")
    return [rng.choice(texts) for _ in range(n)]


def control_tokens(refuse: str | Mapping[str, str] = REFUSE_TOKEN, respond: str = RESPOND_TOKEN) -> list[str]:
    """The control tokens to add to a tokenizer: every refusal token, then the respond token.

    Example:
        >>> control_tokens({"crime": "[refuse:crime]", "weapons": "[refuse:weapons]"})
        ['[refuse:crime]', '[refuse:weapons]', '[respond]']
    """
    tokens = [refuse] if isinstance(refuse, str) else list(dict.fromkeys(refuse.values()))
    if respond in tokens:
        raise TrainingDataError(f"the respond token {respond!r} is also a refusal token; use distinct tokens")
    return [*tokens, respond]


def refusal_token_examples(
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    answers: Sequence[str],
    refusals: Sequence[str],
    refuse_token: str | Mapping[str, str] = REFUSE_TOKEN,
    respond_token: str = RESPOND_TOKEN,
    categories: Sequence[str] | None = None,
    answers_complete: Sequence[bool] | bool = True,
    seed: int = 0,
) -> list[SFTExample]:
    """Refusal-token SFT data (METHODS 5): harmful prompts first, then harmless ones, in input order.

    A harmful prompt's target is its refusal token + a refusal drawn (seeded) from ``refusals``; a
    harmless prompt's target is ``respond_token`` + its answer (``answers[i]`` for ``harmless[i]``).
    ``refuse_token`` may map category -> token; then ``categories[i]`` names the category of
    ``harmful[i]``. ``answers_complete[i] = False`` marks an answer that was cut short (its
    end-of-turn is not trained).

    Example:
        >>> ex = refusal_token_examples(["a"], ["b"], answers=["B."], refusals=["No."])
        >>> [(e.kind, e.target) for e in ex]
        [('refuse', '[refuse]No.'), ('respond', '[respond]B.')]
    """
    harmful, harmless, answers = list(harmful), list(harmless), list(answers)
    if len(answers) != len(harmless):
        raise TrainingDataError(f"got {len(answers)} answers for {len(harmless)} harmless prompts; pass one per prompt")
    if not harmful and not harmless:
        raise EmptyInputError("no prompts given; pass harmful and/or harmless prompts")
    complete = [answers_complete] * len(harmless) if isinstance(answers_complete, bool) else list(answers_complete)
    if len(complete) != len(harmless):
        raise TrainingDataError(f"answers_complete has {len(complete)} entries for {len(harmless)} answers")
    control_tokens(refuse_token, respond_token)  # validates distinctness
    if isinstance(refuse_token, str):
        if categories is not None:
            raise TrainingDataError("categories need one refusal token per category: pass refuse_token={category: token}")
        tokens = [refuse_token] * len(harmful)
        cats = [None] * len(harmful)
    else:
        if categories is None or len(categories) != len(harmful):
            raise TrainingDataError(
                f"per-category refusal tokens need one category per harmful prompt; got "
                f"{None if categories is None else len(categories)} for {len(harmful)} prompts"
            )
        unknown = sorted(set(categories) - set(refuse_token))
        if unknown:
            raise TrainingDataError(f"categories {unknown} have no refusal token; known: {sorted(refuse_token)}")
        tokens = [refuse_token[c] for c in categories]
        cats = list(categories)
    rng = random.Random(seed)
    texts = _pick(refusals, len(harmful), rng, "refusal texts") if harmful else []
    out = [
        SFTExample(prompt=p, target=t + r, kind="refuse", meta={"category": c} if c is not None else {})
        for p, t, r, c in zip(harmful, tokens, texts, cats)
    ]
    out += [
        SFTExample(prompt=p, target=respond_token + a, end_turn=ok, kind="respond")
        for p, a, ok in zip(harmless, answers, complete)
    ]
    return out


_WORD = re.compile(r"\S+")


def derta_examples(
    harmful: Sequence[str],
    harmful_responses: Sequence[str],
    refusals: Sequence[str],
    *,
    no_prefix_fraction: float = 1 / 3,
    separator: str = " ",
    seed: int = 0,
) -> list[SFTExample]:
    """DeRTa data (METHODS 11): harmful prompt + a prefix of a harmful response as context + a refusal target.

    For each example, ``k`` words are kept from ``harmful_responses[i]`` with ``k`` uniform in
    ``[1, n_words - 2]`` (the prefix ends at its ``k``-th word, original whitespace kept), and the
    target is ``separator`` + a refusal drawn from ``refusals``. ``round(no_prefix_fraction * n)``
    examples, chosen at random, get no prefix (the target is then the bare refusal). Each
    example's ``meta`` records ``prefix_words`` (0 without prefix) and ``response_words``.

    Example:
        >>> ex = derta_examples(["Do X."], ["Gather the parts."], ["I can't help with that."],
        ...                     no_prefix_fraction=0.0)
        >>> ex[0].context, ex[0].target
        ('Gather', " I can't help with that.")
    """
    harmful, responses = list(harmful), list(harmful_responses)
    if not harmful:
        raise EmptyInputError("no harmful prompts given; pass at least one")
    if len(responses) != len(harmful):
        raise TrainingDataError(f"got {len(responses)} harmful responses for {len(harmful)} prompts; pass one per prompt")
    if not 0.0 <= no_prefix_fraction <= 1.0:
        raise TrainingDataError(f"no_prefix_fraction must be in [0, 1]; got {no_prefix_fraction}")
    rng = random.Random(seed)
    n_bare = round(no_prefix_fraction * len(harmful))
    bare = set(rng.sample(range(len(harmful)), n_bare))
    texts = _pick(refusals, len(harmful), rng, "refusal texts")
    out = []
    for i, (prompt, response, refusal) in enumerate(zip(harmful, responses, texts)):
        words = list(_WORD.finditer(response))
        if i in bare:
            out.append(SFTExample(prompt=prompt, target=refusal, kind="derta", meta={"prefix_words": 0, "response_words": len(words)}))
            continue
        if len(words) < 3:
            raise TrainingDataError(
                f"harmful response {i} has {len(words)} words; a DeRTa prefix takes 1 to len-2 words, so each "
                "response needs at least 3 (lengthen it or drop the example)"
            )
        k = rng.randint(1, len(words) - 2)
        context = response[: words[k - 1].end()]
        out.append(SFTExample(prompt=prompt, context=context, target=separator + refusal, kind="derta", meta={"prefix_words": k, "response_words": len(words)}))
    return out


# ----- JSONL in the messages format -----
def example_record(prompt: str, response: str, **extra: Any) -> dict[str, Any]:
    """One JSONL record: ``{"messages": [user, assistant], **extra}``.

    Example:
        >>> example_record("Hi", "Hello!", score=0.25)["messages"][1]
        {'role': 'assistant', 'content': 'Hello!'}
    """
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], **extra}


def write_jsonl(path: str | Path, records: Sequence[dict[str, Any] | SFTExample]) -> Path:
    """Write records (dicts, or SFTExamples turned into messages + kind + meta) one JSON object per line.

    Example:
        >>> import tempfile
        >>> examples = [SFTExample("Hi", "Hello!", kind="respond")]
        >>> path = write_jsonl(Path(tempfile.mkdtemp()) / "sft.jsonl", examples)
        >>> read_jsonl(path) == examples
        True
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for rec in records:
            if isinstance(rec, SFTExample):
                rec = example_record(rec.prompt, rec.response, kind=rec.kind, **rec.meta)
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[SFTExample]:
    """Read a messages-format JSONL file back as examples (the whole assistant turn is the target).

    Extra keys of each record land in ``meta`` (``kind`` in ``kind``).

    Example:
        >>> import tempfile
        >>> path = write_jsonl(Path(tempfile.mkdtemp()) / "selected.jsonl", [example_record("Hi", "Hello!", score=0.5)])
        >>> examples = read_jsonl(path)
        >>> examples[0].target, examples[0].meta
        ('Hello!', {'score': 0.5})
    """
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        msgs = rec.pop("messages", None)
        roles = [m.get("role") for m in msgs] if isinstance(msgs, list) else None
        if roles is None or "user" not in roles or roles[-1] != "assistant":
            raise TrainingDataError(f"{path}:{n}: expected 'messages' with a user turn and a final assistant turn; got roles {roles}")
        user = [m for m in msgs if m["role"] == "user"][-1]["content"]
        out.append(SFTExample(prompt=user, target=msgs[-1]["content"], kind=str(rec.pop("kind", "")), meta=rec))
    return out
