"""Shared plumbing for the interop bridges: optional imports, errors, and hook specs in run order."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from steerlab.errors import EmptyInputError, SteerlabError
from steerlab.hooks import MOE_SITES, HookContext
from steerlab.model import Model

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

    Only interventions that describe themselves as ``(site, layer, fn)`` triples (``.hooks(model)``)
    on dense sites, for every token (``positions="all"``), can be carried across.
    """
    if not interventions:
        raise EmptyInputError("pass at least one intervention (e.g. AddVector(direction, coeff=4.0))")
    specs: list[Spec] = []
    for iv in interventions:
        kind = type(iv).__name__
        if not hasattr(iv, "hooks"):
            raise InteropError(
                f"{kind} installs its own module hooks and has no (site, layer, fn) form to carry across; "
                "apply it through steerlab instead: `with steerlab.load(wrapper).apply(iv): ...`"
            )
        positions = getattr(iv, "positions", "all")
        if positions != "all":
            raise InteropError(
                f"{kind}(positions={positions!r}) needs the prompt length, which only steerlab's own "
                "model.generate records; use positions='all', or generate with steerlab.load(wrapper).generate(...)"
            )
        for site, layer, fn in iv.hooks(model):
            if site in MOE_SITES:
                raise InteropError(
                    f"{kind} edits the MoE site {site!r}, which has no TransformerLens / nnsight hook point here; "
                    "apply it through steerlab instead: `with steerlab.load(wrapper).apply(iv): ...`"
                )
            specs.append(Spec(site=site, layer=layer, fn=fn, name=f"{kind}.{site}.{layer}"))
    specs.sort(key=lambda s: (s.layer, SITE_ORDER[s.site]))  # stable: same-site hooks keep their order
    return specs
