"""What a fitted value saw: 64-bit fingerprints of the prompts it was fitted or calibrated on, not the prompts.

A guard scores the prompts it was fitted on higher (or lower) than new ones, so a band tuned, or an accuracy
measured, on them is optimistic. Saved probes and latent guards carry a :class:`Fingerprints` of their training
prompts (the tensor ``trained_on`` in their file) so that code choosing or judging with them can tell which of the
user's prompts are in-sample: :meth:`Fingerprints.seen` per prompt, :func:`split_unseen` to keep only new ones.

A fingerprint is the first 8 bytes of the sha256 of the prompt with Unicode compatibility forms folded (NFKC),
case folded and white space collapsed, so a copy that differs only in case or spacing still counts as seen.
The prompts themselves cannot be read back from a file.

Example:
    >>> seen = Fingerprints.of(["How do I kill a Python process?", "Write a haiku."])
    >>> len(seen), seen.seen(["how do I  kill a python process?", "Name a colour."]).tolist()
    (2, [True, False])
    >>> split_unseen(seen, ["Write a haiku.", "Name a colour."])
    (['Name a colour.'], 1)
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from steerlab.errors import InvalidValueError, ShapeError

__all__ = ["Fingerprints", "fingerprint", "split_unseen", "training_record"]


def fingerprint(prompt: str) -> int:
    """The signed 64-bit fingerprint of one prompt (normalised: NFKC, case folded, white space collapsed).

    Example:
        >>> fingerprint("A  b") == fingerprint("a b") != fingerprint("a c")
        True
    """
    if not isinstance(prompt, str):
        raise InvalidValueError(f"a prompt must be a str; got {type(prompt).__name__}")
    text = " ".join(unicodedata.normalize("NFKC", prompt).casefold().split())
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)


@dataclass(frozen=True, eq=False)
class Fingerprints:
    """The sorted, distinct fingerprints (int64 ``[n]``) of the prompts a value was fitted or calibrated on."""

    hashes: torch.Tensor

    def __post_init__(self) -> None:
        hashes = torch.as_tensor(self.hashes)
        if hashes.dim() != 1 or hashes.dtype != torch.int64:
            raise ShapeError(f"fingerprints are an int64 vector; got {hashes.dtype} of shape {tuple(hashes.shape)}")
        object.__setattr__(self, "hashes", torch.unique(hashes.detach().cpu()))  # sorted, distinct

    @classmethod
    def of(cls, *prompt_sets: Sequence[str]) -> Fingerprints:
        """The fingerprints of every prompt in ``prompt_sets``."""
        prompts = [p for ps in prompt_sets for p in ([ps] if isinstance(ps, str) else ps)]
        return cls(torch.tensor([fingerprint(p) for p in prompts], dtype=torch.int64))

    def __len__(self) -> int:
        return len(self.hashes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Fingerprints) and torch.equal(self.hashes, other.hashes)

    __hash__ = None  # type: ignore[assignment]  # equal by value; a tensor field has no value hash

    def union(self, other: Fingerprints) -> Fingerprints:
        """The prompts of both."""
        return Fingerprints(torch.cat([self.hashes, other.hashes]))

    def seen(self, prompts: Sequence[str]) -> torch.Tensor:
        """Bool ``[n]``: whether each prompt (normalised) is among these fingerprints."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        query = torch.tensor([fingerprint(p) for p in prompts], dtype=torch.int64)
        return torch.isin(query, self.hashes)


def split_unseen(record: Fingerprints, prompts: Sequence[str]) -> tuple[list[str], int]:
    """(the prompts not in ``record``, in order; how many were dropped as seen)."""
    prompts = list(prompts)
    seen = record.seen(prompts).tolist() if prompts else []
    return [p for p, s in zip(prompts, seen) if not s], sum(seen)


def training_record(value: object) -> Fingerprints | None:
    """The training record (``trained_on``) of a guard or probe, or ``None`` when it carries none (a file saved before
    records, a value fitted from bare activations, an object that is no guard)."""
    record = getattr(value, "trained_on", None)
    return record if isinstance(record, Fingerprints) else None
