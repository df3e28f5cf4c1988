"""Render plans as hooks on a transformers model (inside a :class:`~steerlab.hooks.HookSession`).

Named-site steps become ``(site, layer, fn)`` functions (:func:`site_functions`, which the interop
bridges reuse); ``site="module"`` steps become counted torch hooks on the module (:func:`render`).
Token selection (``tokens="prompt"`` / ``"generated"``) is applied here, the same way for every op.

Example:
    >>> import torch
    >>> from steerlab.plan import Add, Plan, Step
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> plan = Plan("demo", (Step(layer=1, site="resid_pre", op=Add(torch.ones(model.d_model))),))
    >>> with model.hooks() as session:
    ...     handles = render(plan, session)
    ...     _ = model.hf(**model.encode(["Hi"]).model_inputs())
    >>> handles[0].count
    1
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from steerlab import moe
from steerlab._checks import linear_parts
from steerlab.arch import resolve_path, selection_scores
from steerlab.errors import ShapeError, UnknownPositionError, UnknownSiteError
from steerlab.hooks import UNCHANGED, HookContext, HookHandle, HookSession, Unchanged
from steerlab.plan import (
    Add,
    ColumnDelta,
    DropShared,
    LinearDelta,
    Plan,
    Project,
    RankOne,
    Route,
    SetHeads,
    Step,
    Tokens,
)

if TYPE_CHECKING:
    from steerlab.model import Model

SiteFn = Callable[[torch.Tensor, HookContext], "torch.Tensor | Unchanged | None"]


class Cast:
    """A tensor converted once per (dtype, device) instead of on every hook call."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self._cache: dict[tuple, torch.Tensor] = {}

    def like(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.dtype, x.device)
        if key not in self._cache:
            self._cache[key] = self.tensor.to(dtype=x.dtype, device=x.device)
        return self._cache[key]


# ----- token selection -----
def token_mask(x: torch.Tensor, ctx: HookContext, tokens: Tokens) -> torch.Tensor | None:
    """``[1, s, 1, ...]`` mask (as many dims as ``x``) of the tokens of this call that ``tokens`` selects;
    ``None`` for all of them."""
    if tokens == "all":
        return None
    prompt_len = ctx.step.prompt_length
    if prompt_len is None:
        raise UnknownPositionError(
            f"tokens={tokens!r} needs the prompt length: generate through model.generate(...), or use tokens='all'"
        )
    absolute = ctx.step.past_length + torch.arange(x.shape[1], device=x.device)
    keep = absolute < prompt_len if tokens == "prompt" else absolute >= prompt_len
    return keep.view(1, -1, *([1] * (x.dim() - 2)))


