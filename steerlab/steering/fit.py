"""Fitters: accumulate statistics (float64) and return a frozen :class:`Direction`.

``MeanDifference`` streams: call ``update`` batch by batch, then ``result``. ``mean_difference``,
``pca_direction`` and ``probe_direction`` are the one-call forms over collected activations.

Each fitter records where the direction comes from: ``model=`` (a steerlab Model, whose name and
depth are kept, or just a name), ``site=`` and ``position=``. Pass the two :class:`~steerlab.Activations`
themselves and the layers, site and position are read from them (one site and one single-token
position collected); pass tensors ``[n, n_layers, d]`` and say ``layers=`` (and ``site=`` /
``position=``, default ``"resid_pre"`` / ``"last"``).

Example:
    >>> import torch
    >>> fit = MeanDifference(layers=(0, 1))
    >>> fit.update(torch.ones(3, 2, 4), positive=True); fit.update(torch.zeros(5, 2, 4), positive=False)
    >>> fit.result().at(1).tolist()
    [1.0, 1.0, 1.0, 1.0]
    >>> import steerlab
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> pos = steerlab.collect(model, ["Write a poem.", "Tell a joke."], layers=[2], positions=[-2])
    >>> neg = steerlab.collect(model, ["Hi.", "Hello there."], layers=[2], positions=[-2])
    >>> d = mean_difference(pos, neg, model=model)
    >>> d.layers, d.position, d.info["n_layers"]
    ((2,), -2, 3)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from steerlab._checks import check_finite, layer_tuple
from steerlab.errors import EmptyInputError, InvalidValueError, ShapeError, UnknownPositionError
from steerlab.hooks import check_site
from steerlab.steering.direction import Direction, check_position, model_provenance

if TYPE_CHECKING:
    from steerlab.activations import Activations
    from steerlab.model import Model


def prompts_hash(*prompt_sets: Sequence[str]) -> str:
    """Short stable hash of the prompt sets a direction was fitted on."""
    digest = hashlib.sha256()
    for prompts in prompt_sets:
        for p in prompts:
            digest.update(p.encode() + b"\0")
        digest.update(b"\1")
    return digest.hexdigest()[:16]


def _only(values: Sequence, what: str, option: str) -> object:
    if len(values) != 1:
        raise InvalidValueError(f"the activations hold {what} {list(values)}; pick one with {option}=...")
    return values[0]


def _from_activations(acts: Activations, site: str | None, position: str | int | None) -> tuple[torch.Tensor, str, str | int]:
    """The ``[n, n_layers, d]`` tensor of one site and single-token position of collected activations."""
    site = _only(acts.sites, "sites", "site") if site is None else site
    position = _only(acts.positions, "positions", "position") if position is None else position
    if position == "all":
        raise UnknownPositionError(
            "position 'all' has a different number of tokens per prompt; collect a single-token position "
            "such as 'last', 't_inst' or -2"
        )
    x = acts.get(site, position)
    if x.dim() != 4 or x.shape[2] != 1:
        raise ShapeError(
            f"{site}/{position!r} holds {tuple(x.shape)} activations, not one [d] vector per prompt and layer; pass "
            f"acts.get({site!r}, {position!r})[:, :, i] (with layers=..., position=...) to pick a token, or collect a "
            "single-token position such as -2"
        )
    return x[:, :, 0], site, position


def _inputs(
    positive: torch.Tensor | Activations, negative: torch.Tensor | Activations, layers: Sequence[int] | None, site: str | None, position: str | int | None
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], str, str | int]:
    """Tensors, layers, site and position from two tensors (with ``layers=``) or two collected Activations."""
    n_acts = sum(not isinstance(x, torch.Tensor) for x in (positive, negative))
    if n_acts == 0:
        if layers is None:
            raise InvalidValueError("tensors carry no layers: pass layers=[...] (one per activation layer), or pass the Activations")
        site = "resid_pre" if site is None else site
        position = "last" if position is None else position
    elif n_acts == 2:
        if list(positive.layers) != list(negative.layers):
            raise ShapeError(f"the two sets were collected at different layers ({positive.layers} vs {negative.layers})")
        if layers is not None and list(layer_tuple(layers)) != list(positive.layers):
            raise ShapeError(f"layers={list(layers)} but the activations hold layers {positive.layers}; drop layers=...")
        layers = positive.layers
        (positive, site_p, pos_p), (negative, _, _) = (_from_activations(a, site, position) for a in (positive, negative))
        site, position = site_p, pos_p
    else:
        raise InvalidValueError("pass two tensors or two Activations (from steerlab.collect), not one of each")
    layers = layer_tuple(layers)
    for name, x in (("positive", positive), ("negative", negative)):
        if x.dim() != 3 or x.shape[1] != len(layers):
            raise ShapeError(f"{name} activations must be [n, {len(layers)} layers, d]; got {tuple(x.shape)}")
        check_finite(x, f"the {name} activations", "collect them again (a model in float16 can overflow: use float32)")
    return positive, negative, layers, check_site(site), check_position(position)


@dataclass
class MeanDifference:
    """Streaming mean(positive) - mean(negative) per layer, summed in float64.

    ``model`` is a steerlab Model (its name and depth are recorded) or a name.
    """

    layers: tuple[int, ...]
    site: str = "resid_pre"
    position: str | int = "last"
    model: str | Model = ""
    data_hash: str = ""
    _sums: dict[bool, torch.Tensor] = field(default_factory=dict, repr=False)
    _counts: dict[bool, int] = field(default_factory=lambda: {True: 0, False: 0}, repr=False)
    _n_layers: int | None = field(default=None, repr=False)
    _width: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.layers = layer_tuple(self.layers)
        self.site, self.position = check_site(self.site), check_position(self.position)
        if not isinstance(self.model, str) and hasattr(self.model, "d_model"):
            self._width = int(self.model.d_model)
        self.model, depth = model_provenance(self.model)
        if depth is not None:
            self._n_layers = depth

    def update(self, acts: torch.Tensor, *, positive: bool) -> None:
        """Add a batch of activations ``[n, n_layers, d]`` to one class."""
        if acts.dim() != 3 or acts.shape[1] != len(self.layers):
            raise ShapeError(f"expected [n, {len(self.layers)} layers, d] activations, got {tuple(acts.shape)}")
        if self._width is not None and acts.shape[2] != self._width:
            raise ShapeError(f"activations have width {acts.shape[2]} but {self.model} has d_model={self._width}")
        check_finite(acts, "the activations", "collect them again (a model in float16 can overflow: use float32)")
        total = acts.double().sum(0)
        self._sums[positive] = self._sums[positive] + total if positive in self._sums else total
        self._counts[positive] += int(acts.shape[0])

    def result(self) -> Direction:
        """The fitted direction (unnormalised difference of class means)."""
        if not self._counts[True] or not self._counts[False]:
            raise EmptyInputError(f"both classes need examples; got {self._counts[True]} positive, {self._counts[False]} negative")
        diff = self._sums[True] / self._counts[True] - self._sums[False] / self._counts[False]
        info = {"n_positive": self._counts[True], "n_negative": self._counts[False]}
        if self._n_layers is not None:
            info["n_layers"] = self._n_layers
        return Direction(
            vectors=diff.float(),
            layers=self.layers,
            site=self.site,
            position=self.position,
            method="mean_diff",
            model=self.model,
            data_hash=self.data_hash,
            info=info,
        )


def mean_difference(
    positive: torch.Tensor | Activations,
    negative: torch.Tensor | Activations,
    *,
    layers: Sequence[int] | None = None,
    site: str | None = None,
    position: str | int | None = None,
    model: str | Model = "",
    data_hash: str = "",
) -> Direction:
    """Direction = mean(positive) - mean(negative): two tensors ``[n, n_layers, d]`` or two Activations."""
    positive, negative, layers, site, position = _inputs(positive, negative, layers, site, position)
    fit = MeanDifference(layers=layers, site=site, position=position, model=model, data_hash=data_hash)
    fit.update(positive, positive=True)
    fit.update(negative, positive=False)
    return fit.result()


def _direction(vectors: torch.Tensor, layers, site, position, model, data_hash, method: str, info: dict) -> Direction:
    name, depth = model_provenance(model, int(vectors.shape[1]))
    info = info if depth is None else {**info, "n_layers": depth}
    return Direction(vectors=vectors.float(), layers=layers, site=site, position=position, method=method, model=name,
                     data_hash=data_hash, info=info)  # fmt: skip


def pca_direction(
    positive: torch.Tensor | Activations,
    negative: torch.Tensor | Activations,
    *,
    layers: Sequence[int] | None = None,
    site: str | None = None,
    position: str | int | None = None,
    model: str | Model = "",
    data_hash: str = "",
) -> Direction:
    """Top principal axis of the paired differences ``positive[i] - negative[i]`` per layer.

    The differences are not centred (centring would remove the shared shift we are after), so
    this is the top right-singular vector of the difference matrix; its sign is chosen to point
    along the mean difference. Unit norm.
    """
    positive, negative, layers, site, position = _inputs(positive, negative, layers, site, position)
    if positive.shape != negative.shape:
        raise ShapeError(f"paired sets must have the same shape; got {tuple(positive.shape)} and {tuple(negative.shape)}")
    diffs = (positive - negative).double()  # [n, L, d]
    if diffs.shape[0] < 2:
        raise EmptyInputError("PCA needs at least two pairs")
    vectors = []
    for j in range(diffs.shape[1]):
        _, _, vh = torch.linalg.svd(diffs[:, j], full_matrices=False)
        pc = vh[0]
        vectors.append(pc if float(pc @ diffs[:, j].mean(0)) >= 0 else -pc)
    return _direction(torch.stack(vectors), layers, site, position, model, data_hash, "pca", {"n_pairs": int(diffs.shape[0])})


def probe_direction(
    positive: torch.Tensor | Activations,
    negative: torch.Tensor | Activations,
    *,
    layers: Sequence[int] | None = None,
    C: float = 1.0,
    site: str | None = None,
    position: str | int | None = None,
    model: str | Model = "",
    data_hash: str = "",
) -> Direction:
    """Unit weight vector of an L2-regularised logistic regression per layer (positive = class 1).

    Features are standardised for the fit and the weights mapped back to residual coordinates.
    """
    from sklearn.linear_model import LogisticRegression

    positive, negative, layers, site, position = _inputs(positive, negative, layers, site, position)
    x = torch.cat([positive, negative]).double()  # [n, L, d]
    y = [1] * len(positive) + [0] * len(negative)
    vectors = []
    for j in range(x.shape[1]):
        feats = x[:, j]
        mean, std = feats.mean(0), feats.std(0).clamp(min=1e-8)
        clf = LogisticRegression(C=C, max_iter=2000).fit(((feats - mean) / std).numpy(), y)
        w = torch.from_numpy(clf.coef_[0]) / std
        vectors.append(w / w.norm())
    return _direction(torch.stack(vectors), layers, site, position, model, data_hash, "probe", {})
