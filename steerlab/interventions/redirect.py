"""Rank-one concept redirection (METHODS 10): make the model read concept A as concept B.

Three forms, all frozen values that resolve to a :class:`~steerlab.plan.Plan` (``with model.apply(...)``)
and say exactly which weight edit they equal (``weights(model)``, for ``training.bake``):

* :class:`RankOneRedirect` — residual stream, unit directions a (concept) and b (target):
  ``h <- h + (a·h)(b - a) = M h`` with ``M = I + (b - a) aᵀ``; so ``a -> b`` and every direction
  orthogonal to ``a`` is left alone. Either at chosen layers (``resid_pre``) or ``everywhere``:
  on the embeddings (``resid_pre`` of layer 0) and on every attention and MLP write, which is the
  runtime form of the baked ``W_out' = M W_out`` (:func:`redirect_matrix`).
* :class:`LinearRedirect` — ROME-style edit of one linear map ``y = W x`` (MLP down projection or
  ``o_proj``): ``W' = W + (v_B - W k_A) uᵀ / (uᵀ k_A)`` with ``v_B = W k_B`` and ``u = C⁻¹ k_A``
  (:func:`rank_one_update`); ``C`` from :func:`estimate_key_covariance`, keys from :func:`module_keys`.
* :class:`MultiKeyRedirect` — the TRCE/UCE closed form for many keys with preservation keys
  (:func:`closed_form_edit`).

The linear forms act on the module itself (``site="module"`` steps: there is no named site for the
input of a down projection); a redirect that never ran raises like any other step.

Example:
    >>> from steerlab.interventions.redirect import LinearRedirect, estimate_key_covariance
    >>> C = estimate_key_covariance(model, corpus, layer=6, ridge=1e-3)        # doctest: +SKIP
    >>> edit = LinearRedirect.from_prompts(model, ["Tell me about cats."], ["Tell me about dogs."],
    ...                                    layer=6, covariance=C)             # doctest: +SKIP
    >>> with model.apply(edit):                                                # doctest: +SKIP
    ...     model.generate(["What do cats eat?"])
    >>> edit.weights(model)[0].module                                          # doctest: +SKIP
    'mlp.down_proj'
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from steerlab._checks import check_finite, finite_number, layer_index, layer_tuple
from steerlab.arch import normalize_layer, resolve_path
from steerlab.chat import Position
from steerlab.errors import EmptyInputError, InterventionNotFiredError, NotBakeableError, ShapeError, SteerlabError
from steerlab.steering.direction import Direction
from steerlab.plan import (
    RESIDUAL_SITES,
    LinearDelta,
    MapWriters,
    ModuleDelta,
    Plan,
    RankOne,
    Step,
    Tokens,
    WeightEdit,
    check_tokens,
)
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
    "estimate_key_covariance",
    "module_keys",
    "rank_one_update",
    "redirect_matrix",
    "redirect_rank_one",
    "resolve_linear",
]

LINEAR_ROLES: tuple[str, ...] = ("down_proj", "o_proj")  # ArchSpec fields naming a dense linear map


class DegenerateEditError(SteerlabError, ValueError):
    """An edit that would do nothing or divide by zero (concept equals target, zero key, singular C)."""


class NotALinearModuleError(SteerlabError, TypeError):
    """The module to edit is missing, or is not a 2D ``nn.Linear`` (e.g. fused 3D MoE experts)."""


# ----------------------------------------------------------------------------------------------
# residual-stream form
# ----------------------------------------------------------------------------------------------
def _vector64(v: torch.Tensor, what: str) -> torch.Tensor:
    t = torch.as_tensor(v).detach().to("cpu", torch.float64)
    if t.dim() != 1:
        raise ShapeError(
            f"{what} must be one vector [d]; got shape {tuple(t.shape)} (pick one row, or pass a Direction)"
        )
    if not bool(torch.isfinite(t).all()):
        raise DegenerateEditError(f"{what} has non-finite entries; fit it again on finite activations")
    return t


def _unit64(v: torch.Tensor, what: str) -> torch.Tensor:
    t = _vector64(v, what)
    norm = t.norm()
    if float(norm) == 0.0:
        raise DegenerateEditError(f"{what} is the zero vector and has no direction; pass a non-zero vector")
    return t / norm


def redirect_rank_one(concept: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(b - a, a)`` (float64, unit a and b) of the residual redirection ``M = I + (b - a) aᵀ``.

    Example:
        >>> import torch
        >>> left, right = redirect_rank_one(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
        >>> left.tolist(), right.tolist()
        ([-1.0, 1.0], [1.0, 0.0])
    """
    a, b = _unit64(concept, "concept"), _unit64(target, "target")
    if a.shape != b.shape:
        raise ShapeError(f"concept has width {a.shape[0]} but target has width {b.shape[0]}; fit both on one model")
    if float((b - a).norm()) < 1e-6:
        raise DegenerateEditError(
            "concept and target point the same way, so the redirection is the identity; pick a target direction "
            "that differs from the concept"
        )
    return b - a, a


