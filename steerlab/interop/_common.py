"""Shared plumbing for the interop bridges: optional imports, errors, and hook specs in run order."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from steerlab.backends import hf as hf_backend
from steerlab.errors import EmptyInputError, SteerlabError
from steerlab.hooks import MOE_SITES, HookContext
from steerlab.model import Model
from steerlab.plan import Plan, Step, resolve_plans

# Order in which a decoder layer reaches each site: a pass that edits them must visit them in this order.
SITE_ORDER = {"resid_pre": 0, "head": 1, "attn_out": 2, "mlp_out": 3, "resid_post": 4}


class InteropUnavailableError(SteerlabError, ImportError):
    """An optional interop package (transformer-lens, nnsight) is not installed."""


class InteropError(SteerlabError, ValueError):
    """An intervention or object cannot be carried across to TransformerLens / nnsight."""


def require(module: str, feature: str) -> ModuleType:
    """Import an optional package, or raise :class:`InteropUnavailableError` with the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise InteropUnavailableError(
            f"{feature} needs the optional package {module.split('.')[0]!r}, which is not installed: "
            "pip install steerlab[interop]"
        ) from exc


@dataclass
class Firing:
    """One converted hook: where it runs and how often it fired."""

    name: str
    site: str
    layer: int
    count: int = 0


@dataclass(frozen=True)
class Spec:
    """One (site, layer, fn) triple of an intervention, labelled."""

    site: str
    layer: int
    fn: Callable[[torch.Tensor, HookContext], torch.Tensor | None]
    name: str


def as_model(obj: Any) -> Model:
    """A steerlab :class:`Model` for ``obj`` (a Model, TransformerBridge or nnsight model)."""
    if isinstance(obj, Model):
        return obj
    from steerlab.model import load

    return load(obj)


def hf_and_tokenizer(model: Any, tokenizer: Any, *, copy: bool, feature: str) -> tuple[torch.nn.Module, Any]:
    """The HF module and tokenizer to wrap: from a steerlab Model or an HF model plus ``tokenizer``;
    ``copy=True`` deep-copies the module so the caller's model stays as it was."""
    import copy as copy_module

    if isinstance(model, Model):
        hf, tok = model.hf, tokenizer or model.tokenizer
    else:
        hf, tok = model, tokenizer
    if tok is None:
        raise EmptyInputError(f"{feature} needs a tokenizer: pass {feature}(hf_model, tokenizer)")
    return (copy_module.deepcopy(hf) if copy else hf), tok


def split_plan(model: Model, interventions: Sequence[Any]) -> tuple[list[Spec], Plan]:
    """The steps of ``interventions`` on ``model``, split into hook specs for the wrapper's own hook points
    (dense named sites, in run order: layer, then site) and the plan of the rest (steps on a module or an MoE
    site), which :func:`module_scope` renders as torch hooks on the same modules the wrapper runs.

    Every step must act on every token (``tokens="all"``): only steerlab's own ``model.generate`` records the
    prompt length.
    """
    for iv in interventions:
        if not isinstance(iv, Plan) and not callable(getattr(iv, "resolve", None)):
            raise InteropError(
                f"{type(iv).__name__} is not a steerlab intervention (it has no .resolve(model)); apply it through "
                "steerlab instead: `with steerlab.load(wrapper).apply(iv): ...`"
            )
    specs: list[Spec] = []
    rest: list[Step] = []
    for plan in resolve_plans(model, interventions):
        for step in plan.steps:
            if step.tokens != "all":
                raise InteropError(
                    f"{plan.source}(tokens={step.tokens!r}) needs the prompt length, which only steerlab's own "
                    "model.generate records; use tokens='all', or generate with steerlab.load(wrapper).generate(...)"
                )
            if step.site == "module" or step.site in MOE_SITES or any(
                site in MOE_SITES for site, _ in hf_backend.site_functions(step, model)
            ):
                rest.append(step)
                continue
            for site, fn in hf_backend.site_functions(step, model):
                specs.append(Spec(site=site, layer=step.layer, fn=fn, name=f"{plan.source}.{site}.{step.layer}"))
    specs.sort(key=lambda s: (s.layer, SITE_ORDER[s.site]))  # stable: same-site hooks keep their order
    return specs, Plan("module steps", tuple(rest))


def specs_for(model: Model, interventions: Sequence[Any], *, where: str) -> list[Spec]:
    """Like :func:`split_plan`, for a caller with no scope to hold torch hooks: steps on modules or MoE sites
    raise :class:`InteropError` pointing to the scoped form ``where``."""
    specs, rest = split_plan(model, interventions)
    if rest.steps:
        step = rest.steps[0]
        raise InteropError(
            f"{type(step.op).__name__} at {step.where} has no TransformerLens / nnsight hook point; apply it in a "
            f"scope instead: {where} (torch hooks on the same modules, removed on exit)"
        )
    return specs


@contextmanager
def module_scope(model: Model, plan: Plan, *, check_fired: bool) -> Iterator[None]:
    """Render ``plan`` (steps without a wrapper hook point) as steerlab hooks on the wrapped HF modules, for a
    ``with`` block; nothing is registered for an empty plan. The wrappers run these very modules, so the hooks
    fire inside their forward passes."""
    if not plan.steps:
        yield
        return
    with model.hooks(check_fired=check_fired) as session:
        hf_backend.render(plan, session)
        yield
