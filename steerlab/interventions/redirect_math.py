"""The maths of concept redirection (METHODS 10): residual factors, ROME's rank-one update, the TRCE/UCE closed form.

Plain float64 tensor functions with no model in sight; the values in :mod:`steerlab.interventions.redirect`
and :mod:`steerlab.interventions.linear_redirect` call them.

Example:
    >>> import torch
    >>> W = torch.eye(2, dtype=torch.float64)
    >>> (W + rank_one_update(W, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))).tolist()
    [[0.0, 0.0], [1.0, 1.0]]
"""

from __future__ import annotations

import torch

from steerlab.errors import EmptyInputError, InvalidValueError, ShapeError, SteerlabError


class DegenerateEditError(SteerlabError, ValueError):
    """An edit that would do nothing or divide by zero (concept equals target, zero key, singular C)."""


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
        raise InvalidValueError(f"lam and ridge must be >= 0; got lam={lam}, ridge={ridge}")
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
