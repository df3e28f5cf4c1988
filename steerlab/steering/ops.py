"""Steer ops: frozen values that resolve to a :class:`~steerlab.plan.Plan` (``with model.apply(op): ...``)
and, where exact, to a weight edit (``training.bake``).

* :class:`AddVector` — ``x <- x + coeff * v`` on ``resid_pre`` of chosen layers.
* :class:`Ablate` — ``x <- x - (r̂·x) r̂`` at every layer's input and every attention and MLP output
  (METHODS 1, directional ablation), prompt and generated tokens alike.
* :class:`Clamp` — ``x <- x + (value - r̂·x) r̂`` on ``resid_pre`` of chosen layers.

``tokens`` is ``"all"`` (default), ``"prompt"`` or ``"generated"``; the last two need the prompt
length, which :meth:`Model.generate` records. Options are checked when the op is built: finite
numbers, integer layers (numpy and torch integers too), non-zero vectors, a known ``tokens``.

Provenance: applying a direction fitted on another model (name or depth) or at another site warns
(:class:`~steerlab.errors.ProvenanceWarning`); ``strict=True`` makes that a
:class:`~steerlab.errors.ProvenanceError`. A direction of another width is always an error.

Example:
    >>> from steerlab.testing import tiny_model, tiny_direction
    >>> model = tiny_model("llama")
    >>> direction = tiny_direction(model, layer=1)
    >>> with model.apply(AddVector(direction, coeff=4.0, layers=[1])):
    ...     texts = model.generate(["Write a poem."], max_new_tokens=4)
    >>> len(texts)
    1
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from typing import TYPE_CHECKING

import torch

from steerlab._checks import finite_number, layer_index, layer_tuple
from steerlab.errors import (
    InvalidValueError,
    NotBakeableError,
    ProvenanceError,
    ProvenanceWarning,
    ShapeError,
    ZeroVectorError,
)
from steerlab.plan import (
    RESIDUAL_SITES,
    Add,
    AddToResidual,
    MapWriters,
    Plan,
    Project,
    RankOne,
    Step,
    Tokens,
    WeightEdit,
    check_tokens,
)
from steerlab.steering.direction import Direction

if TYPE_CHECKING:
    from steerlab.model import Model

RUNTIME_ONLY = "Apply it at runtime instead: `with model.apply(iv): ...`"


def require_all_tokens(iv: object, what: str) -> None:
    """Raise :class:`NotBakeableError` unless ``iv`` acts on every token (weights act on every token)."""
    tokens = getattr(iv, "tokens", "all")
    if tokens != "all":
        raise NotBakeableError(
            f"{what} with tokens={tokens!r} acts on some tokens only, and weights act on every token; "
            f"only tokens='all' can be baked. {RUNTIME_ONLY}"
        )


def check_direction(direction: object, op: str) -> Direction:
    """``direction`` if it is a :class:`Direction`, else a clear error."""
    if not isinstance(direction, Direction):
        raise InvalidValueError(
            f"{op} takes a Direction, got {type(direction).__name__}; wrap a raw vector v as "
            "Direction(vectors=v[None], layers=(layer,))"
        )
    return direction


def _check_width(direction: Direction, model: Model) -> None:
    if direction.width != model.d_model:
        raise ShapeError(
            f"direction has width {direction.width} but {model.name} has d_model={model.d_model}; "
            "fit the direction on this model (or one of the same width)"
        )


def check_provenance(direction: Direction, model: Model, *, sites: Sequence[str], op: str, strict: bool) -> None:
    """Warn (``strict``: raise) when ``direction`` was fitted on another model or at a site outside ``sites``.

    Unknown provenance (no model name, no recorded depth) is not a mismatch.
    """
    if not isinstance(strict, bool):
        raise InvalidValueError(f"{op}: strict must be True or False, got {strict!r}")
    problems = []
    if direction.model and model.name and direction.model != model.name:
        problems.append(f"it was fitted on {direction.model!r} and is applied to {model.name!r}")
    depth = direction.model_n_layers
    if depth is not None and depth != model.n_layers:
        problems.append(f"it was fitted on a model with {depth} layers and this one has {model.n_layers}")
    if direction.site not in sites:
        problems.append(f"it was fitted at {direction.site!r} and {op} acts on {' / '.join(sites)}")
    if not problems:
        return
    message = f"{op}: the direction does not match where it is applied: {'; '.join(problems)}. "
    if strict:
        raise ProvenanceError(message + "Fit it on this model at that site, or drop strict=True to apply it anyway")
    warnings.warn(message + "Fit it on this model at that site (strict=True makes this an error)", ProvenanceWarning, stacklevel=3)


def _optional_layers(layers: object, what: str = "layers") -> tuple[int, ...] | None:
    return None if layers is None else layer_tuple(layers, what)


def _optional_layer(layer: object, what: str = "source_layer") -> int | None:
    return None if layer is None else layer_index(layer, what)


def _layer_of(direction: Direction, layer: int, source_layer: int | None) -> int:
    """The direction layer whose vector is used at model ``layer``."""
    if source_layer is not None:
        return source_layer
    if layer in direction.layers or len(direction.layers) != 1:
        return layer
    return direction.layers[0]


def _known_rows(direction: Direction, layers: tuple[int, ...] | None, source_layer: int | None) -> list[int]:
    """The direction layers an op will surely use, as far as is known without the model."""
    if source_layer is not None:
        return [source_layer]
    if len(direction.layers) == 1:
        return list(direction.layers)
    if layers is None:
        return list(direction.layers)
    return [la for la in layers if la in direction.layers]


def check_nonzero(direction: Direction, rows: Sequence[int], op: str, why: str) -> None:
    """Raise :class:`ZeroVectorError` when the direction's vector is zero at any of ``rows`` (direction layers)."""
    zero = [la for la in dict.fromkeys(rows) if float(direction.at(la).norm()) == 0.0]
    if zero:
        raise ZeroVectorError(
            f"{op}: the direction's vector at layer(s) {zero} is zero, so {why}; leave those layers out "
            "(layers=[...], source_layer=..., or direction.select([...])) or refit the direction "
            "(its two classes had the same mean there)"
        )


