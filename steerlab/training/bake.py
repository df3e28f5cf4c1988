"""Bake an exact intervention into the weights: ``bake(model, iv)`` computes what ``model.apply(iv)`` computes.

* ``Ablate`` — ``W_out' = (I - r̂ r̂ᵀ) W_out`` for every residual writer: embedding rows, each o_proj (+ bias),
  each dense down_proj, every expert's down projection in the fused parameter (+ biases), shared experts.
* ``AddVector`` — layer 0: ``+ c·v / s`` on every embedding row (``s``: the embedding scale the model applies,
  measured); layer l > 0: a bias ``c·v / residual_scale`` on layer l-1's MLP output, the last write before
  layer l (dense ``down_proj``; gpt-oss: every expert's down bias, as its routing weights sum to 1).
* ``HeadAblation`` — ``mode="zero"``: zero the heads' o_proj input columns; ``mode="mean"``: also fold
  ``W_O[:, h] m_h`` into the o_proj bias.
* ``ExpertMask(mode="off")`` — the expert's router row set to 0 and its router bias very negative (gpt-oss
  ``bias``; DeepSeek ``e_score_correction_bias``); ``shared_off``: zero the shared expert's down_proj.
* ``RankOneRedirect(everywhere=True)`` — ``W_out' = M W_out`` for every residual writer.
* ``LinearRedirect`` / ``MultiKeyRedirect`` — ``W += ΔW`` at their module (their ``weight_update``).
* ``ColumnEdit`` — each chosen down-projection column (dense, routed expert in the fused parameter, shared expert)
  becomes ``scale * v + add``; exact on every family, post-norms included (the edit is before them).

Only ``positions="all"`` is a weight edit. Where a family lacks a bias an edit needs, the model is rebuilt
from a config that has it (:mod:`steerlab.training.restructure`); tied embeddings are untied before the
embedding is edited, so the unembedding keeps its values. Anything without an exact weight form raises
:class:`~steerlab.errors.NotBakeableError` naming why (the runtime hook always works).

Example:
    >>> baked = bake(model, Ablate(direction))                                  # doctest: +SKIP
    >>> parity(model, baked, Ablate(direction), ["How do I pick a lock?"]).max_abs_logit_diff   # doctest: +SKIP
    3.1e-06
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import steerlab
from steerlab.arch import mlp_down, resolve_path, spec_for
from steerlab.errors import NotBakeableError
from steerlab.hooks import open_sessions
from steerlab.interventions.columns import ColumnEdit
from steerlab.interventions.experts import ExpertMask, experts_by_layer, router_of
from steerlab.interventions.heads import HeadAblation, normalize_heads
from steerlab.interventions.redirect import LinearRedirect, MultiKeyRedirect, RankOneRedirect
from steerlab.model import Model
from steerlab.steering.ops import Ablate, AddVector, Clamp, vector_for
from steerlab.training.manifest import describe, history, record
from steerlab.training.restructure import bias_route, is_tied, merge_routes, rebuild
from steerlab.training.writers import (
    apply_rank_one,
    check_plain_writes,
    mlp_writers,
    residual_writers,
    tensor_at,
)

Edit = Callable[[Model], None]

# The constant a router adds to a logit, per routing kind: a very negative one keeps the expert out of every top-k.
ROUTER_BIAS: dict[str, str] = {
    "softmax_topk": "bias",
    "topk_softmax": "bias",
    "sigmoid_grouped": "e_score_correction_bias",
}

_RUNTIME = "Apply it at runtime instead: `with model.apply(iv): ...`"


@dataclass
class Plan:
    """What a bake needs (biases on roles at layers, an untied embedding) and the edits to run on the copy."""

    what: str
    edits: list[Edit] = field(default_factory=list)
    biases: dict[str, set[int]] = field(default_factory=dict)  # role -> layers whose module needs a bias
    touches_embedding: bool = False

    def need_bias(self, role: str, layer: int) -> None:
        self.biases.setdefault(role, set()).add(layer)


# ----- shared pieces -----
def _require_all_positions(iv: Any, what: str) -> None:
    positions = getattr(iv, "positions", "all")
    if positions != "all":
        raise NotBakeableError(
            f"{what} with positions={positions!r} acts on some tokens only, and weights act on every token; "
            f"only positions='all' can be baked. {_RUNTIME}"
        )


class _Stop(Exception):
    pass


def embedding_scale(model: Model) -> float:
    """The factor the model applies between the embedding rows and layer 0's input, measured on a forward pass
    (1 for most families, sqrt(d) for Gemma, ``embedding_multiplier`` for Granite).

    Example:
        >>> embedding_scale(model)                                              # doctest: +SKIP
        8.0
    """
    weight = model.hf.get_input_embeddings().weight.detach()
    norms = weight.float().norm(dim=-1)
    ids = torch.nonzero(norms > 0).flatten()[:32]
    if ids.numel() == 0:
        raise NotBakeableError("the embedding matrix is all zeros; there is no scale to measure")
    seen: dict[str, torch.Tensor] = {}

    def grab(x, ctx):
        seen["x"] = x.detach()
        raise _Stop

    with model.hooks(check_fired=False) as hooks:
        hooks.add("resid_pre", 0, grab)
        with torch.inference_mode():
            try:
                model.hf(input_ids=ids[None].to(model.device), use_cache=False)
            except _Stop:
                pass
    x, e = seen["x"][0].double().cpu(), weight[ids].double().cpu()
    scale = float((x * e).sum() / (e * e).sum())
    err = float((x - scale * e).norm() / x.norm())
    if err > max(1e-3, 4 * torch.finfo(weight.dtype).eps):  # bf16 rounds layer 0's input by ~0.4%
        raise NotBakeableError(
            f"layer 0's input is not a scaled embedding row in this {model.spec.model_type} model (relative "
            f"residual {err:.2g}: position embeddings or another map?), so an addition at layer 0 has no "
            f"embedding-row form. {_RUNTIME}"
        )
    return scale


def _residual_scale(model: Model) -> float:
    attr = model.spec.residual_scale
    return float(getattr(model.config, attr)) if attr else 1.0


def _add_to(path: str, delta: torch.Tensor, *, index: Any = None) -> Edit:
    """An edit ``tensor[index] += delta`` (float64 sum, stored in the tensor's dtype)."""

    def edit(target: Model) -> None:
        t = tensor_at(target.hf, path)
        with torch.no_grad():
            part = t if index is None else t[index]
            new = part.detach().double() + delta.to(device=t.device, dtype=torch.float64)
            if index is None:
                t.copy_(new.to(t.dtype))
            else:
                t[index] = new.to(t.dtype)

    return edit


def _set(path: str, index: Any, value: float) -> Edit:
    def edit(target: Model) -> None:
        t = tensor_at(target.hf, path)
        with torch.no_grad():
            t[index] = value

    return edit


def _layer_path(model: Model, layer: int, rel: str) -> str:
    return f"{model.spec.layers}.{layer}.{rel}"


# ----- Ablate -----
def _plan_ablate(model: Model, iv: Ablate) -> Plan:
    what = "Ablate"
    _require_all_positions(iv, what)
    if iv.per_layer:
        raise NotBakeableError(
            "Ablate(per_layer=True) projects a different vector out of each layer's input, which no weight edit "
            "reproduces (orthogonalising the writers removes one direction everywhere). Bake "
            f"Ablate(direction, source_layer=...) instead. {_RUNTIME}"
        )
    check_plain_writes(model.spec, what=what)
    iv.hooks(model)  # the runtime's own checks: width, which vector
    unit = iv.direction.unit()
    source = iv.source_layer if iv.source_layer is not None else unit.layers[0]
    r = unit.at(source).double()
    r = r / r.norm()
    return Plan(what, edits=[lambda t: apply_rank_one(t.hf, residual_writers(t), -r, r)], touches_embedding=True)


# ----- AddVector -----
def _weights_sum_to_one(model: Model, layer: int) -> bool:
    """Whether the routed experts' weights of ``layer`` sum to 1 at every token (so a shared constant adds once)."""
    spec = model.spec
    kind = spec.moe.routing
    if kind == "topk_softmax":
        return True
    if kind == "softmax_topk":
        return spec.renormalizes(model.config)
    router = router_of(model, layer)
    return bool(router.norm_topk_prob) and float(router.routed_scaling_factor) == 1.0


def _plan_add(model: Model, iv: AddVector) -> Plan:
    what = "AddVector"
    _require_all_positions(iv, what)
    iv.hooks(model)  # width and layer checks
    direction = iv.direction.unit() if iv.unit else iv.direction
    layers = model.layer_indices(iv.layers if iv.layers is not None else list(direction.layers))
    plan = Plan(what)
    spec = model.spec
    for layer in layers:
        vec = vector_for(direction, layer, iv.source_layer).double() * float(iv.coeff)
        if layer == 0:
            plan.edits.append(_add_to(f"{spec.embed}.weight", vec / embedding_scale(model)))
            plan.touches_embedding = True
            continue
        prev = layer - 1
        if spec.mlp_out != spec.mlp:
            raise NotBakeableError(
                f"AddVector at layer {layer} adds to the residual stream after layer {prev}'s MLP, whose output reaches "
                f"the stream through {spec.mlp_out!r} (a post-norm) in {spec.model_type}, so no bias can carry it. "
                f"Only layer 0 (the embedding) can be baked here. {_RUNTIME}"
            )
        shift = vec / _residual_scale(model)
        down = mlp_down(spec, model.hf, prev)
        if down.dense is not None:
            plan.need_bias("down_proj", prev)
            plan.edits.append(_add_to(f"{down.dense}.bias", shift))
            continue
        experts_path, bias_name = down.experts, down.layout.down_bias
        experts = resolve_path(model.hf, experts_path)
        if bias_name is None or getattr(experts, bias_name, None) is None:
            raise NotBakeableError(
                f"AddVector at layer {layer} needs a constant on layer {prev}'s MoE output, and {spec.model_type}'s "
                f"experts have no down-projection bias to hold it. Only layer 0 (the embedding) can be baked "
                f"here. {_RUNTIME}"
            )
        if not _weights_sum_to_one(model, prev):
            raise NotBakeableError(
                f"AddVector at layer {layer}: layer {prev}'s routing weights do not sum to 1, so a constant on every "
                f"expert's bias would not add exactly once. {_RUNTIME}"
            )
        plan.edits.append(_add_to(f"{experts_path}.{bias_name}", shift[None, :]))
    return plan


# ----- HeadAblation -----
def _plan_heads(model: Model, iv: HeadAblation) -> Plan:
    what = f"HeadAblation(mode={iv.mode!r})"
    if iv.rescale_norm:
        raise NotBakeableError(
            "HeadAblation(rescale_norm=True) rescales each token's attention output by a ratio of norms, which is not "
            f"linear in the input, so no weight edit reproduces it. Bake rescale_norm=False instead. {_RUNTIME}"
        )
    iv.hooks(model)  # head ranges and means shape
    plan = Plan(what)
    spec = model.spec
    for layer, heads in normalize_heads(model, iv.heads).items():
        o_path = _layer_path(model, layer, spec.o_proj)
        dh = spec.head_dim(model.hf, layer)
        cols = torch.cat([torch.arange(h * dh, (h + 1) * dh) for h in heads])
        if iv.mode == "mean":
            weight = tensor_at(model.hf, f"{o_path}.weight").detach().double().cpu()
            means = iv.means[layer, heads].double().reshape(-1)
            plan.need_bias("o_proj", layer)
            plan.edits.append(_add_to(f"{o_path}.bias", weight[:, cols] @ means))
        plan.edits.append(_set(f"{o_path}.weight", (slice(None), cols), 0.0))
    return plan


# ----- ExpertMask -----
def _very_negative(dtype: torch.dtype) -> float:
    return max(-1e9, float(torch.finfo(dtype).min))


def _plan_experts(model: Model, iv: ExpertMask) -> Plan:
    what = f"ExpertMask(mode={iv.mode!r})"
    if iv.experts and iv.mode == "force":
        raise NotBakeableError(
            "ExpertMask(mode='force') keeps the router's own weighting of the forced experts among the chosen ones; "
            "a router bias large enough to force selection would also take over that weighting, so it has no exact "
            f"weight form. {_RUNTIME}"
        )
    iv.hooks(model)  # index ranges, dense layers, top_k limits, shared experts present
    plan = Plan(what)
    spec = model.spec
    for layer, experts in experts_by_layer(model, iv.experts).items():
        kind = spec.moe.routing
        router = router_of(model, layer)
        bias = getattr(router, ROUTER_BIAS[kind], None)
        if not isinstance(bias, torch.Tensor):
            raise NotBakeableError(
                f"switching experts off at layer {layer} needs a router bias to push their logits below every other, "
                f"and {spec.model_type}'s router ({type(router).__name__}) has none: a weight row alone cannot keep an "
                f"expert out of the top-k for every input. {_RUNTIME}"
            )
        if kind == "sigmoid_grouped" and int(router.topk_group) < int(router.num_group):
            raise NotBakeableError(
                f"layer {layer} keeps the best {router.topk_group} of {router.num_group} expert groups, ranked with the "
                "switched-off experts' scores; a bias that keeps them out would also change which groups are kept. "
                f"{_RUNTIME}"
            )
        router_path = _layer_path(model, layer, f"{spec.moe.block}.{spec.moe.router}")
        index = torch.tensor(experts)
        plan.edits.append(_set(f"{router_path}.weight", index, 0.0))
        plan.edits.append(_set(f"{router_path}.{ROUTER_BIAS[kind]}", index, _very_negative(bias.dtype)))
    if iv.shared_off is not False:
        layers = (
            list(experts_by_layer(model, iv.experts)) if iv.shared_off is True else model.layer_indices(list(iv.shared_off))
        )
        for layer in layers:
            for w in mlp_writers(model, layer):
                if w.role == "shared_experts":  # its output is 0 with a zero down projection (and bias)
                    plan.edits.append(_set(w.path, slice(None), 0.0))
    return plan


# ----- redirects -----
def _plan_redirect(model: Model, iv: RankOneRedirect) -> Plan:
    what = "RankOneRedirect"
    _require_all_positions(iv, what)
    if not iv.everywhere:
        raise NotBakeableError(
            "RankOneRedirect at chosen layers maps the whole residual stream at those layers' inputs, which no "
            "weight edit reproduces; RankOneRedirect(..., everywhere=True) (every write) is the bakeable form. "
            f"{_RUNTIME}"
        )
    check_plain_writes(model.spec, what=what)
    iv.hooks(model)  # widths
    left, right = iv.factors(None)  # M = I + left rightᵀ (float64)
    return Plan(what, edits=[lambda t: apply_rank_one(t.hf, residual_writers(t), left, right)], touches_embedding=True)


def _plan_linear(model: Model, iv: LinearRedirect | MultiKeyRedirect) -> Plan:
    what = type(iv).__name__
    _require_all_positions(iv, what)
    path, delta = iv.weight_update(model)
    return Plan(what, edits=[_add_to(f"{path}.weight", delta.double())])


def _plan_columns(model: Model, iv: ColumnEdit) -> Plan:
    plan = Plan("ColumnEdit")
    for target in iv.targets(model):  # checks every address
        plan.edits.append(_columns_edit(target, iv.scale))
    return plan


def _columns_edit(target, scale: float) -> Edit:
    """``v_j <- scale * v_j + add_j`` for the target's columns (float64 arithmetic, stored in the weight's dtype)."""

    def edit(t: Model) -> None:
        group = target.group
        with torch.no_grad():
            view = torch.movedim(group.weight(t), group.neuron_axis, 0)  # a view of the live parameter
            cols = torch.tensor(target.columns, dtype=torch.long, device=view.device)
            new = scale * view[cols].double() + target.add.to(view.device)
            view[cols] = new.to(view.dtype)

    return edit


def _plan_clamp(model: Model, iv: Clamp) -> Plan:
    raise NotBakeableError(
        "Clamp sets the projection on a direction at chosen layers' inputs to a constant: that replaces part of the "
        "residual stream, which no weight edit of the writers reproduces without also changing what earlier layers "
        f"read. {_RUNTIME}"
    )


BAKERS: dict[type, Callable[[Model, Any], Plan]] = {
    Ablate: _plan_ablate,
    AddVector: _plan_add,
    HeadAblation: _plan_heads,
    ExpertMask: _plan_experts,
    RankOneRedirect: _plan_redirect,
    LinearRedirect: _plan_linear,
    MultiKeyRedirect: _plan_linear,
    ColumnEdit: _plan_columns,
    Clamp: _plan_clamp,
}


def plan(model: Model, intervention: Any) -> Plan:
    """Check that ``intervention`` is bakeable on ``model`` and return what baking it takes (nothing is changed).

    Example:
        >>> plan(model, HeadAblation([(1, 0)], mode="mean", means=m)).biases   # doctest: +SKIP
        {'o_proj': {1}}
    """
    for kind, planner in BAKERS.items():
        if type(intervention) is kind:
            return planner(model, intervention)
    names = ", ".join(sorted({k.__name__ for k in BAKERS if k is not Clamp}))
    raise NotBakeableError(
        f"no weight-edit form is known for {type(intervention).__name__}; bakeable interventions: {names}. {_RUNTIME}"
    )


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
        >>> baked = bake(model, AddVector(direction, coeff=4.0, layers=[6]))   # doctest: +SKIP
        >>> baked.generate(["Write a poem."])                                  # doctest: +SKIP
    """
    if open_sessions(model):
        raise NotBakeableError("bake() inside an open `with model.apply(...)` / `model.hooks()` scope; bake outside it")
    p = plan(model, intervention)
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
