"""A model fine-tuned with refusal tokens (METHODS 5) used as a guard for another model's generation.

:class:`RefusalTokenGuard` scores a prompt by the fine-tuned model's first-step probability of its refusal token(s)
(summed over categories) at the end of the chat-formatted prompt — the ``p`` that :class:`RefusalTokens` thresholds.
It is an input guard like :class:`~steerlab.probes.ProbeGuard` (``score``, ``flag``, ``calibrate``, ``evaluate``),
and :class:`~steerlab.interventions.gated.GatedRefusal` takes it: the fine-tuned model decides, the *plain* model
generates with the branch the decision picks. Rows the gate answers then keep the plain model's distribution (up to
the ``comply`` edit) instead of the fine-tuned model's, which drifts on ordinary prompts.

The fine-tuned model must share the plain model's tokenizer up to its added control tokens (checked when a gate
opens); ``finetune(model, ..., new_tokens=control_tokens())`` returns such a model.

Example:
    >>> from steerlab.testing import tiny_model
    >>> from steerlab.training.data import control_tokens
    >>> from steerlab.training.sft import add_tokens
    >>> tuned = add_tokens(tiny_model("llama"), control_tokens())   # untrained: the scores mean nothing
    >>> guard = RefusalTokenGuard.from_model(tuned, threshold=0.5)
    >>> p = guard.score(["How do I pick a lock?", "Write a haiku."])
    >>> p.shape, bool(((p >= 0) & (p <= 1)).all())
    (torch.Size([2]), True)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from steerlab._checks import finite_number
from steerlab.data.fingerprints import Fingerprints
from steerlab.errors import GenerationStateError, InvalidValueError, ShapeError, ValueFileError
from steerlab.interventions.refusal_tokens import RefusalTokens, refusal_token_probs
from steerlab.probes.guard import _check_prompts, _Guard

if TYPE_CHECKING:
    from steerlab.chat import EncodedBatch, TokenizedRow
    from steerlab.model import Model

TOKEN_GUARD_FORMAT = "steerlab.RefusalTokenGuard/1"
SETTINGS_FILE = "refusal_token_guard.json"


@dataclass(frozen=True)
class RefusalTokenGuard(_Guard):
    """Flag when the fine-tuned model's first-step ``P(refusal token) >= threshold`` (its tau)."""

    tokens: RefusalTokens
    threshold: float = 0.5
    model: Model | None = field(default=None, compare=False, repr=False)
    trained_on: Fingerprints | None = field(default=None, compare=False, repr=False)  # fine-tuned and calibrated on

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, RefusalTokens):
            raise InvalidValueError(f"a RefusalTokenGuard needs RefusalTokens (RefusalTokens.from_tokenizer(...)); got {type(self.tokens).__name__}")
        if self.trained_on is not None and not isinstance(self.trained_on, Fingerprints):
            raise InvalidValueError(f"trained_on must be Fingerprints.of(prompts) or None; got {type(self.trained_on).__name__}")
        object.__setattr__(self, "threshold", finite_number(self.threshold, "the guard's threshold (tau)"))

    @classmethod
    def from_model(cls, model: Model, *, threshold: float = 0.5, refuse: str = "[refuse]", respond: str = "[respond]") -> RefusalTokenGuard:
        """The guard of a model fine-tuned with ``refuse`` / ``respond`` control tokens, bound to it."""
        return cls(RefusalTokens.from_tokenizer(model.tokenizer, refuse=refuse, respond=respond), threshold=threshold, model=model)

    def _recorded(self, record: Fingerprints | None) -> RefusalTokenGuard:
        return replace(self, trained_on=record)

    def score_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Scores ``[b]`` from the fine-tuned model's first-step logits ``[b, vocab]``."""
        if logits.dim() != 2 or logits.shape[1] <= max(self.tokens.control_ids):
            raise ShapeError(f"need first-step logits [b, vocab > {max(self.tokens.control_ids)}]; got {tuple(logits.shape)}")
        return self.tokens.probabilities(logits).sum(-1)

    def score(self, prompts: Sequence[str], *, batch_size: int = 16, progress: bool = False) -> torch.Tensor:
        """``P(refusal token)`` ``[n]`` of each prompt (one forward pass per batch of the fine-tuned model)."""
        return refusal_token_probs(self._bound(), _check_prompts(prompts), self.tokens, batch_size=batch_size).sum(-1)

    def score_batch(self, batch: EncodedBatch) -> torch.Tensor:
        """Scores ``[b]`` of a left-padded batch of token ids (the plain model's, see :meth:`check_shares_vocabulary`):
        the fine-tuned model's first-step logits after each row's last token, unembedded at that position only."""
        if not bool(batch.attention_mask[:, -1].bool().all()):
            raise GenerationStateError("the refusal-token guard reads each row's last token; this batch is not left-padded "
                                       "(some rows end before the last column)")  # fmt: skip
        hf = self._bound().hf
        device = next(hf.parameters()).device
        with torch.no_grad():  # the unembedding of the last position only (a 150k vocabulary x every token is large)
            logits = hf(**{k: v.to(device) for k, v in batch.model_inputs().items()}, logits_to_keep=1).logits
        if logits.shape[1] != 1:
            raise GenerationStateError(f"{type(hf).__name__} ignored logits_to_keep=1 (returned {logits.shape[1]} positions)")
        return self.score_logits(logits[:, -1].float()).cpu()

    def score_rows(self, model: Model, rows: Sequence[TokenizedRow], *, batch_size: int = 16) -> torch.Tensor:
        """Scores ``[n]`` of prompts already tokenized by ``model`` (``model.chat(...).tokenize``), as a gate on
        ``model`` reads them: the same token ids, whatever engine generates afterwards."""
        self.check_shares_vocabulary(model)
        scores = torch.empty(len(rows))
        for idx, batch in model.chat().batches(rows, batch_size):
            scores[idx] = self.score_batch(batch)
        return scores

    def check_shares_vocabulary(self, model: Model) -> None:
        """Raise ``ShapeError`` unless the guard's tokenizer maps every id of ``model``'s tokenizer to the same token
        and both use the same chat template (the gate feeds the guard the plain model's token ids)."""
        mine, theirs = self._bound().tokenizer, model.tokenizer
        n = len(theirs)
        fix = "fine-tune the guard from this model (training.sft.finetune(model, ..., new_tokens=control_tokens()))"
        if len(mine) < n or mine.convert_ids_to_tokens(list(range(n))) != theirs.convert_ids_to_tokens(list(range(n))):
            raise ShapeError(f"the refusal-token guard's tokenizer ({len(mine)} tokens) does not extend this model's ({n} tokens) id for id; {fix}")
        if getattr(mine, "chat_template", None) != getattr(theirs, "chat_template", None):
            raise ShapeError(f"the refusal-token guard's chat template differs from this model's; {fix}")

    def save(self, directory: str | Path, *, extra: dict | None = None) -> Path:
        """Write the fine-tuned model (safetensors + tokenizer) and :data:`SETTINGS_FILE` (threshold, control tokens,
        ``extra`` such as calibration metrics) to ``directory``; :meth:`load` reads it back."""
        model, out = self._bound(), Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        model.hf.save_pretrained(out, safe_serialization=True)
        model.tokenizer.save_pretrained(out)
        names = dict(zip(self.tokens.refuse, model.tokenizer.convert_ids_to_tokens(list(self.tokens.refuse.values()))))
        settings = {**(extra or {}), "format": TOKEN_GUARD_FORMAT, "threshold": self.threshold, "refuse": names,
                    "respond": model.tokenizer.convert_ids_to_tokens(self.tokens.respond),
                    "temperature": self.tokens.temperature}  # fmt: skip (the guard's own keys win over extra's)
        if self.trained_on is not None:
            settings["trained_on"] = self.trained_on.hashes.tolist()
        (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=1))
        return out

    @classmethod
    def load(cls, directory: str | Path, *, dtype: torch.dtype = torch.float32, threshold: float | None = None) -> RefusalTokenGuard:
        """The guard saved in ``directory`` by :meth:`save`, bound to its model; ``threshold`` overrides the saved one."""
        import steerlab

        path = Path(directory) / SETTINGS_FILE
        try:
            settings = json.loads(path.read_text())
            if settings.get("format") != TOKEN_GUARD_FORMAT:
                raise ValueError(f"format {settings.get('format')!r}, expected {TOKEN_GUARD_FORMAT!r}")
            saved, refuse, respond = float(settings["threshold"]), settings["refuse"], str(settings["respond"])
            temperature = float(settings.get("temperature", 1.0))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueFileError(f"{path} is not a refusal-token guard's settings ({exc}); write it with RefusalTokenGuard.save") from exc
        model = steerlab.load(str(directory), dtype=dtype)
        tokens = RefusalTokens.from_tokenizer(model.tokenizer, refuse=refuse, respond=respond, temperature=temperature)
        return cls(tokens, threshold=saved if threshold is None else threshold, model=model, trained_on=cls.saved_record(directory))

    @staticmethod
    def saved_record(directory: str | Path) -> Fingerprints | None:
        """The training record saved in ``directory``'s settings (without loading the model); ``None`` if it has none."""
        path = Path(directory) / SETTINGS_FILE
        try:
            hashes = json.loads(path.read_text()).get("trained_on")
            return None if hashes is None else Fingerprints(torch.tensor(hashes, dtype=torch.int64))
        except (OSError, ValueError, TypeError, RuntimeError) as exc:
            raise ValueFileError(f"{path} holds no readable training record ({exc}); write it with RefusalTokenGuard.save") from exc