def _resid_pre_rows(op: AddVector | Clamp, model: Model, layers, why: str) -> tuple[list[int], list[int]]:
    """For a ``resid_pre`` op: the model layers it hooks and, for each, the direction layer whose vector it
    uses, after the width, provenance and non-zero checks (no layers: ``([], [])``, and ``model.apply``
    reports that the op placed no hook)."""
    name = type(op).__name__
    _check_width(op.direction, model)
    check_provenance(op.direction, model, sites=("resid_pre",), op=name, strict=op.strict)
    hooked = model.layer_indices(list(layers))
    rows = [_layer_of(op.direction, la, op.source_layer) for la in hooked]
    check_nonzero(op.direction, rows, name, why)
    return hooked, rows


@dataclass(frozen=True)
class AddVector:
    """Add ``coeff`` times a direction vector at ``layers`` (default: the direction's own layers).

    Each layer uses its own vector, or ``source_layer``'s, or the only vector of a one-layer direction.
    A zero vector there is an error (adding it would do nothing).
    """

    direction: Direction
    coeff: float = 1.0
    layers: Sequence[int] | None = None
    source_layer: int | None = None
    tokens: Tokens = "all"
    unit: bool = False
    _: KW_ONLY
    strict: bool = False

    def __post_init__(self) -> None:
        op = type(self).__name__
        check_direction(self.direction, op)
        object.__setattr__(self, "coeff", finite_number(self.coeff, f"{op} coeff"))
        object.__setattr__(self, "layers", _optional_layers(self.layers))
        object.__setattr__(self, "source_layer", _optional_layer(self.source_layer))
        check_tokens(self.tokens, op)
        why = "it cannot be normalised (unit=True)" if self.unit else "adding it would do nothing"
        check_nonzero(self.direction, _known_rows(self.direction, self.layers, self.source_layer), op, why)

    def _vectors(self, model: Model) -> list[tuple[int, torch.Tensor]]:
        chosen = self.layers if self.layers is not None else self.direction.layers
        layers, rows = _resid_pre_rows(self, model, chosen, "adding it would do nothing")
        if not layers:
            return []
        used = self.direction.select(list(dict.fromkeys(rows)))
        used = used.unit() if self.unit else used
        return [(layer, used.at(row) * self.coeff) for layer, row in zip(layers, rows)]

    def resolve(self, model: Model) -> Plan:
        """``Add(coeff * v)`` on ``resid_pre`` of each layer."""
        steps = tuple(Step(la, "resid_pre", Add(v), self.tokens) for la, v in self._vectors(model))
        return Plan(type(self).__name__, steps)

    def weights(self, model: Model) -> tuple[WeightEdit, ...]:
        """A constant added to each layer's input: embedding rows at layer 0, a bias before any other layer."""
        require_all_tokens(self, "AddVector")
        return tuple(AddToResidual(la, v.double()) for la, v in self._vectors(model))


