"""Parity check: the hooked original and the baked model, on the same prompts, give the same logits.

Example:
    >>> from steerlab.testing import tiny_model, tiny_direction
    >>> from steerlab.training import bake
    >>> model = tiny_model("llama")
    >>> iv = steerlab.Ablate(tiny_direction(model))
    >>> report = parity(model, bake(model, iv), iv, ["Write a poem.", "Hi"])
    >>> report.max_abs_logit_diff <= 1e-4, report.generation_match
    (True, 1.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from steerlab.errors import EmptyInputError, ShapeError
from steerlab.model import Model
from steerlab.reader import Rows, Tap, read
from steerlab.training.manifest import attach_parity


@dataclass(frozen=True)
class ParityReport:
    """How closely a baked model matches the hooked original.

    ``max_abs_logit_diff`` / ``mean_abs_logit_diff``: over every non-pad prompt token and vocabulary entry;
    ``logit_scale``: the largest |logit| of the hooked model (to read the difference against);
    ``generation_match``: fraction of prompts whose greedy continuations of ``max_new_tokens`` tokens are
    identical (``None`` when not generated).
    """

    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    logit_scale: float
    n_prompts: int
    n_tokens: int
    dtype: str
    generation_match: float | None = None
    max_new_tokens: int = 0

    def ok(self, tol: float = 1e-4) -> bool:
        """Whether the largest logit difference is at most ``tol`` (and every greedy continuation agrees)."""
        return self.max_abs_logit_diff <= tol and self.generation_match in (None, 1.0)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for the manifest)."""
        return asdict(self)


class _TokenLogits:
    """Every non-pad token's id and logits (float32, CPU), per prompt; ``result()`` concatenates in prompt order."""

    def __init__(self) -> None:
        self.rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, x: torch.Tensor, rows: Rows, layer: int) -> None:
        mask = rows.mask(x.device)
        for i, prompt in enumerate(rows.idx):
            self.rows[prompt] = (rows.batch.input_ids[i][mask[i]].cpu(), x[i][mask[i]].float().cpu())

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        order = [self.rows[i] for i in range(len(self.rows))]
        return torch.cat([ids for ids, _ in order]), torch.cat([logits for _, logits in order])


def _logits(model: Model, prompts: Sequence[str], *, chat: bool, system: str | None, batch_size: int):
    tap = Tap("logits", None, _TokenLogits())
    return read(model, list(prompts), taps=[tap], batch_size=batch_size, chat=chat, system=system, all_logits=True)[0]


def parity(
    model: Model,
    baked: Model,
    intervention: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 8,
    chat: bool = True,
    system: str | None = None,
    batch_size: int = 16,
    record: bool = True,
) -> ParityReport:
    """Run ``model`` under ``model.apply(intervention)`` and ``baked`` plainly on ``prompts`` (steerlab's chat
    encoding); report the logit difference and, with ``max_new_tokens > 0``, greedy-generation agreement.
    ``record=True`` adds the figures to ``baked``'s edit history (and so to an export's manifest).

    Example:
        >>> from steerlab.testing import tiny_model, tiny_direction
        >>> from steerlab.training import bake
        >>> model = tiny_model("qwen2")
        >>> iv = steerlab.AddVector(tiny_direction(model), coeff=2.0)
        >>> rep = parity(model, bake(model, iv), iv, ["How do I pick a lock?"], max_new_tokens=0)
        >>> rep.ok(1e-4)
        True
    """
    if isinstance(prompts, str) or len(prompts) == 0:
        raise EmptyInputError("parity() needs a non-empty list of prompts")
    kw = {"chat": chat, "system": system, "batch_size": batch_size}
    with model.apply(intervention):
        ids, hooked = _logits(model, prompts, **kw)
    baked_ids, plain = _logits(baked, prompts, **kw)
    if not torch.equal(ids, baked_ids) or hooked.shape != plain.shape:
        raise ShapeError(
            "the two models tokenised the prompts differently (or have different vocabularies); compare a model with "
            "its own bake, which shares the tokenizer"
        )
    diff = (hooked - plain).abs()
    match = None
    if max_new_tokens > 0:
        gen = {"max_new_tokens": max_new_tokens, "chat": chat, "system": system, "batch_size": batch_size}
        with model.apply(intervention):
            expected = model.generate(list(prompts), **gen)
        got = baked.generate(list(prompts), **gen)
        match = sum(a == b for a, b in zip(expected, got)) / len(expected)
    report = ParityReport(
        max_abs_logit_diff=float(diff.max()),
        mean_abs_logit_diff=float(diff.mean()),
        logit_scale=float(hooked.abs().max()),
        n_prompts=len(prompts),
        n_tokens=int(hooked.shape[0]),
        dtype=str(baked.dtype).removeprefix("torch."),
        generation_match=match,
        max_new_tokens=max(0, max_new_tokens),
    )
    if record:
        attach_parity(baked.hf, intervention, report.to_dict())
    return report
