"""Does an edit remove a concept? Answer probabilities on concept questions vs control questions.

:func:`concept_effect` measures :func:`~steerlab.eval.answers.answer_probability` on questions about a
concept and on control questions, without and with an intervention (e.g. a
:class:`~steerlab.interventions.ColumnEdit` ablating concept vectors). :func:`noise_validation` is
METHODS 8's check of candidate concept vectors: add ``N(0, 0.1²)`` noise to each column ``v`` (every
coordinate, ``v <- v + ε``) and see that the concept questions degrade while the controls do not.

Example:
    >>> from steerlab.testing import tiny_model
    >>> model, columns = tiny_model("llama"), [(1, 3), (2, 7)]  # (layer, neuron), e.g. search.columns(5)
    >>> concept_qs = [QA("Write a short poem.", ("poem",))]
    >>> control_qs = [QA("What is the capital of France?", ("Paris",)), QA("How do I bake bread?", ("bread",))]
    >>> effect = noise_validation(model, columns, concept_qs, control_qs)
    >>> effect.concept_after.shape, effect.control_after.shape
    (torch.Size([1]), torch.Size([2]))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from steerlab.errors import EmptyInputError
from steerlab.eval.answers import QA, answer_probability
from steerlab.interventions.columns import Column, noise_edit

if TYPE_CHECKING:
    from steerlab.model import Model


@dataclass(frozen=True)
class ConceptEffect:
    """Per-question answer probabilities before and after an intervention, for concept and control questions.

    ``*_drop`` is the relative drop of the mean probability (``1 - mean(after) / mean(before)``);
    ``*_logp`` is the mean change of the log probability per question (negative = degraded);
    ``selectivity`` is ``concept_drop - control_drop``.
    """

    concept_before: torch.Tensor
    concept_after: torch.Tensor
    control_before: torch.Tensor
    control_after: torch.Tensor

    @staticmethod
    def _drop(before: torch.Tensor, after: torch.Tensor) -> float:
        return float(1.0 - after.mean() / before.mean())

    @staticmethod
    def _logp(before: torch.Tensor, after: torch.Tensor) -> float:
        tiny = 1e-12
        return float((after.clamp_min(tiny).log() - before.clamp_min(tiny).log()).mean())

    @property
    def concept_drop(self) -> float:
        """Relative drop of the mean answer probability on concept questions."""
        return self._drop(self.concept_before, self.concept_after)

    @property
    def control_drop(self) -> float:
        """Relative drop of the mean answer probability on control questions."""
        return self._drop(self.control_before, self.control_after)

    @property
    def concept_logp(self) -> float:
        """Mean change of log p(answer) on concept questions."""
        return self._logp(self.concept_before, self.concept_after)

    @property
    def control_logp(self) -> float:
        """Mean change of log p(answer) on control questions."""
        return self._logp(self.control_before, self.control_after)

    @property
    def selectivity(self) -> float:
        """``concept_drop - control_drop``: positive when the concept degrades more than the controls."""
        return self.concept_drop - self.control_drop

    def summary(self) -> dict[str, Any]:
        """Plain numbers for a table row."""
        return {
            "concept_p_before": float(self.concept_before.mean()),
            "concept_p_after": float(self.concept_after.mean()),
            "control_p_before": float(self.control_before.mean()),
            "control_p_after": float(self.control_after.mean()),
            "concept_drop": self.concept_drop,
            "control_drop": self.control_drop,
            "concept_dlogp": self.concept_logp,
            "control_dlogp": self.control_logp,
            "selectivity": self.selectivity,
        }


def concept_effect(
    model: Model,
    intervention: Any,
    concept: Sequence[QA],
    control: Sequence[QA],
    *,
    chat: bool = True,
    batch_size: int = 16,
    before: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> ConceptEffect:
    """Answer probabilities on ``concept`` and ``control`` questions without and with ``intervention``.

    ``before`` reuses already measured ``(concept, control)`` baselines (e.g. across many edits).

    Example:
        >>> from steerlab.interventions import ColumnEdit
        >>> from steerlab.testing import tiny_model
        >>> model, cols = tiny_model("llama"), [(1, 3), (2, 7)]
        >>> poem_qs, control_qs = [QA("Write a short poem.", ("poem",))], [QA("Bake bread?", ("bread",))]
        >>> summary = concept_effect(model, ColumnEdit(cols, scale=0.0), poem_qs, control_qs).summary()
        >>> summary["concept_p_after"] != summary["concept_p_before"]
        True
        >>> concept_effect(model, ColumnEdit(cols, scale=1.0), poem_qs, control_qs).concept_drop  # scale 1: no change
        0.0
    """
    kw = {"chat": chat, "batch_size": batch_size}
    if before is None:
        before = (answer_probability(model, concept, **kw), answer_probability(model, control, **kw))
    with model.apply(intervention):
        after = (answer_probability(model, concept, **kw), answer_probability(model, control, **kw))
    return ConceptEffect(before[0], after[0], before[1], after[1])


def noise_validation(
    model: Model,
    columns: Sequence[Column],
    concept: Sequence[QA],
    control: Sequence[QA],
    *,
    std: float = 0.1,
    seed: int = 0,
    draws: int = 1,
    chat: bool = True,
    batch_size: int = 16,
    before: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> ConceptEffect:
    """METHODS 8 validation: add ``N(0, std²)`` noise (default ``std=0.1``) to each column and measure
    :func:`concept_effect` — the concept's questions should degrade, the controls should not. With ``draws > 1``
    the "after" probabilities are averaged over that many noise draws (seeds ``seed, seed + 1, ...``).

    Example:
        >>> from steerlab.testing import tiny_model
        >>> poem_qs, control_qs = [QA("Write a short poem.", ("poem",))], [QA("Bake bread?", ("bread",))]
        >>> effect = noise_validation(tiny_model("llama"), [(1, 3)], poem_qs, control_qs, draws=3)
        >>> isinstance(effect.selectivity, float)
        True
    """
    if draws < 1:
        raise EmptyInputError(f"draws must be >= 1; got {draws}")
    kw = {"chat": chat, "batch_size": batch_size}
    if before is None:
        before = (answer_probability(model, concept, **kw), answer_probability(model, control, **kw))
    effects = [
        concept_effect(model, noise_edit(model, columns, std=std, seed=seed + i), concept, control, before=before, **kw)
        for i in range(draws)
    ]
    mean = [torch.stack([getattr(e, f) for e in effects]).mean(0) for f in ("concept_after", "control_after")]
    return ConceptEffect(before[0], mean[0], before[1], mean[1])