def redirect_matrix(concept: torch.Tensor, target: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The d x d map ``M = I + (b - a) aᵀ`` (a, b normalised): bake as ``W_out' = M W_out`` for every writer.

    Example:
        >>> import torch
        >>> M = redirect_matrix(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]))
        >>> (M @ torch.tensor([1.0, 0.0, 5.0])).tolist()
        [0.0, 1.0, 5.0]
    """
    left, right = redirect_rank_one(concept, target)
    return (torch.eye(left.shape[0], dtype=torch.float64) + torch.outer(left, right)).to(dtype)


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
        >>> with model.apply(RankOneRedirect(cats, dogs, layers=[4])):        # doctest: +SKIP
        ...     model.generate(["Describe a cat."])
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


# ----------------------------------------------------------------------------------------------
# linear-layer forms: resolution, keys, covariance
# ----------------------------------------------------------------------------------------------
def resolve_linear(model: Model, layer: int, module: str = "down_proj") -> tuple[str, nn.Linear]:
    """``(path from the model root, module)`` of a 2D linear map in decoder layer ``layer``.

    ``module`` is a role of the architecture spec (``"down_proj"``, ``"o_proj"``) or a dotted path
    inside the decoder layer.

    Example:
        >>> path, linear = resolve_linear(model, 2, "o_proj")                  # doctest: +SKIP
        >>> path                                                               # doctest: +SKIP
        'model.layers.2.self_attn.o_proj'
    """
    spec = model.spec
    idx = normalize_layer(layer, model.n_layers)
    path = getattr(spec, module) if module in LINEAR_ROLES else module
    decoder_layer = model.layer(idx)
    linears = [name for name, m in decoder_layer.named_modules() if isinstance(m, nn.Linear)]
    hint = (
        f"linear modules in layer {idx}: {', '.join(linears[:12]) or 'none'}. MoE experts are fused 3D "
        "parameters and cannot take this edit; use module='o_proj', or a dense layer"
    )
    if path is None:
        raise NotALinearModuleError(f"{spec.model_type} has no dense {module} (its MLP is a fused MoE block); {hint}")
    obj = resolve_path(decoder_layer, path, missing_ok=True)
    if obj is None:
        raise NotALinearModuleError(f"layer {idx} of this {spec.model_type} model has no module {path!r}; {hint}")
    if not isinstance(obj, nn.Linear) or obj.weight.dim() != 2:
        shape = tuple(obj.shape) if isinstance(obj, torch.Tensor) else type(obj).__name__
        raise NotALinearModuleError(
            f"{path!r} in layer {idx} is {shape}, not a 2D nn.Linear, so it has no single map y = W x to edit; {hint}"
        )
    return f"{spec.layers}.{idx}.{path}", obj


class _Stop(Exception):
    """Raised once the edited module's input is captured, to skip the rest of the forward pass."""