@dataclass(frozen=True)
class Ablate:
    """Project the direction out of the residual stream everywhere (METHODS 1).

    Uses the vector of ``source_layer`` (default: the direction's only layer) at every layer;
    ``per_layer=True`` uses each layer's own vector instead (layers the direction covers).
    ``strength`` s < 1 removes only that share of the component: every write to the residual stream (the
    embedding, each attention and MLP output) becomes ``w - s (w·r̂) r̂``, exactly what the weight edit does.

    Example:
        >>> from steerlab.testing import tiny_model, tiny_direction
        >>> model = tiny_model("llama")
        >>> [s.where for s in model.plan(Ablate(tiny_direction(model), strength=0.5)).steps][:3]
        ['resid_pre @ 0', 'attn_out @ 0', 'mlp_out @ 0']
    """

    direction: Direction
    source_layer: int | None = None
    per_layer: bool = False
    tokens: Tokens = "all"
    _: KW_ONLY
    strict: bool = False
    strength: float = 1.0

    def __post_init__(self) -> None:
        op = type(self).__name__
        check_direction(self.direction, op)
        strength = finite_number(self.strength, f"{op} strength")
        if not 0.0 < strength <= 1.0:
            raise InvalidValueError(f"{op} strength must be in (0, 1] (1: the component removed); got {strength}")
        if strength != 1.0 and self.per_layer:
            raise InvalidValueError(f"{op}: a partial strength needs one vector for every layer; drop per_layer=True")
        object.__setattr__(self, "strength", float(strength))
        object.__setattr__(self, "source_layer", _optional_layer(self.source_layer))
        check_tokens(self.tokens, op)
        check_nonzero(self.direction, self._rows(), op, "it has no direction to project out")

    def _rows(self) -> list[int]:
        if self.per_layer or self.source_layer is None and len(self.direction.layers) != 1:
            return list(self.direction.layers)
        return [self.source_layer if self.source_layer is not None else self.direction.layers[0]]

    def _units(self, model: Model) -> dict[int, torch.Tensor]:
        """{model layer: the unit vector projected out there}, after the width and provenance checks."""
        _check_width(self.direction, model)
        # one vector everywhere: any residual-stream site is the same space; per layer: the layer inputs
        sites = ("resid_pre",) if self.per_layer else RESIDUAL_SITES
        check_provenance(self.direction, model, sites=sites, op=type(self).__name__, strict=self.strict)
        if self.per_layer:
            layers = model.layer_indices(list(self.direction.layers))
            unit = self.direction.select(layers).unit()
            return {la: unit.at(la) for la in layers}
        if self.source_layer is None and len(self.direction.layers) != 1:
            raise ShapeError(
                f"the direction covers layers {list(self.direction.layers)}: pick one with source_layer=..., "
                "or pass per_layer=True"
            )
        source = self._rows()[0]
        r_hat = self.direction.select([source]).unit().at(source)
        return {la: r_hat for la in range(model.n_layers)}

    def resolve(self, model: Model) -> Plan:
        """``Project(r̂)`` on ``resid_pre``, ``attn_out`` and ``mlp_out`` of every layer; for ``strength`` s < 1
        ``RankOne(-s r̂, r̂)`` on the writes: the embedding (``resid_pre`` of layer 0), ``attn_out``, ``mlp_out``."""
        if self.strength != 1.0:
            units = self._units(model)
            writes = [(0, "resid_pre")] + [(la, site) for la in units for site in ("attn_out", "mlp_out")]
            partial = tuple(Step(la, site, RankOne(-self.strength * units[la], units[la]), self.tokens) for la, site in writes)
            return Plan(type(self).__name__, partial)
        steps = tuple(
            Step(la, site, Project(vec), self.tokens)
            for la, vec in self._units(model).items()
            for site in ("resid_pre", "attn_out", "mlp_out")
        )
        return Plan(type(self).__name__, steps)

    def weights(self, model: Model) -> tuple[WeightEdit, ...]:
        """``W_out' = (I - r̂ r̂ᵀ) W_out`` for every module writing the residual stream."""
        require_all_tokens(self, "Ablate")
        if self.per_layer:
            raise NotBakeableError(
                "Ablate(per_layer=True) projects a different vector out of each layer's input, which no weight edit "
                "reproduces (orthogonalising the writers removes one direction everywhere). Bake "
                f"Ablate(direction, source_layer=...) instead. {RUNTIME_ONLY}"
            )
        r = next(iter(self._units(model).values())).double()
        r = r / r.norm()
        return (MapWriters(-self.strength * r, r),)


@dataclass(frozen=True)
class Clamp:
    """Set the projection on the (unit) direction to ``value`` at ``layers`` (``resid_pre``)."""

    direction: Direction
    value: float
    layers: Sequence[int]
    source_layer: int | None = None
    tokens: Tokens = "all"
    _: KW_ONLY
    strict: bool = False

    def __post_init__(self) -> None:
        op = type(self).__name__
        check_direction(self.direction, op)
        object.__setattr__(self, "value", finite_number(self.value, f"{op} value"))
        object.__setattr__(self, "layers", layer_tuple(self.layers, "layers"))
        object.__setattr__(self, "source_layer", _optional_layer(self.source_layer))
        check_tokens(self.tokens, op)
        check_nonzero(self.direction, _known_rows(self.direction, self.layers, self.source_layer), op,
                      "it cannot be normalised to clamp the projection on it")  # fmt: skip

    def resolve(self, model: Model) -> Plan:
        """``Project(r̂, value)`` on ``resid_pre`` of each layer."""
        layers, rows = _resid_pre_rows(self, model, self.layers, "it cannot be normalised to clamp the projection on it")
        unit = self.direction.select(list(dict.fromkeys(rows))).unit() if layers else None
        steps = tuple(Step(la, "resid_pre", Project(unit.at(row), self.value), self.tokens) for la, row in zip(layers, rows))
        return Plan(type(self).__name__, steps)

    def weights(self, model: Model) -> tuple[WeightEdit, ...]:
        """None: see the error."""
        raise NotBakeableError(
            "Clamp sets the projection on a direction at chosen layers' inputs to a constant: that replaces part of "
            "the residual stream, which no weight edit of the writers reproduces without also changing what earlier "
            f"layers read. {RUNTIME_ONLY}"
        )
