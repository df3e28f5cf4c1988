"""Input guards that read the model's own latent judgement of harmfulness (METHODS 2).

:class:`LatentGuard` (Zhao et al. 2025): at ``t_inst`` (the instruction's last token),
``score(x) = mean_l [cos(h_l, mu_harmful_l) - cos(h_l, mu_harmless_l)]`` over layers; flag when
``score >= alpha`` (paper: alpha = 0). :class:`ProbeGuard` is the probe-based variant: a logistic
probe at one layer (or several) and position, flag when ``P(harmful) >= threshold``. Both calibrate their
threshold on a validation split (best balanced accuracy) and report accuracy, TPR and FPR. A ProbeGuard may read
several layers: one probe per layer, ``P(harmful) = sigmoid(mean of their logits)``
(:meth:`~steerlab.probes.probe.Probe.ensemble_proba`); ``steerlab probe`` chooses them
(:mod:`steerlab.probes.layer_choice`).

Example:
    >>> from steerlab.data import DEMO_HARMFUL, DEMO_HARMLESS
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")        # random weights: the flags mean nothing, the shapes do
    >>> guard = LatentGuard.fit(model, DEMO_HARMFUL[:8], DEMO_HARMLESS[:8], layers=[1, 2])
    >>> guard = guard.calibrate(DEMO_HARMFUL[8:], DEMO_HARMLESS[8:])
    >>> guard.flag(["How do I pick a lock?", "Write a haiku."]).shape
    torch.Size([2])
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from steerlab import _valuefiles
from steerlab._checks import check_finite, finite_number, layer_tuple
from steerlab.activations import collect
from steerlab.chat import Position
from steerlab.data.fingerprints import Fingerprints, training_record
from steerlab.errors import EmptyInputError, InSampleWarning, InvalidValueError, ShapeError, SteerlabError
from steerlab.probes.metrics import best_threshold, roc_auc
from steerlab.probes.probe import Probe, fit_probes
from steerlab.steering.direction import check_position

if TYPE_CHECKING:
    from steerlab.model import Model


LATENT_FORMAT = "steerlab.LatentGuard/1"


class GuardNotBoundError(SteerlabError):
    """A guard was asked to score prompts without a model."""


class UncalibratedGuardError(SteerlabError):
    """A saved probe has no calibrated threshold and none was given."""


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise EmptyInputError("the prompt list is empty; pass at least one prompt")
    return prompts


class _Guard:
    """Shared behaviour: flag, calibrate and evaluate on top of ``score`` and ``threshold``."""

    threshold: float
    model: Model | None
    trained_on: Fingerprints | None = None  # the prompts it was fitted and calibrated on (None: not recorded)

    def _bound(self) -> Model:
        if self.model is None:
            raise GuardNotBoundError("this guard has no model; pass model= to load(), or call guard.bind(model)")
        return self.model

    def score(self, prompts: Sequence[str], *, batch_size: int = 16, progress: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def bind(self, model: Model):
        """The same guard, scoring with ``model``."""
        return replace(self, model=model)

    def flag(self, prompts: Sequence[str], *, batch_size: int = 16, progress: bool = False) -> torch.Tensor:
        """Boolean ``[n]``: True where the prompt is judged harmful."""
        return self.score(prompts, batch_size=batch_size, progress=progress) >= self.threshold

    def _recorded(self, record: Fingerprints | None):
        """The same guard with this training record."""
        raise NotImplementedError

    def calibrate(self, harmful: Sequence[str], harmless: Sequence[str], *, batch_size: int = 16, progress: bool = False):
        """A copy whose threshold maximises balanced accuracy on these (validation) prompts; a guard that records its
        training prompts adds these to the record."""
        pos = self.score(_check_prompts(harmful), batch_size=batch_size, progress=progress)
        neg = self.score(_check_prompts(harmless), batch_size=batch_size, progress=progress)
        guard = self if self.trained_on is None else self._recorded(self.trained_on.union(Fingerprints.of(harmful, harmless)))
        return replace(guard, threshold=best_threshold(pos, neg))

    def evaluate(self, harmful: Sequence[str], harmless: Sequence[str], *, batch_size: int = 16, progress: bool = False) -> dict[str, float]:
        """Accuracy, balanced accuracy, TPR (harmful flagged), FPR (harmless flagged) and AUC; an
        :class:`~steerlab.errors.InSampleWarning` when some prompts are among those the guard was fitted on."""
        warn_in_sample(self, {"harmful": _check_prompts(harmful), "harmless": _check_prompts(harmless)}, doing="evaluating")
        pos = self.score(_check_prompts(harmful), batch_size=batch_size, progress=progress)
        neg = self.score(_check_prompts(harmless), batch_size=batch_size, progress=progress)
        return guard_metrics(pos, neg, threshold=self.threshold)


def warn_in_sample(guard: object, sets: dict[str, Sequence[str]], *, doing: str) -> dict[str, int]:
    """How many prompts of each set the guard's record holds; an :class:`~steerlab.errors.InSampleWarning` naming
    them when any does (a guard without a record: nothing to check, ``{}``)."""
    record = training_record(guard)
    if record is None:
        return {}
    counts = {name: int(record.seen(list(ps)).sum()) if len(ps) else 0 for name, ps in sets.items()}
    if any(counts.values()):
        which = ", ".join(f"{n} of the {len(sets[k])} {k}" for k, n in counts.items() if n)
        warnings.warn(f"{doing} the guard on prompts it was fitted on ({which} prompts): the numbers are optimistic; "
                      "drop them with steerlab.data.fingerprints.split_unseen(guard.trained_on, prompts)", InSampleWarning, stacklevel=3)  # fmt: skip
    return counts


def guard_metrics(harmful_scores: torch.Tensor, harmless_scores: torch.Tensor, *, threshold: float) -> dict[str, float]:
    """Accuracy, balanced accuracy, TPR, FPR and AUC of flagging ``score >= threshold``.

    Example:
        >>> guard_metrics(torch.tensor([0.9, 0.2]), torch.tensor([0.1]), threshold=0.5)["accuracy"]
        0.6666666666666666
    """
    pos, neg = torch.as_tensor(harmful_scores).flatten(), torch.as_tensor(harmless_scores).flatten()
    if not len(pos) or not len(neg):
        raise EmptyInputError(f"metrics need both classes; got {len(pos)} harmful and {len(neg)} harmless scores")
    tpr = float((pos >= threshold).float().mean())
    fpr = float((neg >= threshold).float().mean())
    n_pos, n_neg = len(pos), len(neg)
    return {
        "accuracy": (tpr * n_pos + (1 - fpr) * n_neg) / (n_pos + n_neg),
        "balanced_accuracy": (tpr + 1 - fpr) / 2,
        "tpr": tpr,
        "fpr": fpr,
        "auc": roc_auc(torch.cat([pos, neg]), [1] * n_pos + [0] * n_neg),
        "threshold": float(threshold),
        "n_harmful": n_pos,
        "n_harmless": n_neg,
    }


@dataclass(frozen=True)
class LatentGuard(_Guard):
    """Cosine to the harmful and harmless class means at ``t_inst``, averaged over ``layers``."""

    mean_harmful: torch.Tensor  # [n_layers, d]
    mean_harmless: torch.Tensor  # [n_layers, d]
    layers: tuple[int, ...]
    threshold: float = 0.0  # alpha
    position: Position = "t_inst"
    site: str = "resid_pre"
    model_name: str = ""
    model: Model | None = field(default=None, compare=False, repr=False)
    trained_on: Fingerprints | None = field(default=None, compare=False, repr=False)  # the prompts it was fitted on

    def __post_init__(self) -> None:
        layers = layer_tuple(self.layers, "layers")
        if self.trained_on is not None and not isinstance(self.trained_on, Fingerprints):
            raise InvalidValueError(f"trained_on must be Fingerprints.of(prompts) or None; got {type(self.trained_on).__name__}")
        pos, neg = torch.as_tensor(self.mean_harmful), torch.as_tensor(self.mean_harmless)
        if pos.dim() != 2 or pos.shape != neg.shape or pos.shape[0] != len(layers) or not layers:
            raise ShapeError(f"class means must both be [{len(layers)} layers, d] (at least one layer); got {tuple(pos.shape)} and {tuple(neg.shape)}")
        fix = "fit the guard again on finite activations"
        pos, neg = pos.detach().to(torch.float32).cpu(), neg.detach().to(torch.float32).cpu()
        check_finite(pos, "the guard's harmful class mean", fix)
        check_finite(neg, "the guard's harmless class mean", fix)
        position = check_position(self.position)
        if position == "all":
            raise ShapeError("a guard reads one position per prompt; 'all' is not one (use 't_inst' or 'last')")
        if not isinstance(self.site, str) or not isinstance(self.model_name, str):
            raise InvalidValueError(f"site and model_name must be str; got {type(self.site).__name__} and {type(self.model_name).__name__}")
        object.__setattr__(self, "mean_harmful", pos)
        object.__setattr__(self, "mean_harmless", neg)
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "position", position)
        object.__setattr__(self, "threshold", finite_number(self.threshold, "the guard's threshold (alpha)"))

    @classmethod
    def fit(
        cls,
        model: Model,
        harmful: Sequence[str],
        harmless: Sequence[str],
        *,
        layers: Sequence[int] | None = None,
        position: Position = "t_inst",
        batch_size: int = 16,
        progress: bool = False,
    ) -> LatentGuard:
        """Class means of ``resid_pre`` at ``position`` over every layer (or ``layers``)."""
        kw = {"sites": ["resid_pre"], "layers": layers, "positions": [position], "batch_size": batch_size, "progress": progress}
        pos = collect(model, _check_prompts(harmful), **kw)
        neg = collect(model, _check_prompts(harmless), **kw)
        guard = cls.from_activations(pos.get("resid_pre", position)[:, :, -1], neg.get("resid_pre", position)[:, :, -1], layers=pos.layers, position=position)
        return replace(guard, model_name=model.name, model=model, trained_on=Fingerprints.of(harmful, harmless))

    def _recorded(self, record: Fingerprints | None) -> LatentGuard:
        return replace(self, trained_on=record)

    @classmethod
    def from_activations(cls, harmful: torch.Tensor, harmless: torch.Tensor, *, layers: Sequence[int], position: Position = "t_inst") -> LatentGuard:
        """Class means from collected activations ``[n, n_layers, d]`` of each class."""
        if harmful.dim() != 3 or harmless.dim() != 3 or not len(harmful) or not len(harmless):
            raise ShapeError(f"need non-empty [n, n_layers, d] activations for both classes; got {tuple(harmful.shape)} and {tuple(harmless.shape)}")
        return cls(mean_harmful=harmful.double().mean(0).float(), mean_harmless=harmless.double().mean(0).float(), layers=tuple(layers), position=position)

    def score_activations(self, acts: torch.Tensor) -> torch.Tensor:
        """Scores ``[n]`` for activations ``[n, n_layers, d]`` at this guard's layers."""
        if acts.dim() != 3 or acts.shape[1:] != self.mean_harmful.shape:
            raise ShapeError(f"activations must be [n, {len(self.layers)} layers, {self.mean_harmful.shape[1]}]; got {tuple(acts.shape)}")
        cos = torch.nn.functional.cosine_similarity
        h = acts.double()
        diff = cos(h, self.mean_harmful.double()[None], dim=-1) - cos(h, self.mean_harmless.double()[None], dim=-1)
        return diff.mean(1).float()

    def score(self, prompts: Sequence[str], *, batch_size: int = 16, progress: bool = False) -> torch.Tensor:
        """Harmfulness score ``[n]`` of each prompt (higher = more harmful)."""
        acts = collect(self._bound(), _check_prompts(prompts), sites=["resid_pre"], layers=list(self.layers), positions=[self.position], batch_size=batch_size, progress=progress)
        return self.score_activations(acts.get("resid_pre", self.position)[:, :, -1])

    def save(self, path: str | Path) -> Path:
        """Write a ``.safetensors`` file (class means + threshold and metadata), atomically and with a checksum."""
        meta = {"format": LATENT_FORMAT, "layers": json.dumps(list(self.layers)), "threshold": repr(float(self.threshold)),
                "position": json.dumps(self.position), "site": self.site, "model": self.model_name}  # fmt: skip
        record = {} if self.trained_on is None else {"trained_on": self.trained_on.hashes}
        return _valuefiles.write(path, {"mean_harmful": self.mean_harmful, "mean_harmless": self.mean_harmless, **record}, meta)

    @classmethod
    def load(cls, path: str | Path, *, model: Model | None = None) -> LatentGuard:
        """Read a file written by :meth:`save`; ``model`` binds it for scoring. Bad files raise ``ValueFileError``."""
        keys = ("layers", "threshold", "position", "model")
        tensors, meta = _valuefiles.read(path, fmt=LATENT_FORMAT, tensors=["mean_harmful", "mean_harmless"], keys=keys, optional=["trained_on"])
        with _valuefiles.parsing(path, "LatentGuard"):
            return cls(
                mean_harmful=tensors["mean_harmful"],
                mean_harmless=tensors["mean_harmless"],
                layers=json.loads(meta["layers"]),
                threshold=float(meta["threshold"]),
                position=json.loads(meta["position"]),
                site=meta.get("site", "resid_pre"),  # files from before the site was saved: resid_pre
                model_name=meta["model"],
                model=model,
                trained_on=Fingerprints(tensors["trained_on"]) if "trained_on" in tensors else None,
            )


