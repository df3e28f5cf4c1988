"""What unlearning may change, as exact parameter masks chosen by interpretability.

A target is a frozen value; :meth:`masks` turns it into ``{parameter path: bool mask}`` on a model (a mask
of ``None`` means the whole parameter). The trainer zeroes every gradient outside the masks and restores
the untouched entries after each step, so everything outside the target stays bit-identical.

* :class:`Layers` — whole decoder layers (or only their MLP or attention parameters);
* :class:`Columns` — MLP down-projection columns, e.g. ConceptVectors' "needles" (METHODS 8) from
  :func:`~steerlab.steering.find_concept_vectors`; addresses as in :class:`~steerlab.interventions.ColumnEdit`
  (``(layer, j)``, ``(layer, expert, j)``, ``(layer, "shared", j)``);
* :class:`Heads` — the ``o_proj`` input columns of chosen attention heads (what each head writes);
* :class:`LoRA` — low-rank adapters (peft) on the chosen layers' linear modules, merged back after training:
  each targeted weight moves by a rank-``r`` matrix, everything else stays bit-identical;
* :class:`Expert` — one routed expert of a fused MoE layer: its slices of every fused expert tensor and its
  row of the router (UOE, METHODS 7: the trainer adds the router anchor loss, which acts through that row).

Example:
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("qwen2_moe")
    >>> masks = Expert(1, 2).masks(model)
    >>> sorted(masks)
    ['model.layers.1.mlp.experts.down_proj', 'model.layers.1.mlp.experts.gate_up_proj', 'model.layers.1.mlp.gate.weight']
    >>> m = masks["model.layers.1.mlp.experts.down_proj"]
    >>> m.shape[0], [int(m[e].sum() > 0) for e in range(m.shape[0])]   # only expert 2's slice
    (4, [0, 0, 1, 0])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from steerlab.arch import mlp_down, normalize_layer, resolve_path, spec_for
from steerlab.errors import EmptyInputError, InvalidValueError
from steerlab.interventions.columns import Column, resolve_column
from steerlab.interventions.heads import normalize_heads
from steerlab.moe import experts_by_layer

if TYPE_CHECKING:
    from steerlab.model import Model

Masks = dict[str, "torch.Tensor | None"]
Part = Literal["all", "mlp", "attn"]


def _parameter(model: Model, path: str) -> torch.Tensor:
    owner, _, name = path.rpartition(".")
    return getattr(resolve_path(model.hf, owner), name)


def _merge(masks: Masks, path: str, mask: torch.Tensor | None) -> None:
    """Add ``mask`` for ``path`` (``None``: whole parameter) to ``masks``, taking the union with any earlier one."""
    if path in masks and (masks[path] is None or mask is None):
        masks[path] = None
    elif path in masks:
        masks[path] = masks[path] | mask
    else:
        masks[path] = mask


@dataclass(frozen=True)
class Layers:
    """Every parameter of the chosen decoder layers (``part="mlp"`` / ``"attn"``: only that block's).

    Example:
        >>> from steerlab.testing import tiny_model
        >>> sorted(Layers((1,), part="mlp").masks(tiny_model("llama")))
        ['model.layers.1.mlp.down_proj.weight', 'model.layers.1.mlp.gate_proj.weight', 'model.layers.1.mlp.up_proj.weight']
    """

    layers: tuple[int, ...]
    part: Part = "all"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(la) for la in self.layers))
        if not self.layers:
            raise EmptyInputError("Layers(...) needs at least one layer index")
        if self.part not in ("all", "mlp", "attn"):
            raise InvalidValueError(f"part must be 'all', 'mlp' or 'attn', got {self.part!r}")

    def masks(self, model: Model) -> Masks:
        """``{path: None}`` for every parameter of the chosen layers' part."""
        out: Masks = {}
        for layer in self.layers:
            idx = normalize_layer(layer, model.n_layers)
            prefix = f"{model.spec.layers}.{idx}"
            sub = {"all": "", "mlp": model.spec.mlp, "attn": model.spec.attn}[self.part]
            root = prefix if not sub else f"{prefix}.{sub}"
            module = resolve_path(model.hf, root)
            for name, _ in module.named_parameters():
                _merge(out, f"{root}.{name}", None)
        return out


@dataclass(frozen=True)
class Columns:
    """Down-projection columns (one neuron's write vector each): ``(layer, j)``, ``(layer, expert, j)`` or
    ``(layer, "shared", j)``. Only those entries of the weight train.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> mask = Columns(((0, 5), (0, 9))).masks(tiny_model("llama"))["model.layers.0.mlp.down_proj.weight"]
        >>> mask.shape, mask.sum(0).nonzero().flatten().tolist()      # [d, I]: every row of columns 5 and 9
        (torch.Size([64, 96]), [5, 9])
    """

    columns: tuple[Column, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "columns", tuple(tuple(c) for c in self.columns))
        if not self.columns:
            raise EmptyInputError("Columns(...) needs at least one column address, e.g. search.columns(10)")

    def masks(self, model: Model) -> Masks:
        """One bool mask per down-projection weight touched, ``True`` on the chosen columns."""
        out: Masks = {}
        for column in self.columns:
            group, j = resolve_column(model, column)
            weight = _parameter(model, group.path)
            mask = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
            view = mask[group.expert] if isinstance(group.expert, int) else mask
            view.select(group.neuron_axis, j).fill_(True)
            _merge(out, group.path, mask)
        return out


@dataclass(frozen=True)
class Heads:
    """The ``o_proj`` input columns of attention heads ``(layer, head)``: what each head writes to the residual.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> mask = Heads(((1, 2),)).masks(tiny_model("llama"))["model.layers.1.self_attn.o_proj.weight"]
        >>> mask.sum(0).nonzero().flatten().tolist()                # head_dim 16: columns 32..47
        [32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47]
    """

    heads: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", tuple((int(la), int(h)) for la, h in self.heads))
        if not self.heads:
            raise EmptyInputError("Heads(...) needs at least one (layer, head) pair")

    def masks(self, model: Model) -> Masks:
        """One bool mask per touched ``o_proj`` weight, ``True`` on the heads' input columns."""
        out: Masks = {}
        for layer, heads in normalize_heads(model, self.heads).items():
            path = f"{model.spec.layers}.{layer}.{model.spec.o_proj}.weight"
            weight = _parameter(model, path)
            dh = model.spec.head_dim(model.hf, layer)
            mask = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
            for h in heads:
                mask[:, h * dh : (h + 1) * dh] = True
            _merge(out, path, mask)
        return out


@dataclass(frozen=True)
class Expert:
    """One routed expert ``expert`` of MoE layer ``layer``: its slice of every fused expert tensor (weights and
    biases) and, with ``router=True``, its row of the router (logit weights and bias). UOE (METHODS 7) trains only
    this; the trainer adds the router anchor loss that keeps the expert selected (through its router row).

    Example:
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("mixtral")
        >>> [(path.rsplit(".", 2)[-2:], int(m.sum())) for path, m in Expert(0, 1).masks(model).items()]
        [(['experts', 'down_proj'], 6144), (['experts', 'gate_up_proj'], 12288), (['gate', 'weight'], 64)]
    """

    layer: int
    expert: int
    router: bool = True

    def resolved(self, model: Model) -> tuple[int, int]:
        """``(layer, expert)`` with negative indices resolved; a dense layer or a bad expert raises."""
        ((layer, experts),) = experts_by_layer(model, [(self.layer, self.expert)]).items()
        return layer, experts[0]

    def masks(self, model: Model) -> Masks:
        """``True`` on ``[expert]`` of each fused tensor of the layer's experts module."""
        layer, expert = self.resolved(model)
        down = mlp_down(model.spec, model.hf, layer)
        layout = down.layout
        out: Masks = {}
        for name in (layout.down, layout.down_bias, layout.gate_up, layout.gate_up_bias):
            path = f"{down.experts}.{name}" if name else None
            if path is None or resolve_path(model.hf, path, missing_ok=True) is None:
                continue
            tensor = _parameter(model, path)
            mask = torch.zeros(tensor.shape, dtype=torch.bool, device=tensor.device)
            mask[expert] = True
            out[path] = mask
        if self.router:
            router = f"{model.spec.layers}.{layer}.{model.spec.moe.block}.{model.spec.moe.router}"
            for name, tensor in resolve_path(model.hf, router).named_parameters(recurse=False):
                if tensor.ndim >= 1 and tensor.shape[0] == mask.shape[0]:  # [E, d] logit rows, [E] bias
                    row = torch.zeros(tensor.shape, dtype=torch.bool, device=tensor.device)
                    row[expert] = True
                    out[f"{router}.{name}"] = row
        return out


@dataclass(frozen=True)
class LoRA:
    """Low-rank adapters of rank ``r`` on ``modules`` (peft names; ``"all-linear"``: every linear of the decoder)
    of ``layers`` (``None``: all). The trainer injects them into its copy, trains only them and merges them.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> peft_model = LoRA(r=4, layers=(1,), modules=("down_proj",)).inject(model.hf)
        >>> sorted(n for n, p in model.hf.named_parameters() if p.requires_grad)
        ['model.layers.1.mlp.down_proj.lora_A.default.weight', 'model.layers.1.mlp.down_proj.lora_B.default.weight']
        >>> base = peft_model.merge_and_unload()     # back to plain Linear modules
    """

    r: int = 8
    alpha: float = 16.0
    layers: tuple[int, ...] | None = None
    modules: str | tuple[str, ...] = "all-linear"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise InvalidValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(la) for la in self.layers))

    def inject(self, hf: torch.nn.Module):
        """Add the adapters to ``hf`` in place (peft); returns the peft wrapper (``merge_and_unload()`` merges)."""
        from peft import LoraConfig, get_peft_model

        n_layers = spec_for(hf).count(hf) if self.layers is not None else 0
        layers = None if self.layers is None else [normalize_layer(la, n_layers) for la in self.layers]
        modules = self.modules if isinstance(self.modules, str) else list(self.modules)
        config = LoraConfig(r=self.r, lora_alpha=self.alpha, target_modules=modules, layers_to_transform=layers,
                            lora_dropout=0.0, bias="none")  # fmt: skip
        return get_peft_model(hf, config)


Target = Layers | Columns | Heads | Expert | LoRA


def parameters_in(model: Model, masks: Masks) -> int:
    """How many scalar parameters the masks cover.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> parameters_in(model, Columns(((0, 5),)).masks(model))      # one column of a [64, 96] weight
        64
    """
    return sum(int(_parameter(model, p).numel()) if m is None else int(m.sum()) for p, m in masks.items())


def as_target(value: Target | Sequence[Column]) -> Target:
    """A target value; a bare list of column addresses becomes :class:`Columns`."""
    if isinstance(value, (Layers, Columns, Heads, Expert, LoRA)):
        return value
    if isinstance(value, Sequence) and not isinstance(value, str):
        return Columns(tuple(value))
    raise InvalidValueError(
        f"target must be Layers(...), Columns(...), Heads(...), Expert(layer, expert) or LoRA(...); got {type(value).__name__}"
    )
