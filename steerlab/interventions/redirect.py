"""Rank-one concept redirection (METHODS 10): make the model read concept A as concept B.

Three forms, all frozen values that resolve to a :class:`~steerlab.plan.Plan` (``with model.apply(...)``)
and say exactly which weight edit they equal (``weights(model)``, for ``training.bake``):

* :class:`RankOneRedirect` (here) — residual stream, unit directions a (concept) and b (target):
  ``h <- h + (a·h)(b - a) = M h`` with ``M = I + (b - a) aᵀ``; so ``a -> b`` and every direction
  orthogonal to ``a`` is left alone. Either at chosen layers (``resid_pre``) or ``everywhere``:
  on the embeddings (``resid_pre`` of layer 0) and on every attention and MLP write, which is the
  runtime form of the baked ``W_out' = M W_out`` (:func:`redirect_matrix`).
* :class:`~steerlab.interventions.linear_redirect.LinearRedirect` — ROME-style edit of one linear map
  ``y = W x`` (MLP down projection or ``o_proj``), :func:`rank_one_update`.
* :class:`~steerlab.interventions.linear_redirect.MultiKeyRedirect` — the TRCE/UCE closed form for many
  keys with preservation keys (:func:`closed_form_edit`).

The maths is in :mod:`steerlab.interventions.redirect_math`; keys and their covariance are measured by
:mod:`steerlab.measure.keys`. This module re-exports the linear forms and the maths.

Example:
    >>> from steerlab.measure import estimate_key_covariance, linear_redirect_from_prompts
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> corpus = ["The quick brown fox jumps over the lazy dog.", "Hi there! How are you today?"]
    >>> C = estimate_key_covariance(model, corpus, layer=1, ridge=1e-3)
    >>> edit = linear_redirect_from_prompts(model, ["Tell me about cats."], ["Tell me about dogs."],
    ...                                     layer=1, covariance=C)
    >>> with model.apply(edit):
    ...     texts = model.generate(["What do cats eat?"], max_new_tokens=4)
    >>> edit.weights(model)[0].module
    'mlp.down_proj'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from typing import TYPE_CHECKING

import torch

from steerlab._checks import layer_index, layer_tuple
from steerlab.errors import NotBakeableError, ShapeError
from steerlab.interventions.linear_redirect import (
    LinearRedirect,
    MultiKeyRedirect,
    NotALinearModuleError,
    resolve_linear,
)
from steerlab.interventions.redirect_math import (
    DegenerateEditError,
    closed_form_edit,
    rank_one_update,
    redirect_matrix,
    redirect_rank_one,
)
from steerlab.plan import RESIDUAL_SITES, MapWriters, Plan, RankOne, Step, Tokens, WeightEdit, check_tokens
from steerlab.steering.direction import Direction
from steerlab.steering.ops import RUNTIME_ONLY, check_provenance, require_all_tokens

if TYPE_CHECKING:
    from steerlab.model import Model

__all__ = [
    "DegenerateEditError",
    "LinearRedirect",
    "MultiKeyRedirect",
    "NotALinearModuleError",
    "RankOneRedirect",
    "closed_form_edit",
    "rank_one_update",
    "redirect_matrix",
    "redirect_rank_one",
    "resolve_linear",
]


def _pick(vec: Direction | torch.Tensor, layer: int | None, source_layer: int | None, what: str) -> torch.Tensor:
    """The vector of ``vec`` to use at ``layer``: a raw vector, or a Direction's own / source / only layer."""
    if not isinstance(vec, Direction):
        return torch.as_tensor(vec)
    if source_layer is not None:
        return vec.at(source_layer)
    if layer is not None and layer in vec.layers:
        return vec.at(layer)
    if len(vec.layers) == 1:
        return vec.vectors[0]
    where = f"layer {layer}" if layer is not None else "every layer"
    raise ShapeError(
        f"the {what} direction covers layers {list(vec.layers)} and none is chosen for {where}; pass source_layer=..."
    )


