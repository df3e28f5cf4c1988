"""Render an intervention's weight form (a tuple of :mod:`steerlab.plan` weight edits) as tensor edits.

:func:`render` checks every edit against the model and returns a :class:`WeightChange`: which modules need a
bias they do not have (``training.bake`` rebuilds the model with one), whether the embedding is edited (tied
embeddings are untied first), and the edits to run on the copy. Nothing is changed here.

* :class:`~steerlab.plan.MapWriters` — ``W_out' = (I + left rightᵀ) W_out`` for every residual writer.
* :class:`~steerlab.plan.AddToResidual` — layer 0: ``+ v / s`` on every embedding row (``s``: the embedding
  scale the model applies, measured); layer l > 0: a bias ``v / residual_scale`` on layer l-1's MLP output, the
  last write before layer l (dense ``down_proj``; gpt-oss: every expert's down bias, as its routing weights
  sum to 1).
* :class:`~steerlab.plan.FillHeads` — zero the heads' o_proj input columns; with means, fold ``W_O[:, h] m_h``
  into the o_proj bias.
* :class:`~steerlab.plan.ExpertsOff` — the expert's router row set to 0 and its router bias very negative.
* :class:`~steerlab.plan.SharedOff` — the shared expert's down projection (and bias) zeroed.
* :class:`~steerlab.plan.ModuleDelta` — ``W += ΔW``.
* :class:`~steerlab.plan.ColumnsUpdate` — chosen columns become ``scale * v + add``.

Example:
    >>> import steerlab
    >>> from steerlab.testing import tiny_model, tiny_direction
    >>> model = tiny_model("llama")
    >>> iv = steerlab.AddVector(tiny_direction(model, layer=2), coeff=3.0)
    >>> render(model, iv.weights(model), what="AddVector").biases
    {'down_proj': {1}}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from steerlab import moe
from steerlab.arch import mlp_down, resolve_path
from steerlab.backends.writers import apply_rank_one, check_plain_writes, mlp_writers, residual_writers, tensor_at
from steerlab.errors import NotBakeableError
from steerlab.hooks import StopForward
from steerlab.plan import (
    AddToResidual,
    ColumnsUpdate,
    ExpertsOff,
    FillHeads,
    MapWriters,
    ModuleDelta,
    SharedOff,
    WeightEdit,
)

if TYPE_CHECKING:
    from steerlab.model import Model

Edit = Callable[["Model"], None]
RUNTIME_ONLY = "Apply it at runtime instead: `with model.apply(iv): ...`"


@dataclass
class WeightChange:
    """What a bake needs (biases on roles at layers, an untied embedding) and the edits to run on the copy."""

    what: str
    edits: list[Edit] = field(default_factory=list)
    biases: dict[str, set[int]] = field(default_factory=dict)  # role -> layers whose module needs a bias
    touches_embedding: bool = False

    def need_bias(self, role: str, layer: int) -> None:
        self.biases.setdefault(role, set()).add(layer)


# ----- tensor edits -----
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


# ----- measured facts -----
def embedding_scale(model: Model) -> float:
    """The factor the model applies between the embedding rows and layer 0's input, measured on a forward pass
    (1 for most families, sqrt(d) for Gemma, ``embedding_multiplier`` for Granite).

    Example:
        >>> from steerlab.testing import tiny_model
        >>> round(embedding_scale(tiny_model("gemma2")), 4)
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
        raise StopForward

    with model.hooks(check_fired=False) as hooks:
        hooks.add("resid_pre", 0, grab)
        with torch.inference_mode():
            try:
                model.hf(input_ids=ids[None].to(model.device), use_cache=False)
            except StopForward:
                pass
    x, e = seen["x"][0].double().cpu(), weight[ids].double().cpu()
    scale = float((x * e).sum() / (e * e).sum())
    err = float((x - scale * e).norm() / x.norm())
    if err > max(1e-3, 4 * torch.finfo(weight.dtype).eps):  # bf16 rounds layer 0's input by ~0.4%
        raise NotBakeableError(
            f"layer 0's input is not a scaled embedding row in this {model.spec.model_type} model (relative "
            f"residual {err:.2g}: position embeddings or another map?), so an addition at layer 0 has no "
            f"embedding-row form. {RUNTIME_ONLY}"
        )
    return scale


def _residual_scale(model: Model) -> float:
    attr = model.spec.residual_scale
    return float(getattr(model.config, attr)) if attr else 1.0


def _weights_sum_to_one(model: Model, layer: int) -> bool:
    """Whether the routed experts' weights of ``layer`` sum to 1 at every token (so a shared constant adds once)."""
    spec = model.spec
    kind = spec.moe.routing
    if kind == "topk_softmax":
        return True
    if kind == "softmax_topk":
        return spec.renormalizes(model.config)
    router = moe.router_of(model, layer)
    return bool(router.norm_topk_prob) and float(router.routed_scaling_factor) == 1.0


# ----- one renderer per weight edit -----
def _map_writers(model: Model, edit: MapWriters, change: WeightChange) -> None:
    check_plain_writes(model.spec, what=change.what)
    left, right = edit.left.double(), edit.right.double()
    change.edits.append(lambda t: apply_rank_one(t.hf, residual_writers(t), left, right))
    change.touches_embedding = True


