"""nnsight interop: steerlab interventions written through nnsight's own intervention API.

* :func:`to_language_model` — wrap a steerlab Model (or HF model) for nnsight, offline.
* :func:`nnsight_intervene` — call inside a ``with lm.trace(...)`` body (or a generation step loop):
  applies AddVector, Ablate, Clamp, HeadAblation, ... by reading and replacing module
  inputs/outputs through the envoys, in the order the forward pass reaches them.
* :func:`nnsight_generate` — generate under interventions at every step, returning token ids.

The other way round also works: ``steerlab.load(lm)`` unwraps the HF model, and steerlab's own hooks
(``model.apply``) fire inside nnsight traces.

Example:
    >>> from steerlab.testing import tiny_model, tiny_direction
    >>> model = tiny_model("llama")
    >>> lm, direction = to_language_model(model, copy=True), tiny_direction(model)
    >>> inputs = {"input_ids": model.encode(["Say hello."]).input_ids}
    >>> with lm.trace(inputs):
    ...     firings = nnsight_intervene(lm, steerlab.AddVector(direction, coeff=4.0))
    ...     logits = lm.output.logits.save()
    >>> with model.apply(steerlab.AddVector(direction, coeff=4.0)):  # the same logits as steerlab's own hooks
    ...     torch.allclose(logits, model.hf(**inputs).logits, atol=1e-5)
    True
"""

from __future__ import annotations

import copy as copy_module
import warnings
from itertools import groupby
from typing import Any

import torch
from torch import nn

from steerlab.hooks import UNCHANGED, HookContext
from steerlab.interop._common import (
    Firing,
    Spec,
    as_model,
    hf_and_tokenizer,
    module_scope,
    require,
    specs_for,
    split_plan,
)
from steerlab.model import Model
from steerlab.step import StepInfo


def to_language_model(model: Model | nn.Module, tokenizer: Any = None, *, copy: bool = False) -> Any:
    """An nnsight model (``TransformersModel``, the class ``LanguageModel`` now extends) around an
    already-loaded model, without downloading anything.

    nnsight instruments every module in place (inert outside a trace); ``copy=True`` wraps a deep
    copy instead. The tokenizer is copied because nnsight sets its padding side.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> lm = to_language_model(tiny_model("llama"), copy=True)
        >>> type(lm).__name__, type(steerlab.load(lm).hf).__name__
        ('TransformersModel', 'LlamaForCausalLM')
    """
    nnsight = require("nnsight", "to_language_model")
    hf, tok = hf_and_tokenizer(model, tokenizer, copy=copy, feature="to_language_model")
    try:
        from nnsight.modeling.transformers import TransformersModel as wrapper
    except ImportError:  # nnsight < 0.8: LanguageModel is the class
        wrapper = nnsight.LanguageModel
    return wrapper(hf, task="text-generation", tokenizer=copy_module.deepcopy(tok))


def _envoy(root: Any, path: str) -> Any:
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _split(value: Any) -> tuple[torch.Tensor, Any]:
    if isinstance(value, torch.Tensor):
        return value, lambda t: t
    return value[0], lambda t: (t, *value[1:])


def _run(group: list[tuple[Spec, Firing]], x: torch.Tensor) -> torch.Tensor | None:
    """Apply a site's functions in turn; ``None`` if none of them changed anything."""
    spec0 = group[0][0]
    ctx = HookContext(
        site=spec0.site, layer=spec0.layer, step=StepInfo(batch_size=int(x.shape[0]), seq_len=int(x.shape[1]), calls=1)
    )
    changed = False
    for spec, firing in group:
        firing.count += 1
        out = spec.fn(x, ctx)
        if out is UNCHANGED:
            firing.count -= 1
        elif out is not None:
            x, changed = out, True
    return x if changed else None


