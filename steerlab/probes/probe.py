"""``Probe``: fitted per-layer logistic probes (a value), and ``fit_probes`` that fits all layers at once.

A probe maps an activation ``h`` at one layer to ``P(positive) = sigmoid(h . w + b)``. Weights
live in raw residual coordinates (any standardisation used in fitting is folded in), so a probe
can be applied to activations straight from :func:`steerlab.collect` or inside a hook, and its
weight vector exported as a steering :class:`~steerlab.steering.Direction`.

Example:
    >>> import steerlab
    >>> from steerlab.data import DEMO_HARMFUL, DEMO_HARMLESS
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> acts = steerlab.collect(model, DEMO_HARMFUL + DEMO_HARMLESS, positions=["last"])
    >>> x, labels = acts.get("resid_pre", "last")[:, :, -1], [1] * 12 + [0] * 12
    >>> probe = fit_probes(x, labels, layers=acts.layers, position="last", model=model)
    >>> probe.layers, probe.score(x, labels).shape         # accuracy per layer
    ((0, 1, 2), torch.Size([3]))
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from steerlab import _valuefiles
from steerlab._checks import check_finite, layer_index, layer_tuple
from steerlab.chat import Position
from steerlab.data.fingerprints import Fingerprints
from steerlab.errors import EmptyInputError, InvalidValueError, LayerIndexError, ShapeError, ZeroVectorError
from steerlab.probes.fast import fit_standardized
from steerlab.probes.metrics import roc_auc
from steerlab.steering.direction import Direction, check_position, model_provenance

FORMAT = "steerlab.Probe/1"


@dataclass(frozen=True)
class Probe:
    """One logistic probe per layer: ``weights[i]``/``bias[i]`` belong to ``layers[i]``."""

    weights: torch.Tensor  # [n_layers, d] float32, raw residual coordinates
    bias: torch.Tensor  # [n_layers]
    layers: tuple[int, ...]
    site: str = "resid_pre"
    position: Position = "last"
    labels: tuple[str, str] = ("negative", "positive")
    model: str = ""
    info: dict = field(default_factory=dict, compare=False)
    trained_on: Fingerprints | None = field(default=None, compare=False, repr=False)  # the prompts it was fitted on

    def __post_init__(self) -> None:
        layers = layer_tuple(self.layers, "layers")
        if not layers:
            raise EmptyInputError("a Probe needs at least one layer; pass layers=(...) with one per weight row")
        weights, bias = torch.as_tensor(self.weights), torch.as_tensor(self.bias)
        if weights.dim() != 2 or weights.shape[0] != len(layers) or bias.shape != (len(layers),):
            raise ShapeError(
                f"weights must be [n_layers, d] and bias [n_layers] for layers {list(layers)}; "
                f"got {tuple(weights.shape)} and {tuple(bias.shape)}"
            )
        weights = weights.detach().to(torch.float32).cpu()
        bias = bias.detach().to(torch.float32).cpu()
        fix = "fit the probe again on finite activations"
        check_finite(weights, "the probe's weights", fix)
        check_finite(bias, "the probe's bias", fix)
        labels = tuple(self.labels) if not isinstance(self.labels, str) else (self.labels,)
        if len(labels) != 2 or not all(isinstance(label, str) for label in labels):
            raise InvalidValueError(f"labels must be two names (negative, positive); got {self.labels!r}")
        if not isinstance(self.site, str) or not isinstance(self.info, dict):
            raise InvalidValueError(f"site must be a str and info a dict; got {type(self.site).__name__} and {type(self.info).__name__}")
        if self.trained_on is not None and not isinstance(self.trained_on, Fingerprints):
            raise InvalidValueError(f"trained_on must be Fingerprints.of(prompts) or None; got {type(self.trained_on).__name__}")
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "bias", bias)
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "position", check_position(self.position))
        object.__setattr__(self, "model", model_provenance(self.model, int(weights.shape[1]))[0])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Probe):
            return NotImplemented
        same_meta = (self.layers, self.site, self.position, self.labels, self.model) == (other.layers, other.site, other.position, other.labels, other.model)
        return same_meta and torch.equal(self.weights, other.weights) and torch.equal(self.bias, other.bias)

    __hash__ = None  # mutable tensors inside: not hashable

    @property
    def width(self) -> int:
        """Residual width ``d``."""
        return int(self.weights.shape[1])

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and len(self.layers) == 1:
            x = x[:, None]
        if x.dim() != 3 or x.shape[1:] != (len(self.layers), self.width):
            raise ShapeError(
                f"activations must be [n, {len(self.layers)} layers, {self.width}] for this probe "
                f"(layers {list(self.layers)}); got {tuple(x.shape)}. Use probe.select(layer) for one layer."
            )
        return x

    def decision_function(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, n_layers]`` for activations ``[n, n_layers, d]``."""
        x = self._check(x)
        return torch.einsum("nld,ld->nl", x.to(torch.float64), self.weights.double()).float() + self.bias

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """``P(positive)`` per sample and layer, ``[n, n_layers]``."""
        return torch.sigmoid(self.decision_function(x))

    def ensemble_proba(self, x: torch.Tensor) -> torch.Tensor:
        """``P(positive)`` ``[n]`` from the mean of the layers' logits: the probe's layers read as one classifier
        (what a :class:`~steerlab.probes.ProbeGuard` over several layers scores). One layer: ``predict_proba``.

        Example:
            >>> probe = Probe(weights=torch.eye(2), bias=torch.zeros(2), layers=(3, 5))
            >>> probe.ensemble_proba(torch.tensor([[[2.0, 0.0], [0.0, -1.0]]])).tolist()  # sigmoid((2 - 1) / 2)
            [0.622459352016449]
        """
        return torch.sigmoid(self.decision_function(x).double().mean(1)).float()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """0/1 predictions per sample and layer."""
        return (self.decision_function(x) > 0).long()

    def score(self, x: torch.Tensor, y: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Accuracy per layer, ``[n_layers]``."""
        y = torch.as_tensor(y).long()
        return (self.predict(x) == y[:, None]).float().mean(0)

    def auc(self, x: torch.Tensor, y: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """ROC AUC per layer, ``[n_layers]``."""
        logits = self.decision_function(x)
        return torch.tensor([roc_auc(logits[:, j], y) for j in range(logits.shape[1])])

    def best_layer(self, x: torch.Tensor, y: Sequence[int] | torch.Tensor, *, metric: str = "accuracy") -> int:
        """The layer with the highest held-out ``metric`` ("accuracy" or "auc"); ties go to the earlier layer."""
        if metric not in ("accuracy", "auc"):
            raise InvalidValueError(f"metric must be 'accuracy' or 'auc'; got {metric!r}")
        values = self.score(x, y) if metric == "accuracy" else self.auc(x, y)
        return self.layers[int(torch.argmax(values))]

    def select(self, layers: int | Sequence[int]) -> Probe:
        """The probe restricted to some of its layers."""
        items = layer_tuple(layers)
        missing = [la for la in items if la not in self.layers]
        if missing:
            raise LayerIndexError(f"this probe has no layer(s) {missing}; it covers layers {list(self.layers)}")
        idx = [self.layers.index(la) for la in items]
        return replace(self, weights=self.weights[idx], bias=self.bias[idx], layers=items)

    def one_layer(self, layer: int | None, *, width: int) -> Probe:
        """This probe at ``layer`` (default: its only layer), checked against a model's residual ``width``."""
        if layer is None:
            if len(self.layers) != 1:
                raise ShapeError(f"the probe covers layers {list(self.layers)}: pick one with layer=...")
            layer = self.layers[0]
        one = self.select(layer_index(layer))
        if one.width != width:
            raise ShapeError(f"the probe has width {one.width} but the model's residual stream is {width} wide")
        return one

    def to_direction(self, *, layer: int | Sequence[int] | None = None) -> Direction:
        """The weight vectors as a steering Direction (unit norm per layer, pointing to ``positive``).

        ``layer`` picks one or some of the probe's layers (default: all of them). The site, position and model
        are the probe's own, recorded when it was fitted; :meth:`LinearProbe.to_direction
        <steerlab.probes.linear.LinearProbe.to_direction>` takes the same ``layer=`` and is told the rest,
        because a scikit-learn estimator does not know where its features came from.

        Example:
            >>> import torch
            >>> _ = torch.manual_seed(0); x = torch.randn(64, 2, 8); y = (x[:, 1, 0] > 0).long()
            >>> d = fit_probes(x, y, layers=[3, 7], position="last").to_direction(layer=7)
            >>> d.layers, d.position, round(float(d.at(7).norm()), 4)
            ((7,), 'last', 1.0)
        """
        probe = self if layer is None else self.select(layer)
        norms = probe.weights.norm(dim=-1, keepdim=True)
        zero = [la for la, n in zip(probe.layers, norms[:, 0].tolist()) if n == 0]
        if zero:
            raise ZeroVectorError(
                f"the probe's weights at layer(s) {zero} are zero (it learned nothing there), so they give no "
                "direction; pick other layers with to_direction(layer=...)"
            )
        return Direction(vectors=probe.weights / norms, layers=probe.layers, site=probe.site, position=probe.position,
                         method="probe", model=probe.model, info=dict(probe.info))  # fmt: skip

    def save(self, path: str | Path) -> Path:
        """Write a ``.safetensors`` file (weights, bias, metadata), atomically and with a checksum."""
        meta = {
            "format": FORMAT,
            "layers": json.dumps(list(self.layers)),
            "site": self.site,
            "position": json.dumps(self.position),
            "labels": json.dumps(list(self.labels)),
            "model": self.model,
            "info": json.dumps(self.info),
        }
        record = {} if self.trained_on is None else {"trained_on": self.trained_on.hashes}
        return _valuefiles.write(path, {"weights": self.weights, "bias": self.bias, **record}, meta)

    @classmethod
    def load(cls, path: str | Path) -> Probe:
        """Read a file written by :meth:`save`; a missing, damaged or foreign file raises ``ValueFileError``."""
        keys = ("layers", "site", "position", "labels", "model", "info")
        tensors, meta = _valuefiles.read(path, fmt=FORMAT, tensors=["weights", "bias"], keys=keys, optional=["trained_on"])
        with _valuefiles.parsing(path, "Probe"):
            return cls(
                weights=tensors["weights"],
                bias=tensors["bias"],
                layers=json.loads(meta["layers"]),
                site=meta["site"],
                position=json.loads(meta["position"]),
                labels=json.loads(meta["labels"]),
                model=meta["model"],
                info=json.loads(meta["info"]),
                trained_on=Fingerprints(tensors["trained_on"]) if "trained_on" in tensors else None,
            )


def example_weights(y: torch.Tensor, *, balanced: bool, sample_weight: Sequence[float] | torch.Tensor | None) -> torch.Tensor | None:
    """The weight of each example in a probe fit (mean 1), or ``None`` for equal weights: ``sample_weight``
    (normalised), times class weights that give both classes the same total when ``balanced``.

    Example:
        >>> example_weights(torch.tensor([1, 0, 0, 0]), balanced=True, sample_weight=None).tolist()
        [2.0, 0.6666666666666666, 0.6666666666666666, 0.6666666666666666]
    """
    y = torch.as_tensor(y).long()
    weight = None
    if sample_weight is not None:
        weight = torch.as_tensor(sample_weight, dtype=torch.float64)
        if weight.shape != (len(y),):
            raise ShapeError(f"sample_weight must hold one weight per example ({len(y)}); got shape {tuple(weight.shape)}")
        if not bool(torch.isfinite(weight).all()) or bool((weight <= 0).any()):
            raise InvalidValueError("sample_weight must be finite and positive; drop an example instead of weighting it 0")
        weight = weight * (len(y) / float(weight.sum()))
    if balanced:
        base = weight if weight is not None else torch.ones(len(y), dtype=torch.float64)
        totals = torch.zeros(2, dtype=torch.float64).index_add_(0, y, base)
        weight = base * (float(base.sum()) / (2.0 * totals))[y]
    return weight


def fit_probes(
    x: torch.Tensor,
    y: Sequence[int] | torch.Tensor,
    *,
    layers: Sequence[int],
    C: float = 1.0,
    standardize: bool = True,
    balanced: bool = False,
    sample_weight: Sequence[float] | torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    site: str = "resid_pre",
    position: Position = "last",
    labels: tuple[str, str] = ("negative", "positive"),
    model: str = "",
) -> Probe:
    """Fit one L2 logistic probe per layer in one batched Newton solve.

    ``x`` is ``[n, n_layers, d]`` (e.g. ``acts.get("resid_pre", "last")[:, :, -1]``), ``y`` 0/1.
    ``balanced=True`` weights classes inversely to their frequency (as scikit-learn's
    ``class_weight="balanced"``); ``sample_weight`` (one positive weight per example, e.g. from
    :func:`steerlab.probes.metrics.source_weights`) multiplies into it. ``dtype`` is the solver's precision: float32 (default) stops at
    scikit-learn's tolerance; float64 solves to 1e-12.

    Example:
        >>> import torch
        >>> x = torch.randn(64, 2, 8); y = (x[:, 1, 0] > 0).long()
        >>> probe = fit_probes(x, y, layers=[3, 7])
        >>> float(probe.score(x, y)[1]) > 0.9
        True
    """
    y = torch.as_tensor(y).long()
    layers = layer_tuple(layers)
    if x.dim() != 3 or x.shape[1] != len(layers):
        raise ShapeError(f"x must be [n, {len(layers)} layers, d]; got {tuple(x.shape)}")
    check_finite(x, "the activations", "collect them again (a model in float16 can overflow: use float32)")
    if len(y) != x.shape[0]:
        raise ShapeError(f"{x.shape[0]} activations but {len(y)} labels")
    counts = torch.bincount(y, minlength=2)
    if len(counts) > 2 or int(counts.min()) == 0:
        raise EmptyInputError(f"need examples of both classes 0 and 1; got counts {counts.tolist()}")
    weight = example_weights(y, balanced=balanced, sample_weight=sample_weight)
    w, b = fit_standardized(x.transpose(0, 1), y, C=C, sample_weight=weight, standardize=standardize, dtype=dtype)
    return Probe(
        weights=w,
        bias=b,
        layers=layers,
        site=site,
        position=position,
        labels=labels,
        model=model,
        info={"C": C, "standardize": standardize, "balanced": balanced, "weighted": sample_weight is not None, "n_train": len(y), "n_positive": int(counts[1])},
    )