def _add_to_residual(model: Model, edit: AddToResidual, change: WeightChange) -> None:
    spec, layer, vec = model.spec, edit.layer, edit.vector.double()
    if layer == 0:
        change.edits.append(_add_to(f"{spec.embed}.weight", vec / embedding_scale(model)))
        change.touches_embedding = True
        return
    prev = layer - 1
    if spec.mlp_out != spec.mlp:
        raise NotBakeableError(
            f"{change.what} at layer {layer} adds to the residual stream after layer {prev}'s MLP, whose output "
            f"reaches the stream through {spec.mlp_out!r} (a post-norm) in {spec.model_type}, so no bias can carry "
            f"it. Only layer 0 (the embedding) can be baked here. {RUNTIME_ONLY}"
        )
    shift = vec / _residual_scale(model)
    down = mlp_down(spec, model.hf, prev)
    if down.dense is not None:
        change.need_bias("down_proj", prev)
        change.edits.append(_add_to(f"{down.dense}.bias", shift))
        return
    experts_path, bias_name = down.experts, down.layout.down_bias
    experts = resolve_path(model.hf, experts_path)
    if bias_name is None or getattr(experts, bias_name, None) is None:
        raise NotBakeableError(
            f"{change.what} at layer {layer} needs a constant on layer {prev}'s MoE output, and {spec.model_type}'s "
            f"experts have no down-projection bias to hold it. Only layer 0 (the embedding) can be baked "
            f"here. {RUNTIME_ONLY}"
        )
    if not _weights_sum_to_one(model, prev):
        raise NotBakeableError(
            f"{change.what} at layer {layer}: layer {prev}'s routing weights do not sum to 1, so a constant on every "
            f"expert's bias would not add exactly once. {RUNTIME_ONLY}"
        )
    change.edits.append(_add_to(f"{experts_path}.{bias_name}", shift[None, :]))


def _fill_heads(model: Model, edit: FillHeads, change: WeightChange) -> None:
    spec = model.spec
    o_path = _layer_path(model, edit.layer, spec.o_proj)
    dh = spec.head_dim(model.hf, edit.layer)
    cols = torch.cat([torch.arange(h * dh, (h + 1) * dh) for h in edit.heads])
    if edit.means is not None:
        weight = tensor_at(model.hf, f"{o_path}.weight").detach().double().cpu()
        change.need_bias("o_proj", edit.layer)
        change.edits.append(_add_to(f"{o_path}.bias", weight[:, cols] @ edit.means.double().reshape(-1)))
    change.edits.append(_set(f"{o_path}.weight", (slice(None), cols), 0.0))


def _very_negative(dtype: torch.dtype) -> float:
    return max(-1e9, float(torch.finfo(dtype).min))


def _experts_off(model: Model, edit: ExpertsOff, change: WeightChange) -> None:
    spec, layer = model.spec, edit.layer
    router = moe.router_of(model, layer)
    bias_name = spec.moe.router_bias
    bias = getattr(router, bias_name, None) if bias_name else None
    if not isinstance(bias, torch.Tensor):
        raise NotBakeableError(
            f"switching experts off at layer {layer} needs a router bias to push their logits below every other, "
            f"and {spec.model_type}'s router ({type(router).__name__}) has none: a weight row alone cannot keep an "
            f"expert out of the top-k for every input. {RUNTIME_ONLY}"
        )
    groups = spec.moe.limited_groups(router)
    if groups is not None:
        raise NotBakeableError(
            f"layer {layer} keeps the best {groups[0]} of {groups[1]} expert groups, ranked with the "
            f"switched-off experts' scores; a bias that keeps them out would also change which groups are kept. "
            f"{RUNTIME_ONLY}"
        )
    router_path = _layer_path(model, layer, f"{spec.moe.block}.{spec.moe.router}")
    index = torch.tensor(edit.experts)
    change.edits.append(_set(f"{router_path}.weight", index, 0.0))
    change.edits.append(_set(f"{router_path}.{bias_name}", index, _very_negative(bias.dtype)))


def _shared_off(model: Model, edit: SharedOff, change: WeightChange) -> None:
    for w in mlp_writers(model, edit.layer):
        if w.role == "shared_experts":  # its output is 0 with a zero down projection (and bias)
            change.edits.append(_set(w.path, slice(None), 0.0))


def _module_delta(model: Model, edit: ModuleDelta, change: WeightChange) -> None:
    change.edits.append(_add_to(f"{_layer_path(model, edit.layer, edit.module)}.weight", edit.delta.double()))


def _columns_update(model: Model, edit: ColumnsUpdate, change: WeightChange) -> None:
    owner, _, name = edit.path.rpartition(".")

    def apply(t: Model) -> None:
        weight = getattr(resolve_path(t.hf, owner), name)
        weight = weight[edit.expert] if edit.expert is not None else weight
        with torch.no_grad():
            view = torch.movedim(weight, edit.neuron_axis, 0)  # a view of the live parameter
            cols = torch.tensor(edit.columns, dtype=torch.long, device=view.device)
            new = edit.scale * view[cols].double() + edit.add.to(view.device)
            view[cols] = new.to(view.dtype)

    change.edits.append(apply)


RENDERERS: dict[type, Callable[[Any, Any, WeightChange], None]] = {
    MapWriters: _map_writers,
    AddToResidual: _add_to_residual,
    FillHeads: _fill_heads,
    ExpertsOff: _experts_off,
    SharedOff: _shared_off,
    ModuleDelta: _module_delta,
    ColumnsUpdate: _columns_update,
}


def render(model: Model, edits: Sequence[WeightEdit], *, what: str) -> WeightChange:
    """Check ``edits`` against ``model`` and return the :class:`WeightChange` that carries them out (nothing is
    changed yet); ``what`` names the intervention in errors."""
    change = WeightChange(what)
    for edit in edits:
        renderer = RENDERERS.get(type(edit))
        if renderer is None:
            raise NotBakeableError(f"no weight renderer for {type(edit).__name__}; known: {', '.join(k.__name__ for k in RENDERERS)}")
        renderer(model, edit, change)
    return change
