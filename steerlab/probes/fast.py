"""Batched L2-regularised logistic regression: many independent problems in one Newton solve.

Every batch element ``k`` (a layer, a position, a fold, a class) solves scikit-learn's objective

    min_{w, b}  C * sum_i s_i * log(1 + exp(-y±_i (x_i . w + b)))  +  1/2 ||w||^2

(the intercept is not penalised, as in scikit-learn's ``lbfgs`` solver) by Newton's method with a
bracketed line search (6-7 steps on probe problems). Features are centred first when there is an
intercept (exact: the intercept absorbs the shift), and standardised for :func:`fit_standardized`.
Two exact formulations, in float64 unless asked otherwise:

* primal, when ``n >= 2 d``: the intercept is eliminated from each Newton system by a Schur
  complement, leaving a ``d x d`` system per problem;
* dual, when ``n < 2 d`` (a few hundred prompts, residual widths in the thousands): the optimum has
  ``w = X^T alpha`` (representer theorem), so after one Gram matrix ``K = X X^T`` (of the centred or
  standardised features, built block by block without materialising them) every Newton step is an
  ``n x n`` system and never touches the ``d`` features again.

Both forms solve symmetric positive definite systems (``>= I``) by batched Cholesky.

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

from steerlab.errors import EmptyInputError, InvalidValueError, ShapeError


def _loss(z, y, C, s):
    """``C * sum s * log(1 + exp(-y± z))`` from logits ``z`` [k, n] (= softplus(z) - y z for y in {0, 1})."""
    return C * (s * (torch.nn.functional.softplus(z) - y * z)).sum(-1)


def _newton(
    z: torch.Tensor,
    y: torch.Tensor,
    s: torch.Tensor,
    C: float,
    penalty: Callable[[torch.Tensor], torch.Tensor],
    direction: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]],
    params: list[torch.Tensor],
    *,
    max_iter: int,
    floor: float,
) -> tuple[list[torch.Tensor], int, bool]:
    """Damped Newton on logits ``z``; ``direction(resid, omega, active)`` returns (decrement, dz, *dparams)
    (problems outside ``active`` have converged: their decrement and step may be zero). A direction
    returns a zero decrement where the squared gradient norm is already at most ``gtol2`` (each form
    tests it before factorising); ``floor`` stops problems whose relative Newton decrement falls below
    what the precision can resolve.

    ``penalty(params)`` is the regulariser value. Parameters move by ``-step * dparams``.
    """
    k = z.shape[0]
    obj = _loss(z, y, C, s) + penalty(params)
    active = torch.ones(k, dtype=torch.bool)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        p = torch.sigmoid(z)
        decrement, dz, *dparams = direction(C * s * (p - y), C * s * p * (1 - p), active)
        active &= decrement > floor * (1.0 + obj.abs())
        if not bool(active.any()):
            return params, n_iter - 1, True
        step = _exact_step(z, dz, y, s, C, penalty, params, dparams, active)
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


def _exact_step(z, dz, y, s, C, penalty, params, dparams, active, *, iters: int = 4, most: float = 8.0) -> torch.Tensor:
    """Step length along the Newton direction by a few 1-D Newton iterations on the objective.

    Far from the optimum of nearly separable data the curvature falls as margins grow, so the best
    step along a Newton direction is often longer than 1; taking it saves whole Newton iterations.
    The regulariser is quadratic in the step, so three evaluations give it exactly. The slope is
    negative at 0 (a descent direction), so each evaluated slope narrows a bracket around the
    minimiser; a Newton proposal outside the bracket is replaced by the bracket's midpoint (an
    unguarded 1-D Newton step can land at t <= 0 where the curvature at t is small, and the fit
    then crawls at the smallest step).
    """
    def trial(t):
        return [q - _bcast(t, q) * dq for q, dq in zip(params, dparams)]

    k = z.shape[0]
    ones = torch.ones(k, dtype=z.dtype)
    p0, p1, p2 = penalty(params), penalty(trial(ones)), penalty(trial(2 * ones))
    quad = (p2 - 2 * p1 + p0) / 2  # penalty(t) = p0 + lin t + quad t^2
    lin = p1 - p0 - quad
    s_dz = C * s * dz
    s_dz2 = s_dz * dz
    t, lo, hi = ones.clone(), torch.zeros_like(ones), torch.full_like(ones, most)
    for _ in range(iters):
        pr = torch.sigmoid(z - t[:, None] * dz)
        slope = -((pr - y) * s_dz).sum(-1) + lin + 2 * quad * t
        curv = (pr * (1 - pr) * s_dz2).sum(-1) + 2 * quad
        below = slope < 0  # the minimiser lies beyond t
        lo, hi = torch.where(below, t, lo), torch.where(below, hi, t)
        proposal = t - slope / curv.clamp(min=torch.finfo(z.dtype).tiny)
        t = torch.where((proposal > lo) & (proposal < hi), proposal, (lo + hi) / 2)
    return torch.where(active & torch.isfinite(t) & (t > 0), t, ones)


def _cholesky(a: torch.Tensor) -> torch.Tensor:
    """Batched Cholesky factor of SPD systems (every system here is ``>= I``, so only non-finite inputs fail)."""
    chol, info = torch.linalg.cholesky_ex(a)  # LAPACK reports NaN/inf pivots through info
    if bool((info != 0).any()):
        raise ShapeError("non-finite values in the probe's Newton system: check the activations for inf/nan")
    return chol


def _chol_solve(chol: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a x = b`` for ``b`` ``[k, n]`` given ``chol = cholesky(a)`` (two triangular solves)."""
    half = torch.linalg.solve_triangular(chol, b[..., None], upper=False)
    return torch.linalg.solve_triangular(chol.transpose(1, 2), half, upper=True)[..., 0]


