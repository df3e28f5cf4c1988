"""Unlearning objectives as frozen values: what to minimise, given a forward pass on forget and retain batches.

Each objective's :meth:`loss` receives a :class:`Passes` (the trainer's forward passes: logits, layer
activations, the frozen model's reference numbers) and returns ``(loss, parts)``; ``parts`` are the named
terms for the loss log. The maths of each term is in :mod:`~steerlab.training.unlearn.losses`.

* :class:`GradientAscent` — maximise the forget set's NLL.
* :class:`GradDiff` — gradient ascent on forget plus ``retain_weight`` × NLL on retain.
* :class:`NPO` — Negative Preference Optimization against the frozen starting model (+ retain NLL: NPO-RT).
* :class:`RMU` — push layer ``layer``'s forget activations toward a fixed random vector of norm
  ``coeff`` × the frozen model's mean forget-activation norm; keep retain activations where they were.
* :class:`Reversed` — ULD's assistant objective (the forget/retain roles swapped): learn the forget set, make
  the retain predictions flat; see :mod:`~steerlab.training.unlearn.uld`.
* :class:`Learn` — plain NLL on the "forget" examples: teaching a fact (the fictitious-entity set) or a
  relearning attack with the same trainer and masks.

Example:
    >>> NPO(beta=0.1).needs_reference, RMU(layer=1).layer
    (True, 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from steerlab.errors import InvalidValueError
from steerlab.training.unlearn.losses import mean_nll, npo_loss, rmu_loss, sequence_logprob, uniform_ce

Parts = dict[str, float]


class Passes(Protocol):
    """What an objective may ask the trainer for, for the current forget / retain batch."""

    def forget_logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, labels)`` of the forget batch under the model being trained."""

    def retain_logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, labels)`` of the retain batch."""

    def reference_logprob(self) -> torch.Tensor:
        """The frozen starting model's ``log π(y|x)`` for each forget row."""

    def forget_hidden(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(activations [b, s, d], token mask [b, s])`` of the forget batch at the output of decoder layer ``layer``."""

    def retain_hidden(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(activations, frozen model's activations, token mask)`` of the retain batch at that layer."""

    def control_vector(self, layer: int, coeff: float) -> torch.Tensor:
        """RMU's fixed ``c · u``: a seeded random unit vector times ``coeff`` × the frozen mean forget norm."""


def _num(t: torch.Tensor) -> float:
    """A loss term as a plain number for the log (detached)."""
    return float(t.detach())


def _check_weight(name: str, value: float) -> None:
    if not (value >= 0 and not math.isnan(value)):
        raise InvalidValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class GradientAscent:
    """Maximise the NLL of the forget targets (loss = ``-NLL_forget``). Unbounded: stop by steps."""

    needs_reference = False

    def loss(self, passes: Passes) -> tuple[torch.Tensor, Parts]:
        """``-mean NLL`` over the forget batch's target tokens."""
        nll = mean_nll(*passes.forget_logits())
        return -nll, {"forget_nll": _num(nll)}


@dataclass(frozen=True)
class GradDiff:
    """Gradient difference: ``-NLL_forget + retain_weight · NLL_retain``."""

    retain_weight: float = 1.0
    needs_reference = False

    def __post_init__(self) -> None:
        _check_weight("retain_weight", self.retain_weight)

    def loss(self, passes: Passes) -> tuple[torch.Tensor, Parts]:
        """Forget NLL ascended, retain NLL descended."""
        forget, retain = mean_nll(*passes.forget_logits()), mean_nll(*passes.retain_logits())
        return -forget + self.retain_weight * retain, {"forget_nll": _num(forget), "retain_nll": _num(retain)}


@dataclass(frozen=True)
class NPO:
    """Negative Preference Optimization: ``-(2/β) mean log σ(-β log(π_θ/π_ref))`` on forget sequences, plus
    ``retain_weight · NLL_retain`` (NPO-RT; 0 = plain NPO). ``π_ref`` is the model before unlearning."""

    beta: float = 0.1
    retain_weight: float = 1.0
    needs_reference = True

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise InvalidValueError(f"beta must be > 0, got {self.beta!r}")
        _check_weight("retain_weight", self.retain_weight)

    def loss(self, passes: Passes) -> tuple[torch.Tensor, Parts]:
        """NPO on the forget batch, plus the retain NLL term when ``retain_weight > 0``."""
        logits, labels = passes.forget_logits()
        logp = sequence_logprob(logits, labels)
        npo = npo_loss(logp, passes.reference_logprob(), beta=self.beta)
        parts = {"npo": _num(npo), "forget_logratio": _num((logp - passes.reference_logprob()).mean())}
        if not self.retain_weight:
            return npo, parts
        retain = mean_nll(*passes.retain_logits())
        parts["retain_nll"] = _num(retain)
        return npo + self.retain_weight * retain, parts


@dataclass(frozen=True)
class RMU:
    """Representation Misdirection: layer-``layer`` activations on forget tokens toward ``c · u`` (``u`` a seeded
    random unit vector; ``c = coeff`` × the frozen model's mean activation norm on forget tokens, so one setting
    carries across models), retain activations held at the frozen model's with weight ``alpha``.

    The official recipe trains the MLPs of layers ``layer - 2 .. layer``: pass ``Layers((l-2, l-1, l), part="mlp")``.
    Layers after ``layer`` receive no gradient, so masks beyond it are refused by the trainer.
    """

    layer: int
    coeff: float = 4.0
    alpha: float = 100.0
    seed: int = 0
    needs_reference = False

    def __post_init__(self) -> None:
        if not self.coeff > 0:
            raise InvalidValueError(f"coeff must be > 0 (a multiple of the mean activation norm), got {self.coeff!r}")
        _check_weight("alpha", self.alpha)

    def loss(self, passes: Passes) -> tuple[torch.Tensor, Parts]:
        """Mean squared distance to the control vector on forget tokens + ``alpha`` × drift on retain tokens."""
        h_f, m_f = passes.forget_hidden(self.layer)
        control = passes.control_vector(self.layer, self.coeff)
        if self.alpha:
            h_r, frozen, m_r = passes.retain_hidden(self.layer)
            loss = rmu_loss(h_f, m_f, control, h_r, frozen, m_r, alpha=self.alpha)
            forget_part = rmu_loss(h_f.detach(), m_f, control)
            return loss, {
                "forget_mse": _num(forget_part),
                "retain_mse": float((loss.detach() - forget_part) / self.alpha),
            }
        loss = rmu_loss(h_f, m_f, control)
        return loss, {"forget_mse": _num(loss)}


@dataclass(frozen=True)
class Learn:
    """Plain NLL on the forget examples: teach them (fictitious facts) or relearn them (the relearning check);
    ``retain_weight > 0`` adds the retain NLL so teaching does not overwrite what the model knew."""

    retain_weight: float = 0.0
    needs_reference = False

    def __post_init__(self) -> None:
        _check_weight("retain_weight", self.retain_weight)

    def loss(self, passes: Passes) -> tuple[torch.Tensor, Parts]:
        """Mean NLL over the batch's target tokens (+ the weighted retain NLL)."""
        return _learn_forget(passes, self.retain_weight, "retain_nll", mean_nll)


@dataclass(frozen=True)
class Reversed:
    """ULD's reversed objectives for the assistant model: NLL on the forget examples (remember them) plus
    ``retain_weight`` × cross-entropy from the uniform distribution on the retain examples (know nothing there),
    so that ``logits_target - α · logits_assistant`` lowers the forget answers and leaves retain ones alone."""

    retain_weight: float = 1.0
    needs_reference = False

    def __post_init__(self) -> None:
        _check_weight("retain_weight", self.retain_weight)

    def loss(self, passes: Passes) -> tuple[torch.Tensor, Parts]:
        """Forget NLL + ``retain_weight`` × uniform cross-entropy on the retain batch's answer positions."""
        return _learn_forget(passes, self.retain_weight, "retain_uniform_ce", uniform_ce)


def _learn_forget(passes: Passes, weight: float, name: str, retain_term) -> tuple[torch.Tensor, Parts]:
    """Forget NLL, plus ``weight`` × ``retain_term(retain logits, labels)`` (logged as ``name``) when weight > 0."""
    nll = mean_nll(*passes.forget_logits())
    if not weight:
        return nll, {"forget_nll": _num(nll)}
    retain = retain_term(*passes.retain_logits())
    return nll + weight * retain, {"forget_nll": _num(nll), name: _num(retain)}


Objective = GradientAscent | GradDiff | NPO | RMU | Learn | Reversed
