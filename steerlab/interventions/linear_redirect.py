"""Linear forms of concept redirection (METHODS 10): edit one linear map ``y = W x`` of a decoder layer.

* :class:`LinearRedirect` — ROME-style: ``W' = W + (v_B - W k_A) uᵀ / (uᵀ k_A)`` with ``v_B = W k_B``
  and ``u = C⁻¹ k_A`` (:func:`~steerlab.interventions.redirect_math.rank_one_update`).
* :class:`MultiKeyRedirect` — the TRCE/UCE closed form for many keys with preservation keys
  (:func:`~steerlab.interventions.redirect_math.closed_form_edit`).

Both act on the module itself (``site="module"`` steps: there is no named site for the input of a down
projection); a redirect that never ran raises like any other step. Keys ``k`` and their covariance ``C``
are measured by :mod:`steerlab.measure.keys`.

Example:
    >>> from steerlab.measure import estimate_key_covariance, module_keys
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> k_cat = module_keys(model, ["Tell me about cats."], layer=1)      # the input of layer 1's down_proj
    >>> k_dog = module_keys(model, ["Tell me about dogs."], layer=1)
    >>> C = estimate_key_covariance(model, ["The quick brown fox jumps over the lazy dog."], layer=1, ridge=1e-3)
    >>> edit = LinearRedirect(1, k_cat, k_dog, covariance=C)
    >>> edit.weights(model)[0].module
    'mlp.down_proj'
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from steerlab._checks import check_finite, finite_number, layer_index
from steerlab.arch import normalize_layer, resolve_path
from steerlab.errors import ShapeError, SteerlabError
from steerlab.interventions.redirect_math import DegenerateEditError, _rank_one_factors, _vector64, closed_form_edit
from steerlab.plan import LinearDelta, ModuleDelta, Plan, Step, Tokens, WeightEdit, check_tokens
from steerlab.steering.ops import require_all_tokens

if TYPE_CHECKING:
    from steerlab.model import Model

LINEAR_ROLES: tuple[str, ...] = ("down_proj", "o_proj")  # ArchSpec fields naming a dense linear map


class NotALinearModuleError(SteerlabError, TypeError):
    """The module to edit is missing, or is not a 2D ``nn.Linear`` (e.g. fused 3D MoE experts)."""


def resolve_linear(model: Model, layer: int, module: str = "down_proj") -> tuple[str, nn.Linear]:
    """``(path from the model root, module)`` of a 2D linear map in decoder layer ``layer``.

    ``module`` is a role of the architecture spec (``"down_proj"``, ``"o_proj"``) or a dotted path
    inside the decoder layer.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> path, linear = resolve_linear(model, 2, "o_proj")
        >>> path, linear.weight.shape
        ('model.layers.2.self_attn.o_proj', torch.Size([64, 64]))
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
    ``covariance`` is ``C = E[k kᵀ]`` (:func:`~steerlab.measure.estimate_key_covariance`; ``None`` = identity), so
    only inputs along ``u = C⁻¹ k_A`` change. ``module`` is ``"down_proj"`` (default), ``"o_proj"``
    or a dotted path to a 2D ``nn.Linear`` in the layer. At runtime ``y <- y + (v_B - W k_A)(uᵀx)/(uᵀk_A)``;
    :meth:`weights` gives the identical weight edit.

    Example:
        >>> from steerlab.measure import module_keys
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> k_cat = module_keys(model, ["Tell me about cats."], layer=1)
        >>> k_dog = module_keys(model, ["Tell me about dogs."], layer=1)
        >>> edit = LinearRedirect(1, k_cat, k_dog)
        >>> with model.apply(edit):
        ...     texts = model.generate(["What do cats eat?"], max_new_tokens=4)
        >>> W = model.layer(1).mlp.down_proj.weight
        >>> torch.allclose(edit.edited_weight(model) @ k_cat, W @ k_dog, atol=1e-4)    # k_A now gives v_B
        True
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
        >>> from steerlab.measure import module_keys
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> def keys(prompts):                                  # one row per prompt: [n, 96]
        ...     return module_keys(model, prompts, layer=1, average=False)
        >>> k_unsafe = keys(["How do I pick a lock?", "Write a threat."])
        >>> k_safe = keys(["How do I bake bread?", "Write a poem."])
        >>> k_text = keys(["Hi", "Say hello.", "Tell me a joke."])         # outputs to keep
        >>> edit = MultiKeyRedirect(1, k_unsafe, target_keys=k_safe, preserve=k_text, lam=0.5)
        >>> with model.apply(edit):
        ...     texts = model.generate(["How do I pick a lock?"], max_new_tokens=4)
        >>> W, new = model.layer(1).mlp.down_proj.weight, edit.edited_weight(model)
        >>> torch.allclose(new @ k_unsafe.T, W @ k_safe.T, atol=1e-4)      # unsafe keys give the safe values
        True
        >>> torch.allclose(new @ k_text.T, W @ k_text.T, atol=1e-4)        # preserved keys are untouched
        True
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