def nnsight_intervene(lm: Any, *interventions: Any, model: Model | None = None) -> list[Firing]:
    """Apply steerlab interventions inside an nnsight trace; call it from the ``with`` body.

    Each site is read and, where an intervention changes it, replaced through its envoy
    (``.input`` for ``resid_pre`` and ``head``, ``.output`` otherwise), layer by layer in run order,
    so other nnsight code may read and edit the same model around it. In a generation, call it once
    per step (``for _ in tracer.iter[:]:``) or use :func:`nnsight_generate`. Returns one
    :class:`~steerlab.interop._common.Firing` per hook (saved, so it outlives the ``with`` block),
    counted as the run goes.

    Example:
        >>> from steerlab.testing import tiny_model, tiny_direction
        >>> model = tiny_model("llama")
        >>> lm, inputs = to_language_model(model, copy=True), {"input_ids": model.encode(["Hi"]).input_ids}
        >>> with lm.trace(inputs):
        ...     firings = nnsight_intervene(lm, steerlab.Ablate(tiny_direction(model)))
        ...     logits = lm.output.logits.save()
        >>> len(firings), all(f.count == 1 for f in firings)  # resid_pre, attn_out and mlp_out of 3 layers, once each
        (9, True)
    """
    model = model or as_model(lm)
    where = "`with steerlab.load(lm).apply(iv):` around the trace, or nnsight_generate(lm, inputs, iv)"
    return _intervene(lm, model, specs_for(model, interventions, where=where))


def _intervene(lm: Any, model: Model, specs: list[Spec]) -> list[Firing]:
    spec = model.spec
    firings = [Firing(name=s.name, site=s.site, layer=s.layer) for s in specs]
    layers = _envoy(lm, spec.layers)
    for (layer, site), items in groupby(zip(specs, firings), key=lambda pair: (pair[0].layer, pair[0].site)):
        group = list(items)
        layer_env = layers[layer]
        if site == "resid_pre":
            new = _run(group, layer_env.input)
            if new is not None:
                layer_env.input = new
        elif site == "head":
            o_proj = _envoy(layer_env, spec.o_proj)
            flat = o_proj.input
            new = _run(group, flat.view(*flat.shape[:-1], model.n_heads, -1))
            if new is not None:
                o_proj.input = new.reshape(flat.shape)
        else:
            env = (
                layer_env
                if site == "resid_post"
                else _envoy(layer_env, spec.attn_out if site == "attn_out" else spec.mlp_out)
            )
            tensor, rebuild = _split(env.output)
            new = _run(group, tensor)
            if new is not None:
                env.output = rebuild(new)
    from nnsight import save  # keep the list (and its counts) bound after the `with` block

    return save(firings)


def nnsight_generate(
    lm: Any, inputs: Any, *interventions: Any, max_new_tokens: int = 32, **kwargs: Any
) -> torch.Tensor:
    """``lm.generate`` with ``interventions`` applied at every step (prompt and generated tokens);
    returns the token ids (prompt + continuation), like ``hf.generate``.

    ``inputs`` is anything nnsight accepts (text, or ``{"input_ids", "attention_mask"}``); ``kwargs``
    go to ``generate`` (``do_sample=False`` by default).

    Example:
        >>> from steerlab.testing import tiny_model, tiny_direction
        >>> model = tiny_model("llama")
        >>> lm, d, enc = to_language_model(model, copy=True), tiny_direction(model), model.encode(["Hi", "Say hello."])
        >>> batch = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
        >>> ids = nnsight_generate(lm, batch, steerlab.AddVector(d, coeff=4.0), max_new_tokens=4)
        >>> ids.shape[1] - enc.input_ids.shape[1]
        4
    """
    model = as_model(lm)
    specs, rest = split_plan(model, interventions)  # steps on modules / MoE sites: torch hooks on the same modules
    kwargs.setdefault("do_sample", False)
    with warnings.catch_warnings(), module_scope(model, rest, check_fired=True):
        warnings.filterwarnings("ignore", message=".*was never reached")  # an open step loop ends with it by design
        with lm.generate(max_new_tokens=max_new_tokens, **kwargs) as tracer:
            with tracer.invoke(inputs):
                if specs:  # an open step loop with nothing to wait on never ends: only loop with work to do
                    for _ in tracer.iter[:]:
                        _intervene(lm, model, specs)
            with tracer.invoke():
                ids = tracer.result.save()
    return ids
