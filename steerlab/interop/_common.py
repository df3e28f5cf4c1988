"""Shared plumbing for the interop bridges: optional imports, errors, and hook specs in run order."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from steerlab.backends import hf as hf_backend
from steerlab.errors import EmptyInputError, SteerlabError
from steerlab.hooks import MOE_SITES, HookContext
from steerlab.model import Model
from steerlab.plan import Plan, Step

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


def specs_for(model: Model, interventions: Sequence[Any]) -> list[Spec]:
    """The hook specs of ``interventions`` on ``model``, sorted into run order (layer, then site).

    Each intervention is resolved to its :class:`~steerlab.plan.Plan`; steps on dense named sites, for every
    token (``tokens="all"``), are carried across as the functions :mod:`steerlab.backends.hf` would hook.
    """
    if not interventions:
        raise EmptyInputError("pass at least one intervention (e.g. AddVector(direction, coeff=4.0))")
    steps: list[tuple[str, Step]] = []
    for iv in interventions:
        if isinstance(iv, Plan):
            plan = iv
        elif callable(getattr(iv, "resolve", None)):
            plan = iv.resolve(model)
        else:
            raise InteropError(
                f"{type(iv).__name__} is not a steerlab intervention (it has no .resolve(model)); apply it through "
                "steerlab instead: `with steerlab.load(wrapper).apply(iv): ...`"
            )
        steps += [(plan.source, step) for step in plan.steps]
    specs: list[Spec] = []
    for kind, step in steps:
        if step.tokens != "all":
            raise InteropError(
                f"{kind}(tokens={step.tokens!r}) needs the prompt length, which only steerlab's own "
                "model.generate records; use tokens='all', or generate with steerlab.load(wrapper).generate(...)"
            )
        if step.site == "module":
            raise InteropError(
                f"{kind} edits the module {step.module!r} inside layer {step.layer}, which has no TransformerLens / "
                "nnsight hook point here; apply it through steerlab instead: `with steerlab.load(wrapper).apply(iv): ...`"
            )
        for site, fn in hf_backend.site_functions(step, model):
            if site in MOE_SITES:
                raise InteropError(
                    f"{kind} edits the MoE site {site!r}, which has no TransformerLens / nnsight hook point here; "
                    "apply it through steerlab instead: `with steerlab.load(wrapper).apply(iv): ...`"
                )
            specs.append(Spec(site=site, layer=step.layer, fn=fn, name=f"{kind}.{site}.{step.layer}"))
    specs.sort(key=lambda s: (s.layer, SITE_ORDER[s.site]))  # stable: same-site hooks keep their order
    return specs