def _module_inputs(
    model: Model,
    prompts: Sequence[str],
    *,
    layer: int,
    module: str,
    chat: bool,
    system: str | None,
    batch_size: int,
    progress: bool,
    desc: str,
    each: Callable,
) -> nn.Linear:
    """Run ``prompts`` (length-sorted, left-padded batches) and call ``each(rows, batch, x)`` with the module input x."""
    if isinstance(prompts, str) or len(prompts) == 0:
        raise EmptyInputError("pass a non-empty list of prompts (wrap a single string: [prompt])")
    path, linear = resolve_linear(model, layer, module)
    fmt = model.chat(chat=chat, system=system)
    rows = fmt.tokenize(list(prompts))
    seen: dict[str, torch.Tensor] = {}

    def grab(mod, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["input"]).detach()
        raise _Stop

    bar = tqdm(total=len(rows), desc=desc, unit="prompt", disable=not progress)
    try:
        with model.hooks(check_fired=False) as session:
            session.add_module_hook(linear, grab, pre=True, with_kwargs=True)
            for idx, batch in fmt.batches(rows, batch_size):
                batch = batch.to(model.device)
                seen.clear()
                with torch.inference_mode():
                    try:
                        model.hf(**batch.model_inputs(), use_cache=False)
                    except _Stop:
                        pass
                if "x" not in seen:
                    raise InterventionNotFiredError(f"{path} never ran in the forward pass; pick a module on its path")
                x = seen["x"]
                if x.dim() == 2:  # some blocks flatten tokens
                    x = x.view(len(idx), -1, x.shape[-1])
                each(idx, batch, x)
                bar.update(len(idx))
    finally:
        bar.close()
    return linear


