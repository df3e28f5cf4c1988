"""Batched L2-regularised logistic regression: many independent problems in one Newton solve.

Every batch element ``k`` (a layer, a position, a fold, a class) solves scikit-learn's objective

    min_{w, b}  C * sum_i s_i * log(1 + exp(-y±_i (x_i . w + b)))  +  1/2 ||w||^2

(the intercept is not penalised, as in scikit-learn's ``lbfgs`` solver) by Newton's method with a
backtracking line search (~10 steps). Two exact formulations, in float64 unless asked otherwise:

* primal, when ``n >= d``: the intercept is eliminated from each Newton system by a Schur
  complement, leaving a ``d x d`` system per problem;
* dual, when ``n < d`` (a few hundred prompts, residual widths in the thousands): the optimum has
  ``w = X^T alpha`` (representer theorem), so after one Gram matrix ``K = X X^T`` every Newton step
  is an ``(n + 1) x (n + 1)`` system and never touches the ``d`` features again.

The systems are solved with batched LU (``linalg.solve``): with the MKL build torch ships for CPU
it is several times faster than batched Cholesky on these sizes.

Example:
    >>> import torch
    >>> x = torch.randn(3, 200, 5, dtype=torch.float64); y = (x[..., 0] > 0).double()
    >>> w, b = fit_logistic(x, y, C=1.0)
    >>> w.shape, bool((w[:, 0] > 0).all())
    (torch.Size([3, 5]), True)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from steerlab.errors import EmptyInputError, ShapeError


def _loss(z, y, C, s):
    """``C * sum s * log(1 + exp(-y± z))`` from logits ``z`` [k, n] (= softplus(z) - y z for y in {0, 1})."""
    return C * (s * (torch.nn.functional.softplus(z) - y * z)).sum(-1)


def _newton(
    z: torch.Tensor,
    y: torch.Tensor,
    s: torch.Tensor,
    C: float,
    penalty: Callable[[torch.Tensor], torch.Tensor],
    direction: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]],
    params: list[torch.Tensor],
    *,
    max_iter: int,
    tol: float,
) -> tuple[list[torch.Tensor], int, bool]:
    """Damped Newton on logits ``z``; ``direction(resid, omega)`` returns (decrement, dz, *dparams).

    ``penalty(params)`` is the regulariser value. Parameters move by ``-step * dparams``.
    """
    k = z.shape[0]
    obj = _loss(z, y, C, s) + penalty(params)
    active = torch.ones(k, dtype=torch.bool)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        p = torch.sigmoid(z)
        decrement, dz, *dparams = direction(C * s * (p - y), C * s * p * (1 - p))
        active &= decrement > tol * (1.0 + obj.abs())
        if not bool(active.any()):
            return params, n_iter - 1, True
        step = torch.ones(k, dtype=z.dtype)
        for _ in range(30):  # backtracking (Armijo), per problem
            trial = [q - _bcast(step, q) * dq for q, dq in zip(params, dparams)]
            new_obj = _loss(z - step[:, None] * dz, y, C, s) + penalty(trial)
            ok = (new_obj <= obj - 1e-4 * step * decrement) | ~active
            if bool(ok.all()):
                break
            step = torch.where(ok, step, step * 0.5)
        step = torch.where(active, step, torch.zeros_like(step))
        params = [q - _bcast(step, q) * dq for q, dq in zip(params, dparams)]
        z = z - step[:, None] * dz
        obj = _loss(z, y, C, s) + penalty(params)
    return params, n_iter, not bool(active.any())


def _solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched ``a x = b`` by LU; problems LU cannot take (MKL pivoting failures, singular systems)
    fall back to least squares one by one."""
    if not bool(torch.isfinite(a).all()) or not bool(torch.isfinite(b).all()):
        raise ShapeError("non-finite values in the probe's Newton system: check the activations for inf/nan")
    try:
        x, info = torch.linalg.solve_ex(a, b)
        bad = torch.nonzero(info != 0).flatten().tolist()
    except RuntimeError:  # seen once on CI: MKL rejected the batched pivoting; solve one by one instead
        x, bad = torch.empty_like(b), list(range(a.shape[0]))
    if not bool(torch.isfinite(x).all()):
        bad = sorted(set(bad) | set(torch.nonzero(~torch.isfinite(x).flatten(1).all(1)).flatten().tolist()))
    for i in bad:
        x[i] = torch.linalg.lstsq(a[i], b[i], driver="gelsd").solution
    return x