@dataclass(frozen=True, eq=False)
class RankOneRedirect:
    """Redirect concept direction a to target direction b in the residual stream: ``h <- h + (a·h)(b - a)``.

    ``concept`` and ``target`` are :class:`~steerlab.steering.Direction` values or raw [d] vectors
    (normalised here). ``layers`` edits ``resid_pre`` of those layers (default: the concept
    direction's layers), each with its own vectors unless ``source_layer`` is given.
    ``everywhere=True`` edits the embeddings (``resid_pre`` of layer 0) and every ``attn_out`` and
    ``mlp_out`` with one pair of vectors: the runtime twin of baking ``W_out' = M W_out``
    (:meth:`matrix`) into every module that writes the residual stream. (Unlike ablation, ``M`` is
    not idempotent, so it is applied once per write, not again at every layer's input.)
    Directions fitted on another model or site warn; ``strict=True`` makes that an error.

    Example:
        >>> from steerlab.testing import tiny_model, tiny_direction
        >>> model = tiny_model("llama")
        >>> cats, dogs = tiny_direction(model, layer=1, seed=0), tiny_direction(model, layer=1, seed=1)
        >>> with model.apply(RankOneRedirect(cats, dogs, layers=[1])):
        ...     texts = model.generate(["Describe a cat."], max_new_tokens=4)
        >>> a, b = cats.at(1) / cats.at(1).norm(), dogs.at(1) / dogs.at(1).norm()
        >>> torch.allclose(RankOneRedirect(cats, dogs).matrix(1) @ a, b, atol=1e-6)    # M maps a to b
        True
        >>> [step.where for step in model.plan(RankOneRedirect(cats, dogs, everywhere=True)).steps][:3]
        ['resid_pre @ 0', 'attn_out @ 0', 'mlp_out @ 0']
    """

    concept: Direction | torch.Tensor
    target: Direction | torch.Tensor
    _: KW_ONLY
    layers: Sequence[int] | None = None
    everywhere: bool = False
    source_layer: int | None = None
    tokens: Tokens = "all"
    strict: bool = False

    def __post_init__(self) -> None:
        check_tokens(self.tokens, type(self).__name__)
        if self.layers is not None:
            object.__setattr__(self, "layers", layer_tuple(self.layers, "layers"))
        if self.source_layer is not None:
            object.__setattr__(self, "source_layer", layer_index(self.source_layer, "source_layer"))
        if self.everywhere and self.layers is not None:
            raise ShapeError("everywhere=True edits every layer; drop layers=..., or set everywhere=False")
        if not isinstance(self.concept, Direction) and not isinstance(self.target, Direction):
            redirect_rank_one(self.concept, self.target)  # fail early on bad raw vectors

    def factors(self, layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(b - a, a)`` in float64 for ``layer`` (``None``: the single pair ``everywhere`` uses)."""
        a = _pick(self.concept, layer, self.source_layer, "concept")
        b = _pick(self.target, layer, self.source_layer, "target")
        return redirect_rank_one(a, b)

    def matrix(self, layer: int | None = None, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``M = I + (b - a) aᵀ`` for ``layer`` (see :func:`redirect_matrix`), for a baker."""
        left, right = self.factors(layer)
        return (torch.eye(left.shape[0], dtype=torch.float64) + torch.outer(left, right)).to(dtype)

    def resolve(self, model: Model) -> Plan:
        """``RankOne`` on ``resid_pre`` of each layer, or (``everywhere``) on the embeddings and every write."""
        sites = RESIDUAL_SITES if self.everywhere else ("resid_pre",)
        for vec in (self.concept, self.target):
            if isinstance(vec, Direction) and vec.width == model.d_model:  # other widths: the error below
                check_provenance(vec, model, sites=sites, op=type(self).__name__, strict=self.strict)
        if self.everywhere:
            op = RankOne(*self._checked(model, None))
            writes = [(site, la) for la in range(model.n_layers) for site in ("attn_out", "mlp_out")]
            steps = tuple(Step(la, site, op, self.tokens) for site, la in [("resid_pre", 0), *writes])
            return Plan(type(self).__name__, steps)
        if self.layers is not None:
            chosen = self.layers
        elif isinstance(self.concept, Direction):
            chosen = list(self.concept.layers)
        else:
            raise ShapeError("raw vectors carry no layers: pass layers=[...] or everywhere=True")
        steps = tuple(
            Step(la, "resid_pre", RankOne(*self._checked(model, la)), self.tokens) for la in model.layer_indices(chosen)
        )
        return Plan(type(self).__name__, steps)

    def weights(self, model: Model) -> tuple[WeightEdit, ...]:
        """``everywhere=True``: ``W_out' = M W_out`` for every module writing the residual stream."""
        require_all_tokens(self, "RankOneRedirect")
        if not self.everywhere:
            raise NotBakeableError(
                "RankOneRedirect at chosen layers maps the whole residual stream at those layers' inputs, which no "
                "weight edit reproduces; RankOneRedirect(..., everywhere=True) (every write) is the bakeable form. "
                f"{RUNTIME_ONLY}"
            )
        self.resolve(model)  # widths and provenance
        return (MapWriters(*self.factors(None)),)

    def _checked(self, model: Model, layer: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        left, right = self.factors(layer)
        if left.shape[0] != model.d_model:
            raise ShapeError(
                f"redirect vectors have width {left.shape[0]} but {model.name} has d_model={model.d_model}; "
                "fit the directions on this model (or one of the same width)"
            )
        return left, right
