"""Refusal prediction: a probe that tells from the prompt alone whether the model will refuse.

Labels come from the model itself: greedy generations judged by :func:`steerlab.eval.is_refusal`.
The probe reads ``resid_pre`` at the last prompt token (METHODS 3 reads the refusal probe there,
after the template and any reasoning). ``strict=True`` keeps the METHODS 3 training set: harmful
prompts the model refuses against harmless prompts it answers.

Example:
    >>> from steerlab.testing import tiny_model
    >>> model, prompts = tiny_model("llama"), ["Make a weapon.", "Pick a lock.", "Hi", "Say hello."]
    >>> labels, responses = refusal_labels(model, prompts, max_new_tokens=8)
    >>> labels.shape, len(responses)
    (torch.Size([4]), 4)
    >>> fit = refusal_probe(model, prompts, labels=[1, 1, 0, 0], n_folds=2)  # a random model never refuses
    >>> x = steerlab.collect(model, prompts, layers=fit.probe.layers, progress=False).get("resid_pre", "last")[:, :, -1]
    >>> fit.probe.predict_proba(x).shape  # P(refuses) per prompt and layer
    torch.Size([4, 1])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from steerlab.activations import collect
from steerlab.chat import Position
from steerlab.errors import EmptyInputError, ShapeError
from steerlab.eval import is_refusal
from steerlab.probes.probe import Probe, fit_probes
from steerlab.probes.sweep import SweepResult, sweep

if TYPE_CHECKING:
    from steerlab.model import Model


def refusal_labels(model: Model, prompts: Sequence[str], *, max_new_tokens: int = 32, batch_size: int = 16, progress: bool = False) -> tuple[torch.Tensor, list[str]]:
    """(1 where the model's greedy response is a refusal, the responses)."""
    prompts = list(prompts)
    if not prompts:
        raise EmptyInputError("the prompt list is empty; pass at least one prompt")
    responses = model.generate(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    return torch.tensor([int(is_refusal(r)) for r in responses]), responses


@dataclass(frozen=True)
class RefusalProbeFit:
    """The probe at the best layer (fitted on all examples) and the cross-validated layer sweep."""

    probe: Probe
    sweep: SweepResult
    labels: torch.Tensor


def refusal_probe(
    model: Model,
    prompts: Sequence[str],
    *,
    labels: Sequence[int] | torch.Tensor | None = None,
    harmful: Sequence[bool] | None = None,
    strict: bool = False,
    position: Position = "last",
    layers: Sequence[int] | None = None,
    n_folds: int = 5,
    C: float = 1.0,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    progress: bool = False,
) -> RefusalProbeFit:
    """Fit P(refuse | prompt) per layer; pick the layer with the best cross-validated AUC.

    ``labels`` (1 = refuses) default to the model's own judged generations. ``strict=True`` needs
    ``harmful`` flags and keeps only harmful-and-refused vs harmless-and-answered prompts.
    """
    prompts = list(prompts)
    if labels is None:
        labels, _ = refusal_labels(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    y = torch.as_tensor(labels).long()
    if len(y) != len(prompts):
        raise ShapeError(f"{len(prompts)} prompts but {len(y)} labels")
    if strict:
        if harmful is None or len(harmful) != len(prompts):
            raise ShapeError("strict=True needs one harmful flag per prompt (harmful=[...])")
        keep = [i for i, (h, r) in enumerate(zip(harmful, y.tolist())) if bool(h) == bool(r)]
        prompts, y = [prompts[i] for i in keep], y[keep]
    acts = collect(model, prompts, sites=["resid_pre"], layers=layers, positions=[position], batch_size=batch_size, progress=progress)
    x = acts.get("resid_pre", position)[:, :, -1]
    result = sweep(x[:, :, None], y, layers=acts.layers, columns=[str(position)], n_folds=n_folds, C=C)
    best = result.best("auc")[0]
    i = acts.layers.index(best)
    probe = fit_probes(x[:, i : i + 1], y, layers=[best], C=C, position=position, labels=("complies", "refuses"), model=model.name)
    return RefusalProbeFit(probe=probe, sweep=result, labels=y)