def _bcast(step: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return step.reshape(-1, *([1] * (like.dim() - 1)))


def _primal(x, y, s, C, fit_intercept, b0, **kw):
    """Newton over (w, b): Schur complement for b, a d x d system per problem."""
    k, n, d = x.shape
    state = {"w": torch.zeros(k, d, dtype=x.dtype)}

    def direction(resid, omega):
        w = state["w"]
        both = torch.einsum("knd,knc->kdc", x, torch.stack([resid, omega], -1))  # X^T r and X^T ω in one pass
        grad_w, x_omega = both[..., 0] + w, both[..., 1]
        grad_b = resid.sum(-1) if fit_intercept else torch.zeros(k, dtype=x.dtype)
        z_feat = omega.clamp(min=0).sqrt()[..., None] * x
        rhs = grad_w
        if fit_intercept:  # (X^T Ω X - X^T ω ω^T X / Σω + I) dw = g_w - X^T ω g_b / Σω
            total = omega.sum(-1).clamp(min=1e-12)
            u = omega.clamp(min=0).sqrt() / total.sqrt()[:, None]
            z_feat = z_feat - u[..., None] * torch.einsum("kn,knd->kd", u, z_feat)[:, None, :]
            rhs = grad_w - x_omega * (grad_b / total)[:, None]
        m = z_feat.transpose(1, 2) @ z_feat
        m.diagonal(dim1=1, dim2=2).add_(1.0)
        dw = _solve(m, rhs[..., None])[..., 0]
        x_dw = torch.einsum("knd,kd->kn", x, dw)
        db = (grad_b - (omega * x_dw).sum(-1)) / total if fit_intercept else torch.zeros_like(grad_b)
        return (grad_w * dw).sum(-1) + grad_b * db, x_dw + db[:, None], dw, db

    def penalty(params):
        state["w"] = params[0]
        return 0.5 * (params[0] ** 2).sum(-1)

    z = torch.zeros(k, n, dtype=x.dtype) + b0[:, None]
    (w, b), n_iter, ok = _newton(z, y, s, C, penalty, direction, [state["w"], b0], **kw)
    return w, b, n_iter, ok


def _dual(x, y, s, C, fit_intercept, b0, **kw):
    """Newton over (alpha, b) with w = X^T alpha: one Gram matrix, then (n + 1) x (n + 1) systems."""
    k, n, _ = x.shape
    gram = x @ x.transpose(1, 2)  # [k, n, n], the only pass over the features before the last
    state = {"ka": torch.zeros(k, n, dtype=x.dtype)}  # K alpha, kept for the penalty 1/2 alpha^T K alpha

    def direction(resid, omega):
        alpha = state["alpha"]
        r = resid + alpha  # gradient in w-space is X^T r
        grad_b = resid.sum(-1) if fit_intercept else torch.zeros(k, dtype=x.dtype)
        a = omega[:, :, None] * gram
        a.diagonal(dim1=1, dim2=2).add_(1.0)  # Ω K + I
        if fit_intercept:  # [[Ω K + I, ω], [ω^T K, Σω]] [dα; db] = [r; g_b]
            top = torch.cat([a, omega[:, :, None]], 2)
            bottom = torch.cat([torch.einsum("kn,knm->km", omega, gram), omega.sum(-1, keepdim=True)], 1)[:, None, :]
            sol = _solve(torch.cat([top, bottom], 1), torch.cat([r, grad_b[:, None]], 1)[..., None])[..., 0]
            d_alpha, db = sol[:, :n], sol[:, n]
        else:
            d_alpha, db = _solve(a, r[..., None])[..., 0], torch.zeros_like(grad_b)
        k_da = torch.einsum("knm,km->kn", gram, d_alpha)
        state["k_da"] = k_da
        return (r * k_da).sum(-1) + grad_b * db, k_da + db[:, None], d_alpha, db

    def penalty(params):
        state["alpha"] = params[0]
        return 0.5 * (params[0] * torch.einsum("knm,km->kn", gram, params[0])).sum(-1)

    z = torch.zeros(k, n, dtype=x.dtype) + b0[:, None]
    (alpha, b), n_iter, ok = _newton(z, y, s, C, penalty, direction, [torch.zeros(k, n, dtype=x.dtype), b0], **kw)
    return torch.einsum("knd,kn->kd", x, alpha), b, n_iter, ok


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    C: float = 1.0,
    fit_intercept: bool = True,
    sample_weight: torch.Tensor | None = None,
    max_iter: int = 50,
    tol: float | None = None,
    dtype: torch.dtype = torch.float64,
    info: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``k`` logistic regressions at once; returns weights ``[k, d]`` and intercepts ``[k]``.

    ``x`` is ``[k, n, d]``; ``y`` is ``[n]`` or ``[k, n]`` with values in {0, 1};
    ``sample_weight`` ``[n]`` or ``[k, n]`` (e.g. 0 for rows outside a cross-validation fold).
    ``dtype`` is the compute precision: float64 (default) solves to ``tol=1e-12``; float32 is about
    1.5x faster and stops at ``tol=1e-4`` (sklearn's default tolerance), its floor in single precision.
    Pass a dict as ``info`` to receive ``n_iter`` (Newton steps taken), ``converged`` and ``form``.
    """
    if x.dim() != 3:
        raise ShapeError(f"x must be [problems, samples, features]; got {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise EmptyInputError("no training samples")
    if C <= 0:
        raise ValueError(f"C must be positive (inverse regularisation strength); got {C}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64; got {dtype}")
    if tol is None:
        tol = 1e-12 if dtype == torch.float64 else 1e-4
    x = x.to(dtype)
    k, n, d = x.shape
    y = y.to(x).expand(k, n) if y.dim() == 1 else y.to(x)
    if y.shape != (k, n):
        raise ShapeError(f"labels must be [{n}] or [{k}, {n}]; got {tuple(y.shape)}")
    s = torch.ones(k, n, dtype=x.dtype) if sample_weight is None else sample_weight.to(x).expand(k, n)
    b0 = torch.zeros(k, dtype=x.dtype)
    if fit_intercept:  # start at the weighted log-odds: a better first point than 0
        b0 = ((s * y).sum(-1).clamp(min=1e-3) / (s * (1 - y)).sum(-1).clamp(min=1e-3)).log()
    form = _dual if n < d else _primal
    w, b, n_iter, converged = form(x, y, s, C, fit_intercept, b0, max_iter=max_iter, tol=tol)
    if info is not None:
        info.update(n_iter=n_iter, converged=converged, form=form.__name__.strip("_"))
    return w, b


def standardize_stats(
    x: torch.Tensor, *, sample_weight: torch.Tensor | None = None, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std over samples of ``x`` ``[k, n, d]`` (weighted), float64."""
    x = x.to(torch.float64)
    if sample_weight is None:
        return x.mean(1), x.std(1, unbiased=False).clamp(min=eps)
    s = sample_weight.to(x).expand(x.shape[:2])[..., None]
    total = s.sum(1).clamp(min=1e-12)
    mean = (s * x).sum(1) / total
    var = (s * (x - mean[:, None]) ** 2).sum(1) / total
    return mean, var.sqrt().clamp(min=eps)


def fit_standardized(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    C: float = 1.0,
    sample_weight: torch.Tensor | None = None,
    standardize: bool = True,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fit_logistic` on standardised features; weights mapped back to raw coordinates.

    Equivalent to a scikit-learn ``Pipeline(StandardScaler(), LogisticRegression(C=C))`` whose
    weights are folded into one affine map: ``x . w_raw + b_raw`` gives the same logits.
    """
    if not standardize:
        return fit_logistic(x, y, C=C, sample_weight=sample_weight, **kwargs)
    mean, std = standardize_stats(x, sample_weight=sample_weight)
    xs = (x.to(torch.float64) - mean[:, None]) / std[:, None]
    w, b = fit_logistic(xs, y, C=C, sample_weight=sample_weight, **kwargs)
    w_raw = w / std
    return w_raw, b - (w_raw * mean).sum(-1)