def module_keys(
    model: Model,
    prompts: Sequence[str],
    *,
    layer: int,
    module: str = "down_proj",
    position: Position = "last",
    average: bool = True,
    chat: bool = True,
    system: str | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """Keys: the input of the linear ``module`` at ``position`` (default the last token) of each prompt.

    Returns their mean [in] (``average=True``), else one row per prompt [n, in], float32 on CPU
    (means are taken in float64; a multi-token position is averaged within each prompt).

    Example:
        >>> k_cat = module_keys(model, ["Tell me about cats.", "Cats are"], layer=6)   # doctest: +SKIP
    """
    out: dict[int, torch.Tensor] = {}

    def each(idx, batch, x):
        where = batch.index(position).to(x.device)
        picked = x[torch.arange(x.shape[0], device=x.device)[:, None], where]  # [b, k, in]
        for row, key in zip(idx, picked.double().mean(dim=1).cpu()):
            out[row] = key

    _module_inputs(model, prompts, layer=layer, module=module, chat=chat, system=system, batch_size=batch_size,
                   progress=progress, desc="keys", each=each)  # fmt: skip
    keys = torch.stack([out[i] for i in range(len(out))])
    return (keys.mean(dim=0) if average else keys).float()


def estimate_key_covariance(
    model: Model,
    prompts: Sequence[str],
    *,
    layer: int,
    module: str = "down_proj",
    ridge: float = 0.0,
    chat: bool = False,
    system: str | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """``C = E[k kᵀ] + ridge·I`` over every non-pad token of ``prompts`` (ordinary text: ``chat=False``).

    The keys are the input of the linear ``module``; sums are float64 and so is the result [in, in].
    A few prompts give a singular ``C``: collect more text, or pass a small ``ridge``.

    Example:
        >>> C = estimate_key_covariance(model, wiki_sentences, layer=6, ridge=1e-4)   # doctest: +SKIP
    """
    if ridge < 0:
        raise ShapeError(f"ridge must be >= 0, got {ridge}")
    acc: dict[str, torch.Tensor | int] = {"sum": 0, "n": 0}

    def each(idx, batch, x):
        keys = x[batch.attention_mask.bool().to(x.device)].double().cpu()  # [tokens, in]
        acc["sum"] = acc["sum"] + keys.T @ keys
        acc["n"] = int(acc["n"]) + keys.shape[0]

    _module_inputs(model, prompts, layer=layer, module=module, chat=chat, system=system, batch_size=batch_size,
                   progress=progress, desc="covariance", each=each)  # fmt: skip
    cov = acc["sum"] / acc["n"]
    return cov + ridge * torch.eye(cov.shape[0], dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# linear-layer forms: the maths
# ----------------------------------------------------------------------------------------------
def _solve_spd(cov: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``C⁻¹ rhs`` for a symmetric positive definite ``C`` (float64), or a clear error."""
    c = torch.as_tensor(cov).detach().to("cpu", torch.float64)
    n = rhs.shape[0]
    if c.shape != (n, n):
        raise ShapeError(f"covariance must be [{n}, {n}] (the module's input width); got {tuple(c.shape)}")
    if not torch.allclose(c, c.T, rtol=1e-6, atol=1e-9 * float(c.abs().max())):
        raise ShapeError("covariance must be symmetric (E[k kᵀ]); build it with estimate_key_covariance")
    chol, info = torch.linalg.cholesky_ex(c)
    if int(info) != 0:
        raise DegenerateEditError(
            "the key covariance is not positive definite (fewer independent tokens than input dimensions?); "
            "estimate it over more text or pass ridge>0 to estimate_key_covariance"
        )
    return torch.cholesky_solve(rhs[:, None], chol)[:, 0]


def _rank_one_factors(weight, key, value, covariance) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v - W k, u / (uᵀ k))`` in float64 so that ``ΔW = outer(first, second)``."""
    w = torch.as_tensor(weight).detach().to("cpu", torch.float64)
    if w.dim() != 2:
        raise ShapeError(f"weight must be a 2D matrix [out, in]; got shape {tuple(w.shape)}")
    k, v = _vector64(key, "key k_A"), _vector64(value, "value v_B")
    if k.shape[0] != w.shape[1]:
        raise ShapeError(
            f"key has width {k.shape[0]} but the module takes inputs of width {w.shape[1]}; collect keys with "
            "module_keys(model, prompts, layer=..., module=...) at the module you edit"
        )
    if v.shape[0] != w.shape[0]:
        raise ShapeError(f"value has width {v.shape[0]} but the module outputs width {w.shape[0]}; pass v_B = W k_B")
    u = k if covariance is None else _solve_spd(covariance, k)
    denom = float(u @ k)
    if not denom > 1e-12 * float(u.norm() * k.norm()) or float(k.norm()) == 0.0:
        raise DegenerateEditError("uᵀ k_A is zero (a zero key?): the concept key must be a non-zero module input")
    residual = v - w @ k
    if float(residual.norm()) <= 1e-9 * max(float(v.norm()), float((w @ k).norm()), 1e-30):
        raise DegenerateEditError(
            "W k_A already equals the target value (concept and target keys are the same?), so the edit does "
            "nothing; pick target prompts or a target value that differ from the concept"
        )
    return residual, u / denom


def rank_one_update(
    weight: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, covariance: torch.Tensor | None = None
) -> torch.Tensor:
    """ROME's ``ΔW = (v - W k) uᵀ / (uᵀ k)`` with ``u = C⁻¹ k`` (``covariance=None``: C = I), in ``weight``'s dtype.

    ``W + ΔW`` maps ``key`` to ``value`` and leaves every input with ``uᵀ x = 0`` unchanged.

    Example:
        >>> import torch
        >>> W = torch.eye(2, dtype=torch.float64)
        >>> delta = rank_one_update(W, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
        >>> ((W + delta) @ torch.tensor([1.0, 0.0], dtype=torch.float64)).tolist()
        [0.0, 1.0]
    """
    residual, u_hat = _rank_one_factors(weight, key, value, covariance)
    return torch.outer(residual, u_hat).to(torch.as_tensor(weight).dtype)


def closed_form_edit(
    weight: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    preserve: torch.Tensor | None = None,
    lam: float = 1.0,
    ridge: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRCE/UCE closed form ``W' = (Σ v_i k_iᵀ + λ Σ W k_p k_pᵀ)(Σ k_i k_iᵀ + λ Σ k_p k_pᵀ)⁻¹``; returns ``(W', ΔW)``.

    ``keys`` [n, in] map to ``values`` [n, out]; ``preserve`` [m, in] are keys whose outputs should
    stay. This minimises ``Σ|W' k_i - v_i|² + λ Σ|(W' - W) k_p|² + ridge |W' - W|²``; computed as
    ``ΔW = Σ (v_i - W k_i) k_iᵀ A⁺`` (``A`` the bracket on the right plus ``ridge·I``), which equals
    the formula when ``A`` is invertible and otherwise gives the smallest change that fits.

    Example:
        >>> import torch
        >>> W = torch.zeros(2, 2, dtype=torch.float64)
        >>> new, delta = closed_form_edit(W, torch.eye(2, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64))
        >>> new.tolist()
        [[1.0, 1.0], [1.0, 1.0]]
    """
    w = torch.as_tensor(weight).detach().to("cpu", torch.float64)
    if w.dim() != 2:
        raise ShapeError(f"weight must be a 2D matrix [out, in]; got shape {tuple(w.shape)}")
    out_dim, in_dim = w.shape
    k = torch.as_tensor(keys).detach().to("cpu", torch.float64)
    v = torch.as_tensor(values).detach().to("cpu", torch.float64)
    k, v = (k[None] if k.dim() == 1 else k), (v[None] if v.dim() == 1 else v)
    if k.shape[0] == 0:
        raise EmptyInputError("keys is empty; pass at least one key to redirect")
    if k.dim() != 2 or k.shape[1] != in_dim:
        raise ShapeError(f"keys must be [n, {in_dim}] (the module's input width); got {tuple(k.shape)}")
    if v.shape != (k.shape[0], out_dim):
        raise ShapeError(f"values must be [{k.shape[0]}, {out_dim}] (one output per key); got {tuple(v.shape)}")
    if lam < 0 or ridge < 0:
        raise ShapeError(f"lam and ridge must be >= 0; got lam={lam}, ridge={ridge}")
    gram = k.T @ k + ridge * torch.eye(in_dim, dtype=torch.float64)
    if preserve is not None:
        p = torch.as_tensor(preserve).detach().to("cpu", torch.float64)
        p = p[None] if p.dim() == 1 else p
        if p.dim() != 2 or p.shape[1] != in_dim:
            raise ShapeError(f"preserve must be [m, {in_dim}] (the module's input width); got {tuple(p.shape)}")
        gram = gram + lam * (p.T @ p)
    residual = v - k @ w.T  # [n, out]
    rhs = k.T @ residual  # [in, out]
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        delta_t = torch.cholesky_solve(rhs, chol)
    else:  # singular: the minimum-norm change among the minimisers (limit ridge -> 0+)
        delta_t = torch.linalg.pinv(gram, hermitian=True) @ rhs
    delta = delta_t.T.to(torch.as_tensor(weight).dtype)
    return (torch.as_tensor(weight).detach().cpu() + delta), delta


# ----------------------------------------------------------------------------------------------
# linear-layer forms: the values
# ----------------------------------------------------------------------------------------------
def _inside_layer(model: Model, layer: int, module: str) -> tuple[int, str]:
    """(layer index, the module's path inside the decoder layer) of a linear module."""
    path, _ = resolve_linear(model, layer, module)
    idx = normalize_layer(layer, model.n_layers)
    return idx, path[len(f"{model.spec.layers}.{idx}."):]


def _module_step(model: Model, layer: int, module: str, op: LinearDelta, tokens: Tokens) -> Step:
    idx, inside = _inside_layer(model, layer, module)
    return Step(idx, "module", op, tokens, module=inside)


def _module_delta(model: Model, layer: int, module: str, delta: torch.Tensor) -> ModuleDelta:
    idx, inside = _inside_layer(model, layer, module)
    return ModuleDelta(idx, inside, delta.double())


def _module_weight(model: Model, layer: int, module: str) -> tuple[str, torch.Tensor]:
    path, linear = resolve_linear(model, layer, module)
    return path, linear.weight.detach()


@dataclass(frozen=True, eq=False)
class LinearRedirect:
    """ROME-style rank-one edit of one linear map ``y = W x`` at ``layer``: key ``k_A`` now yields ``v_B``.

    ``target_key`` (``k_B``, giving ``v_B = W k_B``) or ``value`` (``v_B`` itself) says where to.
    ``covariance`` is ``C = E[k kᵀ]`` (:func:`estimate_key_covariance`; ``None`` = identity), so
    only inputs along ``u = C⁻¹ k_A`` change. ``module`` is ``"down_proj"`` (default), ``"o_proj"``
    or a dotted path to a 2D ``nn.Linear`` in the layer. At runtime ``y <- y + (v_B - W k_A)(uᵀx)/(uᵀk_A)``;
    :meth:`weights` gives the identical weight edit.

    Example:
        >>> edit = LinearRedirect(6, k_cat, k_dog, covariance=C)              # doctest: +SKIP
        >>> with model.apply(edit):                                            # doctest: +SKIP
        ...     model.generate(["What do cats eat?"])
    """

    layer: int
    key: torch.Tensor
    target_key: torch.Tensor | None = None
    _: KW_ONLY
    value: torch.Tensor | None = None
    module: str = "down_proj"
    covariance: torch.Tensor | None = None
    tokens: Tokens = "all"

    def __post_init__(self) -> None:
        check_tokens(self.tokens, type(self).__name__)
        object.__setattr__(self, "layer", layer_index(self.layer))
        if (self.target_key is None) == (self.value is None):
            raise ShapeError("pass exactly one of target_key (k_B; v_B = W k_B) or value (v_B)")
        key = _vector64(self.key, "key k_A")
        object.__setattr__(self, "key", key)
        if self.target_key is not None:
            target = _vector64(self.target_key, "target_key k_B")
            if target.shape != key.shape:
                raise ShapeError(f"target_key has width {target.shape[0]} but key has width {key.shape[0]}")
            if torch.equal(target, key):
                raise DegenerateEditError("key and target_key are the same vector, so the edit does nothing")
            object.__setattr__(self, "target_key", target)
        if self.value is not None:
            object.__setattr__(self, "value", _vector64(self.value, "value v_B"))
        if self.covariance is not None:
            cov = torch.as_tensor(self.covariance).detach().to("cpu", torch.float64)
            check_finite(cov, "the key covariance", "estimate it again over finite activations")
            object.__setattr__(self, "covariance", cov)

    @classmethod
    def from_prompts(
        cls,
        model: Model,
        concept_prompts: Sequence[str],
        target_prompts: Sequence[str],
        *,
        layer: int,
        module: str = "down_proj",
        covariance: torch.Tensor | None = None,
        position: Position = "last",
        tokens: Tokens = "all",
        chat: bool = True,
        batch_size: int = 16,
    ) -> LinearRedirect:
        """Keys from prompts (:func:`module_keys`, averaged): ``concept_prompts`` -> ``target_prompts``.

        Example:
            >>> LinearRedirect.from_prompts(model, ["About cats:"], ["About dogs:"], layer=6)   # doctest: +SKIP
        """
        kw = {"layer": layer, "module": module, "position": position, "chat": chat, "batch_size": batch_size}
        k_a, k_b = module_keys(model, concept_prompts, **kw), module_keys(model, target_prompts, **kw)
        return cls(layer, k_a, k_b, module=module, covariance=covariance, tokens=tokens)

    def target_value(self, model: Model) -> torch.Tensor:
        """``v_B`` (float64): ``value``, or ``W k_B`` with the model's current weight."""
        if self.value is not None:
            return self.value.double()
        _, weight = _module_weight(model, self.layer, self.module)
        if weight.shape[1] != self.target_key.shape[0]:
            raise ShapeError(
                f"target_key has width {self.target_key.shape[0]} but the module takes inputs of width "
                f"{weight.shape[1]}; collect keys with module_keys(model, prompts, layer=..., module=...) at this module"
            )
        return weight.double().cpu() @ self.target_key.double()

    def factors(self, model: Model) -> tuple[torch.Tensor, torch.Tensor]:
        """``(v_B - W k_A, u / (uᵀ k_A))`` in float64: ``ΔW`` is their outer product."""
        _, weight = _module_weight(model, self.layer, self.module)
        return _rank_one_factors(weight, self.key, self.target_value(model), self.covariance)

    def delta(self, model: Model) -> torch.Tensor:
        """``ΔW`` [out, in], float32 on CPU."""
        residual, u_hat = self.factors(model)
        return torch.outer(residual, u_hat).float()

    def edited_weight(self, model: Model) -> torch.Tensor:
        """``W' = W + ΔW`` (float32, CPU); the model is not changed."""
        _, weight = _module_weight(model, self.layer, self.module)
        return weight.float().cpu() + self.delta(model)

    def resolve(self, model: Model) -> Plan:
        """``LinearDelta`` (rank one: ``y + (v_B - W k_A)(uᵀx)/(uᵀk_A)``) on the module."""
        residual, u_hat = self.factors(model)
        op = LinearDelta(residual[:, None], u_hat[:, None])
        return Plan(type(self).__name__, (_module_step(model, self.layer, self.module, op, self.tokens),))

    def weights(self, model: Model) -> tuple[WeightEdit, ...]:
        """``W += ΔW`` at the module."""
        require_all_tokens(self, "LinearRedirect")
        return (_module_delta(model, self.layer, self.module, self.delta(model)),)



@dataclass(frozen=True, eq=False)
class MultiKeyRedirect:
    """Closed-form multi-key edit (TRCE/UCE) of one linear map at ``layer``: see :func:`closed_form_edit`.

    ``keys`` [n, in] map to ``values`` [n, out] or to ``W @ target_keys`` ([n, in]); ``preserve``
    [m, in] are keys to keep, weighted by ``lam``. At runtime ``y <- y + ΔW x``.

    Example:
        >>> edit = MultiKeyRedirect(6, k_unsafe, target_keys=k_safe, preserve=k_text, lam=0.5)   # doctest: +SKIP
        >>> with model.apply(edit):                                                                # doctest: +SKIP
        ...     model.generate(["..."])
    """

    layer: int
    keys: torch.Tensor
    values: torch.Tensor | None = None
    _: KW_ONLY
    target_keys: torch.Tensor | None = None
    preserve: torch.Tensor | None = None
    lam: float = 1.0
    ridge: float = 0.0
    module: str = "down_proj"
    tokens: Tokens = "all"

    def __post_init__(self) -> None:
        check_tokens(self.tokens, type(self).__name__)
        object.__setattr__(self, "layer", layer_index(self.layer))
        object.__setattr__(self, "lam", finite_number(self.lam, "lam"))
        object.__setattr__(self, "ridge", finite_number(self.ridge, "ridge"))
        if (self.values is None) == (self.target_keys is None):
            raise ShapeError("pass exactly one of values (v_i) or target_keys (v_i = W k_target_i)")
        for name in ("keys", "values", "target_keys", "preserve"):
            t = getattr(self, name)
            if t is not None:
                t = torch.as_tensor(t).detach().to("cpu", torch.float64)
                check_finite(t, name, "collect them again from finite activations")
                object.__setattr__(self, name, t[None] if t.dim() == 1 else t)
        if self.target_keys is not None and self.target_keys.shape != self.keys.shape:
            raise ShapeError(f"target_keys {tuple(self.target_keys.shape)} must match keys {tuple(self.keys.shape)}")

    def solve(self, model: Model) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W', ΔW)`` in float64 for the model's current weight."""
        _, weight = _module_weight(model, self.layer, self.module)
        w = weight.double().cpu()
        values = self.values
        if values is None:
            if self.target_keys.shape[1] != w.shape[1]:
                raise ShapeError(
                    f"target_keys have width {self.target_keys.shape[1]} but the module takes inputs of width "
                    f"{w.shape[1]}; collect them with module_keys(..., average=False) at this module"
                )
            values = self.target_keys @ w.T
        return closed_form_edit(w, self.keys, values, preserve=self.preserve, lam=self.lam, ridge=self.ridge)

    def delta(self, model: Model) -> torch.Tensor:
        """``ΔW`` [out, in], float32 on CPU."""
        return self.solve(model)[1].float()

    def edited_weight(self, model: Model) -> torch.Tensor:
        """``W'`` (float32, CPU); the model is not changed."""
        return self.solve(model)[0].float()

    def resolve(self, model: Model) -> Plan:
        """``LinearDelta`` (``y + ΔW x``) on the module."""
        op = LinearDelta(self.solve(model)[1].float())
        return Plan(type(self).__name__, (_module_step(model, self.layer, self.module, op, self.tokens),))

    def weights(self, model: Model) -> tuple[WeightEdit, ...]:
        """``W += ΔW`` at the module."""
        require_all_tokens(self, "MultiKeyRedirect")
        return (_module_delta(model, self.layer, self.module, self.solve(model)[1]),)

