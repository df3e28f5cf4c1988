"""Probability of a short answer: the next-token mass on an answer's first tokens after a question.

A :class:`QA` is a question and its accepted answers (``("Python",)``). :func:`answer_probability`
sums the next-token probabilities, at the last prompt position, of the first token of every accepted
answer in its variants (with and without a leading space; as written, lower case, Title case), so a
chat reply ``"Python"`` and a completion ``" python"`` both count. It runs inside whatever
``model.apply(...)`` scope is active, so it measures interventions.

Example:
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> qa = [QA("Which language did Guido van Rossum create? Answer with one word.", ("Python",))]
    >>> p = answer_probability(model, qa)
    >>> p.shape, bool(0 < p[0] < 1)
    (torch.Size([1]), True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from steerlab.errors import EmptyInputError
from steerlab.eval.logits import last_token_logprobs

if TYPE_CHECKING:
    from steerlab.model import Model


@dataclass(frozen=True)
class QA:
    """A question and its accepted answers."""

    question: str
    answers: tuple[str, ...]

    def __post_init__(self) -> None:
        answers = (self.answers,) if isinstance(self.answers, str) else tuple(self.answers)
        if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise EmptyInputError(f"QA({self.question!r}) needs at least one non-empty answer; got {self.answers!r}")
        object.__setattr__(self, "answers", answers)


def word_variants(word: str, *, upper: bool = True) -> list[str]:
    """Spellings a tokenizer may use for ``word``: as written, lower, Title (and UPPER) case, each with
    and without a leading space.

    Example:
        >>> word_variants("red", upper=False)
        ['red', ' red', 'Red', ' Red']
    """
    bare = word.strip()
    forms = dict.fromkeys([bare, bare.lower(), bare[:1].upper() + bare[1:], *([bare.upper()] if upper else [])])
    return [p + f for f in forms for p in ("", " ")]


def answer_token_ids(tokenizer, answers: Sequence[str]) -> tuple[int, ...]:
    """First token ids of the answers' variants (leading space or not; as written, lower, Title case).

    Example:
        >>> from steerlab.testing import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> [tok.decode(i) for i in answer_token_ids(tok, ["poem"])]  # "POEM" starts with "P", " POEM" with " "
        ['P', ' ', 'poem', ' poem']
    """
    blank = [a for a in answers if not a.strip()]
    if blank:
        raise EmptyInputError(f"answers must be non-empty words; got {blank!r} (a bare space would count the space token)")
    ids: set[int] = set()
    for answer in answers:
        for text in word_variants(answer, upper=False):
            enc = tokenizer.encode(text, add_special_tokens=False)
            if enc:
                ids.add(int(enc[0]))
    if not ids:
        raise EmptyInputError(f"the answers {list(answers)!r} tokenise to nothing")
    return tuple(sorted(ids))


def answer_probability(model: Model, items: Sequence[QA], *, chat: bool = True, batch_size: int = 16) -> torch.Tensor:
    """Per question, the next-token probability mass on its answers' first tokens ``[n]`` (float32, CPU).

    Example:
        >>> from steerlab.testing import tiny_model, tiny_direction
        >>> model = tiny_model("llama")
        >>> questions, edit = [QA("Write a short poem.", ("poem",))], steerlab.Ablate(tiny_direction(model))
        >>> before = answer_probability(model, questions)
        >>> with model.apply(edit):
        ...     after = answer_probability(model, questions)
        >>> bool(after[0] != before[0])
        True
    """
    items = list(items)
    if not items:
        raise EmptyInputError("no questions given; pass a non-empty list of QA items")
    logprobs = last_token_logprobs(model, [qa.question for qa in items], batch_size=batch_size, chat=chat)
    out = torch.empty(len(items))
    for i, qa in enumerate(items):
        out[i] = logprobs[i, list(answer_token_ids(model.tokenizer, qa.answers))].exp().sum()
    return out