def _bcast(step: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return step.reshape(-1, *([1] * (like.dim() - 1)))


def _primal(x, y, s, C, fit_intercept, b0, *, gtol2, **kw):
    """Newton over (w, b): Schur complement for b, a d x d system per problem."""
    k, n, d = x.shape
    state = {"w": torch.zeros(k, d, dtype=x.dtype)}

    def direction(resid, omega, active):
        w = state["w"]
        both = torch.einsum("knd,knc->kdc", x, torch.stack([resid, omega], -1))  # X^T r and X^T ω in one pass
        grad_w, x_omega = both[..., 0] + w, both[..., 1]
        grad_b = resid.sum(-1) if fit_intercept else torch.zeros(k, dtype=x.dtype)
        small = ((grad_w**2).sum(-1) + grad_b**2 <= gtol2) | ~active
        grad_w, grad_b = torch.where(small[:, None], 0.0, grad_w), torch.where(small, 0.0, grad_b)
        z_feat = omega.clamp(min=0).sqrt()[..., None] * x
        rhs = grad_w
        if fit_intercept:  # (X^T Ω X - X^T ω ω^T X / Σω + I) dw = g_w - X^T ω g_b / Σω
            total = omega.sum(-1).clamp(min=1e-12)
            u = omega.clamp(min=0).sqrt() / total.sqrt()[:, None]
            z_feat = z_feat - u[..., None] * torch.einsum("kn,knd->kd", u, z_feat)[:, None, :]
            rhs = grad_w - x_omega * (grad_b / total)[:, None]
        m = z_feat.transpose(1, 2) @ z_feat
        m.diagonal(dim1=1, dim2=2).add_(1.0)
        dw = _chol_solve(_cholesky(m), rhs)
        x_dw = torch.einsum("knd,kd->kn", x, dw)
        db = (grad_b - (omega * x_dw).sum(-1)) / total if fit_intercept else torch.zeros_like(grad_b)
        return (grad_w * dw).sum(-1) + grad_b * db, x_dw + db[:, None], dw, db

    def penalty(params):
        state["w"] = params[0]
        return 0.5 * (params[0] ** 2).sum(-1)

    z = torch.zeros(k, n, dtype=x.dtype) + b0[:, None]
    (w, b), n_iter, ok = _newton(z, y, s, C, penalty, direction, [state["w"], b0], **kw)
    return w, b, n_iter, ok


def _matvec(m: torch.Tensor, v: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
    """``m[i] @ v[i]`` for symmetric ``m`` ``[k, n, n]`` and ``v`` ``[k, n]``; with ``idx``, ``m[idx[j]] @ v[j]``.

    Computed as ``v^T m`` (a row times a matrix): on CPU that batched product is several times faster
    than ``bmm`` with one right-hand column. A subset runs on the whole batch with zero rows for the
    others (cheaper than copying the selected matrices)."""
    if not len(v):
        return v.clone()
    if idx is not None and len(idx) != len(m):
        full = v.new_zeros(len(m), v.shape[-1])
        full[idx] = v
        return torch.bmm(full[:, None, :], m)[idx, 0]
    return torch.bmm(v[:, None, :], m)[:, 0]


def _dual_step(gram, idx, q, grad_b, omega, fit_intercept):
    """The dual Newton step (dα, K dα, db) of the problems ``idx`` (see :func:`_dual`)."""
    sq = omega.clamp(min=0).sqrt()
    b_mat = gram * sq[:, :, None] if len(idx) == len(gram) else gram.index_select(0, idx).mul_(sq[:, :, None])
    b_mat *= sq[:, None, :]  # Ω^{1/2} K Ω^{1/2}
    if fit_intercept:
        total = omega.sum(-1).clamp(min=torch.finfo(gram.dtype).tiny)
        q = q - omega * (grad_b / total)[:, None]
        u = sq / total.sqrt()[:, None]
        v = _matvec(b_mat, u)
        v -= 0.5 * (u * v).sum(-1, keepdim=True) * u
        b_mat = torch.baddbmm(b_mat, torch.stack([u, v], 2), torch.stack([v, u], 1), alpha=-1.0)  # P S P

        def proj(t):
            return t - u * (u * t).sum(-1, keepdim=True)
    else:

        def proj(t):
            return t

    b_mat.diagonal(dim1=1, dim2=2).add_(1.0)
    sol = _chol_solve(_cholesky(b_mat), proj(sq * _matvec(gram, q, idx)))
    d_alpha = q - sq * proj(sol)
    k_da = _matvec(gram, d_alpha, idx)
    db = (grad_b - (omega * k_da).sum(-1)) / total if fit_intercept else torch.zeros_like(grad_b)
    return d_alpha, k_da, db


def _dual(gram, y, s, C, fit_intercept, b0, *, gtol2, **kw):
    """Newton over (alpha, b) with w = X^T alpha, from the Gram matrix ``K = X X^T``: n x n SPD systems.

    The intercept is eliminated by a Schur complement: with Ω̃ = Ω - ω ω^T / Σω (ω the curvatures),
    the step solves (Ω̃ K + I) dα = q, i.e. dα = q - Z^T (I + Z K Z^T)^{-1} Z K q with
    Z = P Ω^{1/2} and P the projector that removes u = Ω^{1/2} 1 / sqrt(Σω). ``I + Z K Z^T`` is
    symmetric and >= I, so a Cholesky factorisation always exists (no pivoting to fail).
    Problems that have converged are left out of later factorisations. Returns (alpha, b, n_iter, ok).
    """
    k, n, _ = gram.shape
    state: dict[str, torch.Tensor] = {}

    def direction(resid, omega, active):
        alpha = state["alpha"]
        idx = torch.nonzero(active).flatten()
        q = resid[idx] + alpha[idx]  # the w-space gradient is X^T q
        grad_b = resid[idx].sum(-1) if fit_intercept else gram.new_zeros(len(idx))
        small = (q * _matvec(gram, q, idx)).sum(-1) + grad_b**2 <= gtol2[idx]  # ||X^T q||^2 + g_b^2
        idx, q, grad_b = idx[~small], q[~small], grad_b[~small]
        d_alpha, k_da, db = gram.new_zeros(k, n), gram.new_zeros(k, n), gram.new_zeros(k)
        if len(idx):
            d_alpha[idx], k_da[idx], db[idx] = _dual_step(gram, idx, q, grad_b, omega[idx], fit_intercept)
        if not bool(torch.isfinite(d_alpha).all()):
            raise ShapeError("non-finite values in the probe's Newton system: check the activations for inf/nan")
        decrement = ((resid + alpha) * k_da).sum(-1) + (resid.sum(-1) * db if fit_intercept else 0.0)
        return decrement, k_da + db[:, None], d_alpha, db, k_da

    def penalty(params):  # params = [alpha, b, K alpha]: K alpha moves with alpha, no product needed
        state["alpha"] = params[0]
        return 0.5 * (params[0] * params[2]).sum(-1)

    z = gram.new_zeros(k, n) + b0[:, None]
    zeros = gram.new_zeros(k, n)
    (alpha, b, _), n_iter, ok = _newton(z, y, s, C, penalty, direction, [zeros, b0, zeros.clone()], **kw)
    return alpha, b, n_iter, ok


def _affine(x, weight, *, center: bool, scale: bool, eps: float = 1e-8):
    """(shift or None, spread or None, ``(x - shift) / spread``) of ``x`` ``[k, n, d]``: ``shift`` the
    ``weight``-ed feature mean (when ``center`` or ``scale``), ``spread`` the weighted standard deviation
    (when ``scale``: scikit-learn's StandardScaler, two-pass so without cancellation)."""
    if not (center or scale):
        return None, None, x
    rows = weight[:, None, :]
    shift = torch.bmm(rows, x)[:, 0]
    x = x - shift[:, None]
    if not scale:
        return shift, None, x
    spread = torch.bmm(rows, x * x)[:, 0].sqrt().clamp(min=eps)
    return shift, spread, x.div_(spread[:, None])


def _affine_gram(x, weight, *, center: bool, scale: bool, chunk: int = 4):
    """Gram matrices of the features :func:`_affine` gives, without materialising them all: a few
    problems at a time, so each transformed block is still in cache for its Gram product and no
    full-size temporary is allocated (at these sizes a fresh one costs page faults comparable to the
    arithmetic). Returns (gram, shift or None, spread or None)."""
    k, n, _ = x.shape
    gram, shifts, spreads = x.new_empty(k, n, n), [], []
    for lo in range(0, k, chunk):
        shift, spread, part = _affine(x[lo : lo + chunk], weight[lo : lo + chunk], center=center, scale=scale)
        torch.bmm(part, part.transpose(1, 2), out=gram[lo : lo + chunk])
        shifts.append(shift)
        spreads.append(spread)
    return gram, (torch.cat(shifts) if center or scale else None), (torch.cat(spreads) if scale else None)


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
    ``tol`` has scikit-learn's meaning: stop once the gradient of the sample-averaged objective is at
    most ``tol`` (here in 2-norm, which implies sklearn's per-coordinate test). ``dtype`` is the
    compute precision: float64 (default) solves to ``tol=1e-12`` (in practice until the Newton
    decrement vanishes); float32 is 3-4x faster and stops at ``tol=1e-4``, sklearn's default, or
    where its resolution ends (a relative Newton decrement below 1e-5).
    Pass a dict as ``info`` to receive ``n_iter`` (Newton steps taken), ``converged`` and ``form``.
    With an intercept the features are centred first (an exact reparametrisation: the intercept
    absorbs the shift), which keeps float32 Gram matrices of activations with a large common
    component well resolved.
    """
    return _fit_logistic(
        x, y, C=C, fit_intercept=fit_intercept, sample_weight=sample_weight, max_iter=max_iter, tol=tol, dtype=dtype, info=info, center=fit_intercept
    )


def _fit_logistic(x, y, *, C, fit_intercept, sample_weight, max_iter, tol, dtype, info, center: bool, scale: bool = False):
    """:func:`fit_logistic` on the features ``(x - mean) / std`` (``center``: subtract the weighted
    mean; ``scale``: also divide by the weighted standard deviation); the weights returned act on the
    raw features: ``x . w + b`` gives the same logits."""
    if x.dim() != 3:
        raise ShapeError(f"x must be [problems, samples, features]; got {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise EmptyInputError("no training samples")
    if C <= 0:
        raise InvalidValueError(f"C must be positive (inverse regularisation strength); got {C}")
    if dtype not in (torch.float32, torch.float64):
        raise InvalidValueError(f"dtype must be torch.float32 or torch.float64; got {dtype}")
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
    # scikit-learn stops lbfgs when every coordinate of the gradient of the sample-averaged objective (ours
    # divided by C * sum(s)) is at most tol; a 2-norm at most tol is sufficient, tested before each
    # factorisation so converged problems cost no further solve
    gtol2 = (tol * C * s.sum(-1)) ** 2
    # the smallest relative Newton decrement each precision resolves on sums over a few thousand samples
    floor = 1e-12 if dtype == torch.float64 else 1e-5
    options = {"max_iter": max_iter, "gtol2": gtol2, "floor": floor}
    weight = s / s.sum(-1, keepdim=True).clamp(min=1e-12)
    if n < 2 * d:  # dual: per problem 2n²d for the Gram matrix once + n³/3 a step (primal: 2nd² + d³/3 a step)
        form = "dual"
        gram, shift, spread = _affine_gram(x, weight, center=center, scale=scale)
        alpha, b, n_iter, converged = _dual(gram, y, s, C, fit_intercept, b0, **options)
        # the weights on the transformed features, ((X - 1 shift^T) / spread)^T alpha, from a row times raw X
        w = torch.bmm(alpha[:, None, :], x)[:, 0]
        if shift is not None:
            w -= shift * alpha.sum(-1, keepdim=True)
        if spread is not None:
            w /= spread
    else:
        form = "primal"
        shift, spread, features = _affine(x, weight, center=center, scale=scale)
        w, b, n_iter, converged = _primal(features, y, s, C, fit_intercept, b0, **options)
    if spread is not None:  # weights on the raw features
        w = w / spread
    if info is not None:
        info.update(n_iter=n_iter, converged=converged, form=form)
    return w, (b if shift is None else b - (w * shift).sum(-1))


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
    options = {**fit_logistic.__kwdefaults__, **kwargs, "C": C, "sample_weight": sample_weight}
    return _fit_logistic(x, y, center=True, scale=True, **options)
