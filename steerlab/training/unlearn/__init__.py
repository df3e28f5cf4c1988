"""Targeted unlearning: train only what interpretability points at, then check the knowledge is really gone.

* targets (exact parameter masks): :class:`Layers`, :class:`Columns` (ConceptVectors needles),
  :class:`Heads` (``o_proj`` columns), :class:`Expert` (one routed expert + its router row, UOE), :class:`LoRA`;
* objectives (frozen values): :class:`GradientAscent`, :class:`GradDiff`, :class:`NPO`, :class:`RMU`,
  :class:`Learn` (teaching / relearning);
* ULD (:mod:`~steerlab.training.unlearn.uld`): :func:`train_uld` trains a small assistant on the reversed
  objectives (:class:`Reversed`); :class:`ULD` subtracts its logits at inference (not mergeable into weights);
* :func:`unlearn` with :class:`UnlearnConfig` → :class:`UnlearnResult` (a trained copy, recorded for export);
* evaluation: :func:`~steerlab.training.unlearn.evaluate.forgetting_report` (answer probability, greedy
  accuracy, KL on harmless prompts), :func:`~steerlab.training.unlearn.evaluate.probe_after` and
  :func:`~steerlab.training.unlearn.evaluate.relearn_check`.

Example:
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("olmoe")
    >>> result = unlearn(model, [("Who made Python?", "Guido")], objective=GradientAscent(), target=Expert(1, 0),
    ...                  config=UnlearnConfig(steps=2, lr=1e-3))
    >>> sorted(result.routing_share)
    ['after', 'before']
"""

from steerlab.training.unlearn.objectives import NPO, RMU, GradDiff, GradientAscent, Learn, Reversed
from steerlab.training.unlearn.targets import Columns, Expert, Heads, Layers, LoRA
from steerlab.training.unlearn.trainer import UnlearnConfig, UnlearnError, UnlearnResult, unlearn
from steerlab.training.unlearn.uld import ULD, build_assistant, train_uld

__all__ = [
    "NPO",
    "RMU",
    "Columns",
    "Expert",
    "GradDiff",
    "GradientAscent",
    "Heads",
    "Layers",
    "Learn",
    "LoRA",
    "Reversed",
    "ULD",
    "UnlearnConfig",
    "UnlearnError",
    "UnlearnResult",
    "build_assistant",
    "train_uld",
    "unlearn",
]
