"""Bake an exact intervention into the weights: ``bake(model, iv)`` computes what ``model.apply(iv)`` computes.

Each intervention defines its exact weight form next to itself (``iv.weights(model)``: a tuple of
:mod:`steerlab.plan` weight edits, or a :class:`~steerlab.errors.NotBakeableError` saying why there is none);
:mod:`steerlab.backends.weights` turns the edits into tensor changes. This module makes the copy: ``Ablate``
orthogonalises every residual writer, ``AddVector`` becomes embedding rows or a bias, ``HeadAblation`` zeroes
o_proj input columns, ``ExpertMask(mode="off")`` edits router rows and biases, the redirects add their
``ΔW``, ``ColumnEdit`` rewrites columns.

Only ``tokens="all"`` is a weight edit. Where a family lacks a bias an edit needs, the model is rebuilt
from a config that has it (:mod:`steerlab.training.restructure`); tied embeddings are untied before the
embedding is edited, so the unembedding keeps its values. Anything without an exact weight form raises
:class:`~steerlab.errors.NotBakeableError` naming why (the runtime hook always works).

Example:
    >>> import steerlab
    >>> from steerlab.testing import tiny_model, tiny_direction
    >>> from steerlab.training import parity
    >>> model = tiny_model("llama")
    >>> ablate = steerlab.Ablate(tiny_direction(model))
    >>> baked = bake(model, ablate)
    >>> parity(model, baked, ablate, ["How do I pick a lock?"]).max_abs_logit_diff < 1e-4
    True
"""

from __future__ import annotations

import copy
from typing import Any

import steerlab
from steerlab.arch import spec_for
from steerlab.backends import weights as weights_backend
from steerlab.backends.weights import WeightChange, embedding_scale
from steerlab.errors import NotBakeableError
from steerlab.hooks import open_sessions
from steerlab.model import Model
from steerlab.training.manifest import describe, history, record
from steerlab.training.restructure import bias_route, is_tied, merge_routes, rebuild

__all__ = ["bake", "embedding_scale", "weight_change"]


def weight_change(model: Model, intervention: Any) -> WeightChange:
    """Check that ``intervention`` is bakeable on ``model`` and return what baking it takes (nothing is changed).

    The weight form is the intervention's own (``intervention.weights(model)``), rendered by
    :mod:`steerlab.backends.weights`.

    Example:
        >>> import steerlab
        >>> from steerlab.testing import tiny_model, tiny_direction
        >>> model = tiny_model("llama")
        >>> weight_change(model, steerlab.AddVector(tiny_direction(model, layer=1), coeff=2.0)).biases
        {'down_proj': {0}}
    """
    weights = getattr(intervention, "weights", None)
    if not callable(weights):
        raise NotBakeableError(
            f"{type(intervention).__name__} has no weight form (no .weights(model)); bake an intervention such as "
            "Ablate, AddVector, HeadAblation, ExpertMask, RankOneRedirect, LinearRedirect, MultiKeyRedirect or "
            "ColumnEdit, or apply it at runtime: `with model.apply(iv): ...`"
        )
    what = type(intervention).__name__
    mode = getattr(intervention, "mode", None)
    if isinstance(mode, str):
        what = f"{what}(mode={mode!r})"
    return weights_backend.render(model, weights(model), what=what)


def _missing_bias(model: Model, role: str, layers: set[int]) -> bool:
    rel = model.spec.o_proj if role == "o_proj" else model.spec.down_proj
    return any(getattr(model.spec.layer_module(model.hf, la, rel), "bias", None) is None for la in layers)


def bake(model: Model, intervention: Any, *, inplace: bool = False) -> Model:
    """A model whose weights compute what ``model.apply(intervention)`` computes (see the module table).

    ``inplace=False`` (default) leaves ``model`` untouched and returns a new :class:`~steerlab.model.Model`;
    ``inplace=True`` edits ``model`` itself and returns it (where a bias must be added, its ``hf`` is replaced by a
    rebuilt one). Raises :class:`~steerlab.errors.NotBakeableError` before changing anything when there is no exact
    weight form on this model. Each bake is recorded for :func:`~steerlab.training.export`'s manifest.

    Example:
        >>> from steerlab.testing import tiny_model, tiny_direction
        >>> model = tiny_model("llama")
        >>> baked = bake(model, steerlab.AddVector(tiny_direction(model, layer=1), coeff=4.0, layers=[1]))
        >>> texts = baked.generate(["Write a poem."], max_new_tokens=4)
        >>> baked is model, len(texts)
        (False, 1)
    """
    if open_sessions(model):
        raise NotBakeableError("bake() inside an open `with model.apply(...)` / `model.hooks()` scope; bake outside it")
    p = weight_change(model, intervention)
    missing = [role for role, layers in sorted(p.biases.items()) if _missing_bias(model, role, layers)]
    flags, model_type = merge_routes(bias_route(model, role, what=p.what) for role in missing)
    untie = p.touches_embedding and is_tied(model.hf)
    if untie:
        flags["tie_word_embeddings"] = False
    before, source_type = history(model.hf), model.spec.model_type
    if flags or model_type:
        hf = rebuild(model.hf, flags=flags, model_type=model_type)
    else:
        hf = model.hf if inplace else copy.deepcopy(model.hf)
    if inplace:
        target = model
        target.hf, target.spec = hf, spec_for(hf)
    else:
        target = Model(hf=hf, tokenizer=model.tokenizer, spec=spec_for(hf), name=model.name, system=model.system)
    for edit in p.edits:
        edit(target)
    entry = {
        "intervention": describe(intervention),
        "source_model": model.name,
        "model_type": {"before": source_type, "after": target.spec.model_type},
        "config_flags": dict(flags),
        "untied_embeddings": untie,
        "steerlab_version": steerlab.__version__,
    }
    record(target.hf, [*before, entry])
    return target