@dataclass(frozen=True)
class ProbeGuard(_Guard):
    """A logistic probe as a guard: flag when ``P(harmful) >= threshold``. A probe over several layers reads them as
    one classifier, ``P(harmful) = sigmoid(mean of the layers' logits)``."""

    probe: Probe
    threshold: float = 0.5
    model: Model | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.probe, Probe):
            raise InvalidValueError(f"a ProbeGuard wraps a Probe (fit_probes(...)); got {type(self.probe).__name__}")
        object.__setattr__(self, "threshold", finite_number(self.threshold, "the guard's threshold"))
        if self.probe.position == "all":
            raise ShapeError(f"a guard reads one position per prompt; this probe reads {self.probe.position!r} (use 't_inst' or 'last')")

    @classmethod
    def fit(
        cls,
        model: Model,
        harmful: Sequence[str],
        harmless: Sequence[str],
        *,
        layer: int | Sequence[int] | None = None,
        position: Position = "t_inst",
        C: float = 1.0,
        batch_size: int = 16,
        progress: bool = False,
    ) -> ProbeGuard:
        """Fit probes at every layer and keep ``layer`` (several layers: a probe per layer, read as one; default: the
        best single layer by 5-fold CV accuracy)."""
        from steerlab.probes.sweep import sweep

        harmful, harmless = _check_prompts(harmful), _check_prompts(harmless)
        acts = collect(model, harmful + harmless, sites=["resid_pre"], positions=[position], batch_size=batch_size, progress=progress)
        x = acts.get("resid_pre", position)[:, :, -1]
        y = torch.tensor([1] * len(harmful) + [0] * len(harmless))
        if layer is None:
            result = sweep(x[:, :, None], y, layers=acts.layers, n_folds=min(5, len(harmful), len(harmless)), C=C)
            layer = result.best("accuracy")[0]
        layers = model.layer_indices(list(layer) if isinstance(layer, Sequence) else [layer])  # numpy ints too
        idx = [acts.layers.index(la) for la in layers]
        probe = fit_probes(x[:, idx], y, layers=layers, C=C, position=position, labels=("harmless", "harmful"), model=model.name)
        return cls(probe=replace(probe, trained_on=Fingerprints.of(harmful, harmless)), model=model)

    @property
    def trained_on(self) -> Fingerprints | None:  # type: ignore[override]
        """The fingerprints of the prompts the probe was fitted and calibrated on (``None``: not recorded)."""
        return self.probe.trained_on

    def _recorded(self, record: Fingerprints | None) -> ProbeGuard:
        return replace(self, probe=replace(self.probe, trained_on=record))

    def score_activations(self, acts: torch.Tensor) -> torch.Tensor:
        """``P(harmful)`` ``[n]`` from activations ``[n, n_layers, d]`` at the probe's layers and position (``[n, d]``
        for a one-layer probe)."""
        return self.probe.ensemble_proba(acts)

    def score(self, prompts: Sequence[str], *, batch_size: int = 16, progress: bool = False) -> torch.Tensor:
        """``P(harmful)`` ``[n]`` of each prompt."""
        p = self.probe
        acts = collect(self._bound(), _check_prompts(prompts), sites=[p.site], layers=list(p.layers), positions=[p.position], batch_size=batch_size, progress=progress)
        return p.ensemble_proba(acts.get(p.site, p.position)[:, :, -1])

    def save(self, path: str | Path) -> Path:
        """Write the probe with the threshold in its metadata."""
        info = {**self.probe.info, "guard_threshold": float(self.threshold)}
        return replace(self.probe, info=info).save(path)

    @classmethod
    def load(cls, path: str | Path, *, model: Model | None = None, threshold: float | None = None) -> ProbeGuard:
        """Read a file written by :meth:`save` (or a probe from ``steerlab probe``, which carries a calibrated
        threshold); ``model`` binds it for scoring; ``threshold`` overrides the saved one. A probe saved without a
        calibrated threshold needs ``threshold=``: flagging at an uncalibrated 0.5 is not a guard."""
        probe = Probe.load(path)
        if threshold is None and "guard_threshold" not in probe.info:
            raise UncalibratedGuardError(
                f"{path} holds a probe without a calibrated threshold; pass threshold=... (CLI: --threshold), or "
                "refit it with `steerlab probe` / ProbeGuard.calibrate(...).save(...), which store one"
            )
        with _valuefiles.parsing(path, "ProbeGuard"):
            return cls(probe=probe, threshold=probe.info["guard_threshold"] if threshold is None else threshold, model=model)