def masked(x: torch.Tensor, new: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | Unchanged:
    """``new`` where ``mask`` selects a token, ``x`` elsewhere; :data:`~steerlab.hooks.UNCHANGED` (the hook
    did not act, the call does not count as a firing) when the mask selects no token of this call."""
    if mask is None:
        return new
    if not bool(mask.any()):
        return UNCHANGED
    return torch.where(mask, new, x)


def _selected(edit: Callable[[torch.Tensor], torch.Tensor], tokens: Tokens) -> SiteFn:
    """A site function applying ``edit`` to the tokens ``tokens`` selects."""
    if tokens == "all":
        return lambda x, ctx: edit(x)

    def fn(x: torch.Tensor, ctx: HookContext) -> torch.Tensor | Unchanged:
        mask = token_mask(x, ctx, tokens)
        if mask is not None and not bool(mask.any()):
            return UNCHANGED
        return masked(x, edit(x), mask)

    return fn


# ----- residual operations -----
def _add(op: Add) -> Callable[[torch.Tensor], torch.Tensor]:
    vec = Cast(op.vector)
    return lambda x: x + vec.like(x)


def _project(op: Project) -> Callable[[torch.Tensor], torch.Tensor]:
    unit, value = Cast(op.unit), float(op.value)

    def edit(x: torch.Tensor) -> torch.Tensor:  # x + (value - x.r) r; the dot product in float32 (faster on CPU)
        wide = x.float()  # x itself when it is float32
        dot = wide @ unit.like(wide)
        return torch.addcmul(x, (value - dot).unsqueeze(-1).to(x.dtype), unit.like(x))

    return edit


def _rank_one(op: RankOne) -> Callable[[torch.Tensor], torch.Tensor]:
    left, right = Cast(op.left), Cast(op.right)
    return lambda x: x + (x @ right.like(x))[..., None] * left.like(x)


# ----- heads -----
def norm_ratio(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """``before / after``, and 1 where there is nothing left to rescale."""
    tiny = torch.finfo(after.dtype).tiny
    return torch.where(after > tiny, before / after.clamp_min(tiny), torch.ones_like(after))


def _heads(step: Step, model: Model) -> list[tuple[str, SiteFn]]:
    op: SetHeads = step.op  # type: ignore[assignment]
    idx = torch.tensor(op.heads)
    fill = None if op.fill is None else Cast(op.fill)

    def ablate(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[..., idx.to(x.device), :] = 0.0 if fill is None else fill.like(x)
        return out

    if not op.rescale_norm:
        return [("head", _selected(ablate, step.tokens))]
    spec = model.spec
    weight, bias = linear_parts(spec.layer_module(model.hf, step.layer, spec.o_proj), what="head ablation with rescale_norm (o_proj)")
    if bias is None:  # o_proj(c * x) == c * o_proj(x): rescale exactly on the head site

        def rescaled(x: torch.Tensor) -> torch.Tensor:
            new = ablate(x)
            w = weight.to(x.dtype)
            before = nn.functional.linear(x.flatten(-2), w).norm(dim=-1, keepdim=True)
            after = nn.functional.linear(new.flatten(-2), w).norm(dim=-1, keepdim=True)
            return new * norm_ratio(before, after)[..., None]

        return [("head", _selected(rescaled, step.tokens))]
    if spec.attn_out != spec.attn:
        raise ShapeError(
            f"rescale_norm on a {spec.model_type} model needs the o_proj output, but its o_proj has a bias and its "
            f"attn_out site is {spec.attn_out!r} (not the attention output); use rescale_norm=False"
        )
    state: dict[str, torch.Tensor] = {}

    def remember(x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x.flatten(-2), weight.to(x.dtype), bias.to(x.dtype))
        state["norm"] = y.norm(dim=-1, keepdim=True)
        return ablate(x)

    def rescale(y: torch.Tensor, ctx: HookContext) -> torch.Tensor:  # tokens left alone have ratio 1
        return y * norm_ratio(state.pop("norm"), y.norm(dim=-1, keepdim=True))

    return [("head", _selected(remember, step.tokens)), ("attn_out", rescale)]


# ----- experts -----
def _route(step: Step, model: Model) -> Callable[[torch.Tensor], torch.Tensor]:
    op: Route = step.op  # type: ignore[assignment]
    idx = torch.tensor(op.experts)
    if op.mode == "off":

        def off(logits: torch.Tensor) -> torch.Tensor:
            out = logits.clone()
            out[..., idx.to(logits.device)] = float("-inf")
            return out

        return off
    router = moe.router_of(model, step.layer)
    free = int(router.top_k) - len(op.experts)

    def force(logits: torch.Tensor) -> torch.Tensor:
        forced = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        forced[idx.to(logits.device)] = True
        keep = forced.expand_as(logits).clone()
        if free > 0:
            others = selection_scores(model.spec, router, logits).masked_fill(forced, float("-inf"))
            keep.scatter_(-1, others.topk(free, dim=-1).indices, True)
        return logits.masked_fill(~keep, float("-inf"))

    return force


def _drop_shared(step: Step) -> list[tuple[str, SiteFn]]:
    state: dict[str, torch.Tensor] = {}

    def keep_routed(x: torch.Tensor, ctx: HookContext) -> None:
        state["routed"] = x

    def routed_only(x: torch.Tensor) -> torch.Tensor:
        return state.pop("routed").reshape(x.shape).to(x.dtype)

    return [("expert_out", keep_routed), ("mlp_out", _selected(routed_only, step.tokens))]


def residual_edit(op: Add | Project | RankOne) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function ``x -> x'`` of a residual-stream operation, for activations ``[..., d]`` of any dtype
    (the vLLM backend reuses it).

    Example:
        >>> residual_edit(Add(torch.ones(2)))(torch.zeros(3, 2)).tolist()
        [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
    """
    if isinstance(op, Add):
        return _add(op)
    if isinstance(op, Project):
        return _project(op)
    if isinstance(op, RankOne):
        return _rank_one(op)
    raise UnknownSiteError(f"{type(op).__name__} is not a residual-stream operation (Add, Project, RankOne)")


def site_functions(step: Step, model: Model) -> list[tuple[str, SiteFn]]:
    """The ``(site, fn)`` pairs that carry out a named-site ``step`` (interop bridges reuse these)."""
    op = step.op
    if isinstance(op, Add | Project | RankOne):
        return [(step.site, _selected(residual_edit(op), step.tokens))]
    if isinstance(op, SetHeads):
        return _heads(step, model)
    if isinstance(op, Route):
        return [("router_logits", _selected(_route(step, model), step.tokens))]
    if isinstance(op, DropShared):
        return _drop_shared(step)
    raise UnknownSiteError(f"{type(op).__name__} acts on a module, not a named site ({step.where})")


# ----- module steps -----
def _linear_hook(op: LinearDelta, step: Step, ctx: HookContext):
    up = Cast(op.up)
    down = None if op.down is None else Cast(op.down)

    def hook(mod, args, kwargs, output):
        x = args[0] if args else kwargs["input"]
        change = x @ up.like(x).T if down is None else (x @ down.like(x)) @ up.like(x).T
        if step.tokens == "all":
            return output + change
        if output.dim() != 3:
            raise ShapeError(f"tokens={step.tokens!r} needs [batch, seq, width] outputs at {step.where}; use tokens='all'")
        return masked(output, output + change, token_mask(output, ctx, step.tokens))

    return hook


def _columns_hook(op: ColumnDelta):
    cols, delta = torch.tensor(op.columns), Cast(op.delta)

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["input"]
        return output + x[..., cols.to(x.device)] @ delta.like(output)

    return hook


def _experts_hook(model: Model, ops: list[ColumnDelta]):
    items = [(op.expert, torch.tensor(op.columns), Cast(op.delta)) for op in ops]

    def hook(module, args, kwargs, output):
        out, rebuild = (output, None) if isinstance(output, torch.Tensor) else (output[0], output)
        hidden, index, weights = moe.routing_inputs(module, args, kwargs)
        x = hidden.reshape(-1, hidden.shape[-1])
        index = index.reshape(x.shape[0], -1)
        weights = weights.reshape(x.shape[0], -1)
        flat = out.reshape(-1, out.shape[-1])
        for expert, cols, delta in items:
            chosen = index == expert  # [T, k]
            rows = torch.nonzero(chosen.any(-1)).flatten()
            if rows.numel() == 0:
                continue
            w = (weights * chosen).sum(-1)[rows]
            act = moe.expert_activations(model, module, expert, cols.tolist(), x[rows])
            change = (act * w[:, None].to(act.dtype)) @ delta.like(act)
            flat = flat.index_add(0, rows, change.to(flat.dtype))
        new = flat.reshape(out.shape)
        return new if rebuild is None else (new, *rebuild[1:])

    return hook


def _module_steps(steps: list[Step], session: HookSession, name: str) -> list[HookHandle]:
    """Counted module hooks for ``site="module"`` steps; routed-expert column edits of one module share a hook."""
    model = session.model
    handles: list[HookHandle] = []
    experts: dict[tuple[int, str], list[Step]] = {}
    for step in steps:
        module = resolve_path(model.layer(step.layer), step.module)
        path = f"{model.spec.layers}.{step.layer}.{step.module}"
        op = step.op
        if isinstance(op, ColumnDelta) and op.expert is not None:
            experts.setdefault((step.layer, step.module), []).append(step)
            continue
        if isinstance(op, LinearDelta):
            ctx = HookContext(site=f"module {path}", layer=step.layer, step=session.step)
            hook = _linear_hook(op, step, ctx)
        elif isinstance(op, ColumnDelta):
            _all_tokens(step)
            hook = _columns_hook(op)
        else:
            raise UnknownSiteError(f"{type(op).__name__} acts on a named site, not on a module ({step.where})")
        handles.append(session.add_module(module, hook, name=f"{name}.{path}", layer=step.layer, with_kwargs=True))
    for (layer, rel), group in experts.items():
        for step in group:
            _all_tokens(step)
        module = resolve_path(model.layer(layer), rel)
        hook = _experts_hook(model, [s.op for s in group])  # type: ignore[misc]
        path = f"{model.spec.layers}.{layer}.{rel}"
        handles.append(session.add_module(module, hook, name=f"{name}.{path}", layer=layer, with_kwargs=True))
    return handles


def _all_tokens(step: Step) -> None:
    if step.tokens != "all":
        raise ShapeError(f"{type(step.op).__name__} at {step.where} acts on every token; use tokens='all'")


def gated_by_rows(fn: SiteFn, rows: Callable[[], torch.Tensor | None]) -> SiteFn:
    """``fn`` applied only to the batch rows ``rows()`` selects (bool ``[b]``; ``None``: no row, the call is
    :data:`~steerlab.hooks.UNCHANGED`); a mask of another length raises."""

    def edit(x: torch.Tensor, ctx: HookContext):
        mask = rows()
        if mask is None or not bool(mask.any()):
            return UNCHANGED
        if len(mask) != len(x):
            raise ShapeError(f"the row gate selects among {len(mask)} rows but this forward call has {len(x)}")
        new = fn(x, ctx)
        if new is UNCHANGED or new is None:
            return new
        return torch.where(mask.to(x.device).view(-1, *([1] * (x.dim() - 1))), new, x)

    return edit


def render(plan: Plan, session: HookSession, *, rows: Callable[[], torch.Tensor | None] | None = None) -> list[HookHandle]:
    """Register hooks carrying out every step of ``plan`` on an open session; returns their counted handles.

    Every handle is required: a step that never acted makes the session raise on exit. With ``rows`` (a per-row
    gate, see :func:`gated_by_rows`) each step acts only on the rows the gate selects at that call, its handles are
    not required (a gate may select no row), and module steps are refused.
    """
    handles: list[HookHandle] = []
    name = plan.source.split("(")[0]
    if rows is not None:
        modules = [s.where for s in plan.steps if s.site == "module"]
        if modules:
            raise UnknownSiteError(f"{plan.source} acts on modules ({', '.join(modules)}); a row-gated plan acts on named "
                                   "residual sites only (AddVector, Ablate, Clamp, RankOneRedirect)")  # fmt: skip
    for step in plan.steps:
        if step.site == "module":
            continue
        for site, fn in site_functions(step, session.model):
            fn = fn if rows is None else gated_by_rows(fn, rows)
            handles.append(session.add(site, step.layer, fn, name=f"{name}.{site}.{step.layer}", required=rows is None))
    handles += _module_steps([s for s in plan.steps if s.site == "module"], session, name)
    return handles
