"""Plans: what an intervention does, as data that any backend can render.

Every intervention is a frozen value whose ``resolve(model)`` checks it against one model, once, and
returns a :class:`Plan`: a tuple of :class:`Step` — at decoder layer ``layer``, on ``site`` (a named site
of :mod:`steerlab.hooks`, or ``"module"`` with a path inside the layer), apply ``op`` (one of the
operations below, holding its tensors) to the tokens ``tokens`` selects. Backends render plans and
never look at the intervention that made them:

* :mod:`steerlab.backends.hf` — hooks on the transformers model (``model.apply``);
* :mod:`steerlab.backends.weights` — a weight edit (``training.bake``), from the intervention's
  ``weights(model)``: its exact weight form, a tuple of the weight edits at the bottom of this module;
* the TransformerLens and nnsight bridges (:mod:`steerlab.interop`).

Operations (``x`` is the activation at the site, one row per token):

==================  ============  ===================================================================
op                  site          what it computes
==================  ============  ===================================================================
:class:`Add`        residual      ``x + v``
:class:`Project`    residual      ``x + (value - x·u) u`` (``value=0``: directional ablation)
:class:`RankOne`    residual      ``x + (x·right) left``
:class:`SetHeads`   ``head``      chosen heads' outputs set to zero or to fixed means
:class:`Route`      router        chosen experts switched off, or forced into the top-k
:class:`DropShared` ``mlp_out``   the MoE output without its shared expert
:class:`LinearDelta`  module      ``y + x Δᵀ`` for a linear ``y = W x`` (``Δ = up downᵀ``)
:class:`ColumnDelta`  module      ``y + a[cols] Δ`` for a down projection (dense, shared or routed)
==================  ============  ===================================================================

``tokens`` is ``"all"``, ``"prompt"`` or ``"generated"`` (the last two need the prompt length, which
``model.generate`` records). *Positions* (``"last"``, ``"t_inst"``, ...) are a different thing: where to
read activations in a chat, see :mod:`steerlab.chat`.

Example:
    >>> import torch
    >>> step = Step(layer=3, site="resid_pre", op=Add(torch.ones(4)))
    >>> Plan("AddVector", (step,)).layers
    (3,)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from steerlab.errors import EmptyInputError, InvalidValueError, UnknownPositionError

Tokens = Literal["all", "prompt", "generated"]
TOKENS: tuple[str, ...] = ("all", "prompt", "generated")
RESIDUAL_SITES: tuple[str, ...] = ("resid_pre", "resid_post", "attn_out", "mlp_out")  # all write the residual stream


def check_tokens(tokens: object, owner: str) -> Tokens:
    """``tokens`` if it is one of :data:`TOKENS`, else an :class:`UnknownPositionError` listing them.

    Example:
        >>> check_tokens("generated", "AddVector")
        'generated'
    """
    if not isinstance(tokens, str) or tokens not in TOKENS:
        raise UnknownPositionError(
            f"{owner}: unknown tokens={tokens!r}; use one of {', '.join(map(repr, TOKENS))} "
            "(the tokens it acts on: every token, the prompt's, or the generated ones)"
        )
    return tokens  # type: ignore[return-value]


# ----- operations on an activation -----
@dataclass(frozen=True, eq=False)
class Add:
    """``x + vector``."""

    vector: torch.Tensor  # [d]


@dataclass(frozen=True, eq=False)
class Project:
    """``x + (value - x·unit) unit``: the projection on ``unit`` set to ``value`` (0: removed)."""

    unit: torch.Tensor  # [d], unit norm
    value: float = 0.0


@dataclass(frozen=True, eq=False)
class RankOne:
    """``x + (x·right) left``: the map ``I + left rightᵀ``."""

    left: torch.Tensor  # [d]
    right: torch.Tensor  # [d]


@dataclass(frozen=True, eq=False)
class SetHeads:
    """The outputs of ``heads`` (before ``o_proj``) set to zero (``fill=None``) or to ``fill`` [n, head_dim].

    ``rescale_norm``: rescale each token's attention output back to the norm it had before.
    """

    heads: tuple[int, ...]
    fill: torch.Tensor | None = None
    rescale_norm: bool = False


@dataclass(frozen=True)
class Route:
    """On ``router_logits``: ``experts`` never selected (``mode="off"``) or always (``"force"``)."""

    experts: tuple[int, ...]
    mode: Literal["off", "force"] = "off"


@dataclass(frozen=True)
class DropShared:
    """On ``mlp_out``: the MoE block's output without its shared expert (the routed experts' sum)."""


@dataclass(frozen=True, eq=False)
class LinearDelta:
    """On a linear module ``y = W x``: ``y + x Δᵀ`` with ``Δ = up`` (``down=None``) or ``up downᵀ``."""

    up: torch.Tensor  # [out, r] (or [out, in] with down=None)
    down: torch.Tensor | None = None  # [in, r]

    def delta(self) -> torch.Tensor:
        """``Δ`` [out, in] (float64)."""
        up = self.up.double()
        return up if self.down is None else up @ self.down.double().T


@dataclass(frozen=True, eq=False)
class ColumnDelta:
    """On a down projection: each listed neuron's write changes by a row of ``delta``.

    ``expert`` is ``None`` (a dense or shared expert's ``nn.Linear``: ``y + x[..., columns] delta``) or a
    routed expert of a fused experts module (its neurons are recomputed for the tokens routed to it and the
    change is weighted by its routing weight).
    """

    columns: tuple[int, ...]
    delta: torch.Tensor  # [len(columns), d]
    expert: int | None = None


Op = Add | Project | RankOne | SetHeads | Route | DropShared | LinearDelta | ColumnDelta


@dataclass(frozen=True)
class Step:
    """One operation at one place: ``op`` on ``site`` of decoder layer ``layer``, for ``tokens``.

    ``site`` is a named site (:data:`steerlab.hooks.SITES`) or ``"module"``, then ``module`` is a dotted
    path inside the decoder layer (``"mlp.down_proj"``).
    """

    layer: int
    site: str
    op: Op
    tokens: Tokens = "all"
    module: str | None = None

    def __post_init__(self) -> None:
        check_tokens(self.tokens, "Step")
        if (self.site == "module") != (self.module is not None):
            raise InvalidValueError("a Step on site='module' needs module='path.in.layer', and only such a step has one")

    @property
    def where(self) -> str:
        """``"resid_pre @ 3"`` / ``"mlp.down_proj @ 3"``: for messages and hook names."""
        return f"{self.module if self.site == 'module' else self.site} @ {self.layer}"


@dataclass(frozen=True)
class Plan:
    """What one intervention does on one model: its steps in order (see module docs)."""

    source: str
    steps: tuple[Step, ...] = field(default_factory=tuple)

    @property
    def layers(self) -> tuple[int, ...]:
        """The layers the steps touch, sorted."""
        return tuple(sorted({s.layer for s in self.steps}))

    @property
    def tokens(self) -> tuple[str, ...]:
        """The token selections the steps use."""
        return tuple(dict.fromkeys(s.tokens for s in self.steps))

    def __add__(self, other: Plan) -> Plan:
        return Plan(f"{self.source} + {other.source}", self.steps + other.steps)


# ----- weight edits (an intervention's exact weight form) -----
@dataclass(frozen=True, eq=False)
class MapWriters:
    """Every module that writes the residual stream (embedding rows, o_proj, down projections, experts,
    shared experts) gets ``W <- (I + left rightᵀ) W`` (and its bias likewise)."""

    left: torch.Tensor  # [d] float64
    right: torch.Tensor  # [d] float64


@dataclass(frozen=True, eq=False)
class AddToResidual:
    """A constant ``vector`` added to ``resid_pre`` of ``layer`` at every token."""

    layer: int
    vector: torch.Tensor  # [d] float64


@dataclass(frozen=True, eq=False)
class FillHeads:
    """The heads' ``o_proj`` input columns zeroed, and ``W_O[:, h] m_h`` folded into the bias for ``means``."""

    layer: int
    heads: tuple[int, ...]
    means: torch.Tensor | None = None  # [len(heads), head_dim]


@dataclass(frozen=True)
class ExpertsOff:
    """Routed ``experts`` of ``layer`` never selected: router rows zeroed, router bias very negative."""

    layer: int
    experts: tuple[int, ...]


@dataclass(frozen=True)
class SharedOff:
    """The shared expert of ``layer`` contributes nothing (its down projection zeroed)."""

    layer: int


@dataclass(frozen=True, eq=False)
class ModuleDelta:
    """``W += delta`` for the linear module at ``module`` (a path inside decoder layer ``layer``)."""

    layer: int
    module: str
    delta: torch.Tensor  # [out, in] float64


@dataclass(frozen=True, eq=False)
class ColumnsUpdate:
    """Down-projection columns ``v_j <- scale * v_j + add_j`` in the weight at ``path`` (from the model root);
    ``expert`` slices a fused ``[E, ...]`` parameter, ``neuron_axis`` indexes neurons in the slice."""

    path: str
    expert: int | None
    neuron_axis: int
    columns: tuple[int, ...]
    scale: float
    add: torch.Tensor  # [len(columns), d] float64


WeightEdit = MapWriters | AddToResidual | FillHeads | ExpertsOff | SharedOff | ModuleDelta | ColumnsUpdate


def resolve_plans(model: Any, interventions: Sequence[Any]) -> list[Plan]:
    """One :class:`Plan` per intervention on ``model``: values are resolved (``.resolve(model)``), plans pass
    through; anything else, no interventions at all, or a plan with no step raises.

    Example:
        >>> from steerlab.testing import tiny_model, tiny_direction
        >>> model = tiny_model("llama")
        >>> [p.source for p in resolve_plans(model, [steerlab.Ablate(tiny_direction(model, layer=1))])]
        ['Ablate']
    """
    if not interventions:
        raise EmptyInputError("pass at least one intervention (e.g. AddVector(direction, coeff=4.0))")
    plans = []
    for iv in interventions:
        if isinstance(iv, Plan):
            plan = iv
        elif callable(getattr(iv, "resolve", None)):
            plan = iv.resolve(model)
        else:
            raise InvalidValueError(
                f"{type(iv).__name__} is not an intervention: pass values with .resolve(model) (AddVector, Ablate, "
                "Clamp, HeadAblation, ExpertMask, ColumnEdit, RankOneRedirect, LinearRedirect, MultiKeyRedirect) "
                "or a steerlab.Plan"
            )
        if not plan.steps:
            raise EmptyInputError(
                f"{plan.source} places no hook and no edit on {getattr(model, 'name', '') or 'this model'} "
                "(an empty layer list?); give it at least one layer"
            )
        plans.append(plan)
    return plans
