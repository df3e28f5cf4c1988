"""MLP down-projection columns: address them, read them, and scale or shift them (``ColumnEdit``).

A column is one intermediate neuron's write vector: ``v = down_proj.weight[:, j]`` of a dense MLP
(METHODS 8, a "concept vector"), the same column of one routed expert inside the fused 3D expert
parameter, or of a shared expert. Addresses:

* ``(layer, column)`` — the dense MLP of ``layer``;
* ``(layer, expert, column)`` — routed expert ``expert`` of ``layer``'s MoE block;
* ``(layer, "shared", column)`` — the shared expert of ``layer``'s MoE block (Qwen2-MoE, DeepSeek).

:class:`ColumnEdit` replaces each chosen column by ``scale * v + add[i]`` (``scale=0``: ablate the
neuron; ``add``: e.g. the noise of :func:`noise_edit`, METHODS 8's validation). At runtime it hooks the
down projection's *output* and adds ``a_j · ((scale - 1) v + add_j)``, where ``a_j`` is neuron
``j``'s activation (the down projection's input for a dense MLP; for a routed expert it is recomputed
from the fused ``gate_up`` parameter with the experts module's own gate, only for the tokens routed to
it, times their routing weight). The weight form (``training.bake``) writes the new columns.
Reading columns (:func:`~steerlab.measure.column_activations`) and drawing random baselines
(:func:`~steerlab.measure.columns.random_columns`) are measurements, in :mod:`steerlab.measure.columns`.

Example:
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("deepseek_v3")       # layer 0: dense MLP; layers 1-2: 4 routed experts + a shared one
    >>> edit = ColumnEdit([(0, 40), (2, 1, 5), (2, "shared", 3)], scale=0.0)
    >>> [step.where for step in model.plan(edit).steps]
    ['mlp.down_proj @ 0', 'mlp.experts @ 2', 'mlp.shared_experts.down_proj @ 2']
    >>> with model.apply(edit):
    ...     texts = model.generate(["Which language did Guido van Rossum create?"], max_new_tokens=4)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from steerlab.arch import mlp_down, normalize_layer, resolve_path
from steerlab.errors import EmptyInputError, InvalidValueError, ShapeError, SteerlabError
from steerlab.moe import expert_activations  # noqa: F401  (re-exported: the neuron activations of a routed expert)
from steerlab.plan import ColumnDelta, ColumnsUpdate, Plan, Step, WeightEdit

if TYPE_CHECKING:
    from steerlab.model import Model

SHARED = "shared"
Expert = int | str | None  # None: dense MLP; int: routed expert; "shared": shared expert
Column = tuple[int, int] | tuple[int, int | str, int]


class ColumnIndexError(SteerlabError, IndexError):
    """A column address names a layer, expert or neuron the model does not have."""


@dataclass(frozen=True)
class ColumnGroup:
    """The columns of one down projection: a dense MLP's, one routed expert's or a shared expert's.

    ``path`` is the weight's parameter path from the model root; for a routed expert it is the fused
    ``[E, ...]`` parameter and ``expert`` picks the slice. ``neuron_axis`` indexes neurons in that slice;
    ``module`` is the module whose output the runtime edit hooks (the Linear, or the experts module).
    """

    layer: int
    expert: Expert
    path: str
    neuron_axis: int
    n_columns: int
    module: str

    def address(self, column: int) -> Column:
        """The column address of neuron ``column`` in this group."""
        return (self.layer, column) if self.expert is None else (self.layer, self.expert, column)

    def weight(self, model: Model) -> torch.Tensor:
        """The weight slice ``[..]`` that holds these columns (a view of the live parameter)."""
        owner, _, name = self.path.rpartition(".")
        t = getattr(resolve_path(model.hf, owner), name)
        return t[self.expert] if isinstance(self.expert, int) else t

    def vectors(self, model: Model, columns: Sequence[int] | None = None) -> torch.Tensor:
        """The columns as rows ``[n, d]`` (float32, CPU), all of them or the ``columns`` given."""
        w = torch.movedim(self.weight(model).detach(), self.neuron_axis, 0)
        if columns is not None:
            w = w[torch.as_tensor(list(columns), dtype=torch.long, device=w.device)]
        return w.float().cpu()


def _size(weight: torch.Tensor, axis: int) -> int:
    return int(weight.shape[axis])


def layer_groups(model: Model, layer: int) -> list[ColumnGroup]:
    """The column groups of one layer: its dense MLP, or every routed expert plus any shared expert.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("qwen2_moe")
        >>> [(g.expert, g.n_columns) for g in layer_groups(model, 1)]
        [(0, 32), (1, 32), (2, 32), (3, 32), ('shared', 48)]
    """
    down = mlp_down(model.spec, model.hf, layer)
    idx = down.layer
    if down.dense is not None:
        linear = resolve_path(model.hf, down.dense)
        return [ColumnGroup(idx, None, f"{down.dense}.weight", 1, _size(linear.weight, 1), down.dense)]
    layout = down.layout
    fused = getattr(resolve_path(model.hf, down.experts), layout.down)
    n_cols = _size(fused, layout.down_neuron_axis + 1)
    groups = [
        ColumnGroup(idx, e, f"{down.experts}.{layout.down}", layout.down_neuron_axis, n_cols, down.experts)
        for e in range(int(fused.shape[0]))
    ]
    if down.shared is not None:
        linear = resolve_path(model.hf, down.shared)
        groups.append(ColumnGroup(idx, SHARED, f"{down.shared}.weight", 1, _size(linear.weight, 1), down.shared))
    return groups


def column_groups(model: Model, *, layers: Sequence[int] | int | None = None) -> list[ColumnGroup]:
    """Every column group of the chosen layers (default: all), layer by layer.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")                 # 3 dense MLPs of 96 neurons
        >>> sum(g.n_columns for g in column_groups(model)), len(column_groups(model, layers=[1, 2]))
        (288, 2)
    """
    return [g for layer in model.layer_indices(layers) for g in layer_groups(model, layer)]


def _as_address(item) -> Column:
    try:
        parts = tuple(item)
    except TypeError:
        raise ColumnIndexError(f"a column is (layer, column) or (layer, expert, column); got {item!r}") from None
    ok_ints = all(isinstance(p, int) and not isinstance(p, bool) for p in (parts[0], parts[-1])) if parts else False
    if len(parts) == 2 and ok_ints:
        return (int(parts[0]), int(parts[1]))
    if (
        len(parts) == 3
        and ok_ints
        and (parts[1] == SHARED or (isinstance(parts[1], int) and not isinstance(parts[1], bool)))
    ):
        return (int(parts[0]), parts[1] if parts[1] == SHARED else int(parts[1]), int(parts[2]))
    raise ColumnIndexError(
        f"a column is (layer, column), (layer, expert, column) or (layer, 'shared', column) with int indices; got {item!r}"
    )


def resolve_column(model: Model, column: Column) -> tuple[ColumnGroup, int]:
    """The group that holds ``column`` and the neuron index in it (negative indices resolved), or a clear error.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> group, j = resolve_column(model, (-1, -1))
        >>> group.path, j
        ('model.layers.2.mlp.down_proj.weight', 95)
    """
    address = _as_address(column)
    layer = normalize_layer(address[0], model.n_layers)
    groups = layer_groups(model, layer)
    expert: Expert = None if len(address) == 2 else address[1]
    dense = groups[0].expert is None
    if dense and expert is not None:
        raise ColumnIndexError(
            f"layer {layer} of this {model.spec.model_type} model is a dense MLP: address its columns as ({layer}, column), "
            f"not {column!r}"
        )
    if not dense and expert is None:
        n_routed = sum(isinstance(g.expert, int) for g in groups)
        shared = " or (layer, 'shared', column)" if any(g.expert == SHARED for g in groups) else ""
        raise ColumnIndexError(
            f"layer {layer} is an MoE layer with {n_routed} routed experts: address a column as "
            f"({layer}, expert, column){shared}, not {column!r}"
        )
    if expert is None:
        group = groups[0]
    elif expert == SHARED:
        found = [g for g in groups if g.expert == SHARED]
        if not found:
            raise ColumnIndexError(
                f"layer {layer} of this {model.spec.model_type} model has no shared expert; use a routed expert index"
            )
        group = found[0]
    else:
        routed = [g for g in groups if isinstance(g.expert, int)]
        e = expert + len(routed) if expert < 0 else expert
        if not 0 <= e < len(routed):
            raise ColumnIndexError(
                f"expert {expert} is out of range at layer {layer}: it has {len(routed)} routed experts; "
                f"use 0..{len(routed) - 1}"
            )
        group = routed[e]
    j = address[-1] + group.n_columns if address[-1] < 0 else address[-1]
    if not 0 <= j < group.n_columns:
        raise ColumnIndexError(
            f"column {address[-1]} is out of range for {column!r}: that down projection has {group.n_columns} columns "
            f"(intermediate neurons); use 0..{group.n_columns - 1}"
        )
    return group, j


@dataclass(frozen=True)
class ColumnTarget:
    """The part of a :class:`ColumnEdit` that lands on one group: neuron indices and what is added to each."""

    group: ColumnGroup
    columns: tuple[int, ...]
    add: torch.Tensor  # [len(columns), d] float64 (zeros when the edit only scales)


@dataclass(frozen=True, eq=False)
class ColumnEdit:
    """Replace down-projection columns by ``scale * v + add[i]`` (module docs; METHODS 8).

    ``columns`` are addresses as in the module docs (e.g. from
    :meth:`~steerlab.steering.concept_vectors.ConceptSearch.columns`); ``add`` is ``[len(columns), d]``
    or ``None``. Applies to every token (prompt and generated); exact weight form via ``training.bake``.

    Example:
        >>> from steerlab.steering.concept_vectors import find_concept_vectors
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> search = find_concept_vectors(model, ["poem"])
        >>> with model.apply(ColumnEdit(search.columns(10), scale=0.0)):
        ...     texts = model.generate(["Write a short poem."], max_new_tokens=4)
    """

    columns: tuple[Column, ...]
    scale: float = 0.0
    add: torch.Tensor | None = None

    def __post_init__(self) -> None:
        items = tuple(_as_address(c) for c in self.columns)
        if not items:
            raise EmptyInputError("ColumnEdit needs at least one column address")
        object.__setattr__(self, "columns", items)
        object.__setattr__(self, "scale", float(self.scale))
        if self.add is not None:
            add = torch.as_tensor(self.add).detach().to("cpu", torch.float32)
            if add.dim() != 2 or add.shape[0] != len(items):
                raise ShapeError(f"add must be [{len(items)} columns, d]; got {tuple(add.shape)}")
            object.__setattr__(self, "add", add)

    def targets(self, model: Model) -> list[ColumnTarget]:
        """The edit per column group on ``model``, with every address checked (duplicates are an error)."""
        d = model.d_model
        if self.add is not None and self.add.shape[1] != d:
            raise ShapeError(f"add has width {self.add.shape[1]} but {model.name} has d_model={d}")
        by_group: dict[tuple[int, Expert], tuple[ColumnGroup, list[int], list[torch.Tensor]]] = {}
        seen: set[tuple] = set()
        for i, column in enumerate(self.columns):
            group, j = resolve_column(model, column)
            key = (group.layer, group.expert, j)
            if key in seen:
                raise ColumnIndexError(
                    f"column {group.address(j)} is listed twice in this ColumnEdit; list each column once"
                )
            seen.add(key)
            entry = by_group.setdefault((group.layer, group.expert), (group, [], []))
            entry[1].append(j)
            entry[2].append(self.add[i].double() if self.add is not None else torch.zeros(d, dtype=torch.float64))
        return [ColumnTarget(g, tuple(cols), torch.stack(adds)) for g, cols, adds in by_group.values()]

    def resolve(self, model: Model) -> Plan:
        """``ColumnDelta`` on each touched down projection (the Linear, or the fused experts module)."""
        steps = []
        prefix = f"{model.spec.layers}."
        for target in self.targets(model):
            group = target.group
            v = group.vectors(model, target.columns).double()
            delta = (self.scale - 1.0) * v + target.add  # [n, d]: how each neuron's write changes
            expert = group.expert if isinstance(group.expert, int) else None
            module = group.module[len(prefix):].split(".", 1)[1]  # the path inside the decoder layer
            steps.append(Step(group.layer, "module", ColumnDelta(target.columns, delta, expert), module=module))
        return Plan(type(self).__name__, tuple(steps))

    def weights(self, model: Model) -> tuple[WeightEdit, ...]:
        """Each column becomes ``scale * v + add`` in its weight (dense, shared, or a routed expert's slice)."""
        return tuple(
            ColumnsUpdate(t.group.path, t.group.expert if isinstance(t.group.expert, int) else None,
                          t.group.neuron_axis, t.columns, self.scale, t.add)  # fmt: skip
            for t in self.targets(model)
        )


def noise_edit(model: Model, columns: Sequence[Column], *, std: float = 0.1, seed: int = 0) -> ColumnEdit:
    """METHODS 8's validation edit: add ``N(0, std²)`` noise (``std=0.1``) to each column, ``v <- v + ε``.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> edit = noise_edit(model, [(1, 5), (2, 17)])
        >>> edit.scale, edit.add.shape, round(float(edit.add.std()), 1)
        (1.0, torch.Size([2, 64]), 0.1)
    """
    columns = tuple(_as_address(c) for c in columns)
    if not columns:
        raise EmptyInputError("noise_edit needs at least one column address")
    if std < 0:
        raise InvalidValueError(f"std must be >= 0 (the noise's standard deviation); got {std}")
    noise = torch.randn(len(columns), model.d_model, generator=torch.Generator().manual_seed(seed)) * std
    return ColumnEdit(columns, scale=1.0, add=noise)
