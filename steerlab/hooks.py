"""Scoped hook sessions on named sites.

A :class:`HookSession` registers functions on named sites (TransformerLens vocabulary), counts
how often each one fired, always removes every handle when the ``with`` block ends (also when it
raises), and raises :class:`~steerlab.errors.InterventionNotFiredError` if a required hook never
ran: an intervention that did not fire is an error, never a silent no-op.

A hook function receives the site's activation and a :class:`HookContext`, and returns either
``None`` (read only) or a tensor of the same shape that replaces the activation.

Sites (``layer`` indexes decoder layers from 0; negative counts from the end):

========================  ===========================================================  ==============
site                      what the function sees                                       shape
========================  ===========================================================  ==============
``resid_pre``             residual stream entering the layer                           [b, s, d]
``resid_post``            residual stream leaving the layer                            [b, s, d]
``attn_out``              what attention adds to the residual stream                   [b, s, d]
``mlp_out``               what the MLP / MoE block adds to the residual stream         [b, s, d]
``head``                  per-head attention output before ``o_proj``                  [b, s, H, dh]
``router_logits``         MoE router logits (edits re-route top-k)                     [b, s, E]
``expert_out``            weighted sum of the routed experts (no shared experts)       [b, s, d]
========================  ===========================================================  ==============

Example:
    >>> import steerlab, torch
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> with model.hooks() as hooks:
    ...     h = hooks.add("resid_post", 1, lambda x, ctx: x * 0.5)
    ...     _ = model.hf(**model.encode(["Hi"]).model_inputs())
    >>> h.count
    1
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import torch
from torch import nn

from steerlab.arch import normalize_layer, resolve_path
from steerlab.errors import GenerationStateError, HookSessionError, InterventionNotFiredError, UnknownSiteError
from steerlab.site_hooks import head_hook, post_hook, pre_hook, router_hook, tokens_hook
from steerlab.step import StepInfo, past_length_of

if TYPE_CHECKING:
    from steerlab.model import Model

_OPEN: WeakKeyDictionary[nn.Module, list[HookSession]] = WeakKeyDictionary()  # hf model -> open sessions

SITES: tuple[str, ...] = ("resid_pre", "resid_post", "attn_out", "mlp_out", "head", "router_logits", "expert_out")
MOE_SITES = frozenset({"router_logits", "expert_out"})


class StopForward(Exception):
    """Raised by a hook after the last layer a measurement needs: the caller catches it and skips the
    rest of the forward pass."""


@dataclass
class HookContext:
    """Passed to every hook function: where it runs and what the current forward call is."""

    site: str
    layer: int
    step: StepInfo


class Unchanged:
    """The type of :data:`UNCHANGED`."""

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED = Unchanged()
"""Returned by an edit hook that chose not to act on this call (its token selection is empty): the
activation stays as it is and the call does not count as a firing."""

HookFn = Callable[[torch.Tensor, HookContext], "torch.Tensor | Unchanged | None"]


@dataclass
class HookHandle:
    """One registered hook; ``count`` is how many times it fired in this session."""

    site: str
    layer: int
    name: str
    required: bool = True
    count: int = 0  # calls that ran (a call returning UNCHANGED, which did not act, does not count)
    _handles: list[Any] = field(default_factory=list, repr=False)


def check_site(site: str) -> str:
    """Validate a site name, with the list of valid names in the error."""
    if site not in SITES:
        raise UnknownSiteError(f"unknown site {site!r}; valid sites: {', '.join(SITES)}")
    return site


class HookSession:
    """A scope in which hooks are registered on a :class:`~steerlab.model.Model`; see module docs.

    ``check_fired`` (default ``True``) makes the session raise on exit if a required hook never ran.
    """

    def __init__(self, model: Model, *, check_fired: bool = True) -> None:
        self.model = model
        self.check_fired = check_fired
        self.step = StepInfo()
        self.handles: list[HookHandle] = []
        self._torch_handles: list[Any] = []
        self._open = False
        self._entered = False
        self.policy_outputs: list[Any] = []  # per-row outputs of a generation policy applied with model.apply

    # ----- scope -----
    def __enter__(self) -> HookSession:
        if self._entered:
            raise HookSessionError(
                "this hook session (or model.apply(...) scope) was already entered; open a new one with "
                "`with model.apply(...)` / `with model.hooks()` instead of re-entering it"
            )
        self._open = self._entered = True
        _OPEN.setdefault(self.model.hf, []).append(self)
        base = resolve_path(self.model.hf, self.model.spec.layers.rsplit(".", 1)[0])
        self._torch_handles.append(base.register_forward_pre_hook(self._record_step, with_kwargs=True))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
        if exc_type is None and self.check_fired:
            self.raise_if_not_fired()

    def close(self) -> None:
        """Remove every handle this session registered (idempotent)."""
        for handle in self._torch_handles:
            handle.remove()
        self._torch_handles.clear()
        for h in self.handles:
            h._handles.clear()
        sessions = _OPEN.get(self.model.hf, [])
        if self in sessions:
            sessions.remove(self)
        self._open = False

    def raise_if_not_fired(self) -> None:
        """Raise if a required hook has a zero count."""
        silent = [h for h in self.handles if h.required and h.count == 0]
        if silent:
            names = ", ".join(f"{h.name} ({h.site} @ layer {h.layer})" for h in silent)
            raise InterventionNotFiredError(
                f"hook(s) never fired: {names}. Run the model inside the `with` block, and check that the "
                "site exists on the path the forward pass takes (e.g. MoE sites on dense layers)."
            )

    @property
    def counts(self) -> dict[str, int]:
        """Firing count per hook name."""
        return {h.name: h.count for h in self.handles}

    def _record_step(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        step = self.step
        step.calls += 1
        if ids is not None:
            step.batch_size, step.seq_len = int(ids.shape[0]), int(ids.shape[1])
        step.attention_mask = kwargs.get("attention_mask")
        step.past_length = past_length_of(args, kwargs, step)

    # ----- registration -----
    def add(self, site: str, layer: int, fn: HookFn, *, name: str | None = None, required: bool = True) -> HookHandle:
        """Register ``fn`` on ``site`` at ``layer``; returns a handle whose ``count`` tracks firings.

        A call that returns :data:`UNCHANGED` (an edit whose token selection leaves out every token of the
        call) does not count, so such an edit is reported as not fired when no call of the scope acted.
        """
        if not self._open:
            raise HookSessionError("register hooks inside `with model.hooks() as hooks:`")
        check_site(site)
        spec, hf = self.model.spec, self.model.hf
        idx = normalize_layer(layer, self.model.n_layers)
        handle = HookHandle(site=site, layer=idx, name=name or f"{site}.{idx}.{len(self.handles)}", required=required)
        ctx = HookContext(site=site, layer=idx, step=self.step)
        layer_mod = spec.decoder_layers(hf)[idx]

        def call(x: torch.Tensor) -> torch.Tensor | None:
            handle.count += 1  # before the call: a hook that stops the forward pass has fired
            out = fn(x, ctx)
            if out is UNCHANGED:
                handle.count -= 1
                return None
            if out is not None and out.shape != x.shape:
                raise UnknownSiteError(
                    f"hook {handle.name} returned shape {tuple(out.shape)} for a {site} activation of shape "
                    f"{tuple(x.shape)}; return a tensor of the same shape, or None to leave it unchanged"
                )
            return out

        if site == "resid_pre":
            torch_handle = layer_mod.register_forward_pre_hook(pre_hook(call), with_kwargs=True)
        elif site == "resid_post":
            torch_handle = layer_mod.register_forward_hook(post_hook(call))
        elif site in ("attn_out", "mlp_out"):
            module = resolve_path(layer_mod, spec.attn_out if site == "attn_out" else spec.mlp_out)
            torch_handle = module.register_forward_hook(post_hook(call))
        elif site == "head":
            o_proj = resolve_path(layer_mod, spec.o_proj)
            n_heads = spec.num_heads(hf.config)
            torch_handle = o_proj.register_forward_pre_hook(head_hook(call, n_heads), with_kwargs=True)
        else:
            block = spec.moe_block(hf, idx)
            if block is None:
                moe_layers = [i for i in range(self.model.n_layers) if spec.moe_block(hf, i) is not None]
                raise UnknownSiteError(
                    f"site {site!r} needs an MoE block, but layer {idx} of this {spec.model_type} model has none; "
                    f"MoE layers: {moe_layers or 'none (dense model)'}"
                )
            if site == "router_logits":
                router = resolve_path(block, spec.moe.router)
                torch_handle = router.register_forward_hook(router_hook(call, self.step, spec, router, hf.config))
            else:
                experts = resolve_path(block, spec.moe.experts)
                torch_handle = experts.register_forward_hook(tokens_hook(call, self.step))
        handle._handles.append(torch_handle)
        self._torch_handles.append(torch_handle)
        self.handles.append(handle)
        return handle

    def add_module(
        self,
        module: nn.Module,
        hook: Callable,
        *,
        name: str,
        layer: int = -1,
        pre: bool = False,
        with_kwargs: bool = False,
        required: bool = True,
    ) -> HookHandle:
        """Register a raw torch hook on ``module`` with a counted handle (for edits with no named site).

        The handle counts firings and is checked on exit like :meth:`add` (a call returning
        :data:`UNCHANGED` does not count); the hook is removed on exit.
        """
        handle = HookHandle(site=f"module {name}", layer=layer, name=name, required=required)

        def counted(*args, **kwargs):
            handle.count += 1
            out = hook(*args, **kwargs)
            if out is UNCHANGED:
                handle.count -= 1
                return None
            return out

        self.add_module_hook(module, counted, pre=pre, with_kwargs=with_kwargs)
        handle._handles.append(self._torch_handles[-1])
        self.handles.append(handle)
        return handle

    def add_module_hook(self, module: nn.Module, hook: Callable, *, pre: bool = False, with_kwargs: bool = False) -> None:
        """Register a raw torch hook that this session removes on exit (for code that needs module access)."""
        if not self._open:
            raise HookSessionError("register hooks inside `with model.hooks() as hooks:`")
        if pre:
            handle = module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
        else:
            handle = module.register_forward_hook(hook, with_kwargs=with_kwargs)
        self._torch_handles.append(handle)


def open_sessions(model: Model) -> tuple[HookSession, ...]:
    """The hook sessions currently open on ``model`` (innermost last)."""
    return tuple(_OPEN.get(model.hf, ()))


@contextmanager
def generation(model: Model, prompt_length: int) -> Iterator[None]:
    """Tell every hook session open on ``model`` that a generation with a padded prompt of
    ``prompt_length`` tokens is running, for the whole ``with`` block (reset on every exit path).

    Token-selecting edits (``tokens="prompt"`` / ``"generated"``) read it to tell prompt tokens from
    generated ones; every generation loop (``Model.generate``, ADA, refusal tokens) wraps its calls in it.
    """
    sessions = open_sessions(model)
    for session in sessions:
        if session.step.prompt_length is not None:
            raise GenerationStateError(
                "a generation is already running in this hook session; generation loops cannot be nested"
            )
        session.step.prompt_length = int(prompt_length)
    try:
        yield
    finally:
        for session in sessions:
            session.step.prompt_length = None
