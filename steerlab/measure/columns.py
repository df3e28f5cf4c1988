"""Down-projection columns measured: how strongly each is written, and random baselines.

* :func:`column_activations` — the coefficient ``a`` of each column's residual write ``a · v`` at each
  prompt's last token.
* :func:`random_columns` — distinct random column addresses (a baseline for ablations).

Addresses are those of :mod:`steerlab.interventions.columns`.

Example:
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")                     # 3 dense layers, 96 MLP neurons each
    >>> column_activations(model, ["Which language has pip?", "Hi"], [(2, 17), (1, 5), (1, 6)]).shape
    torch.Size([2, 3])
    >>> baseline = ColumnEdit(random_columns(model, 10, seed=1), scale=0.0)
    >>> len(baseline.columns)
    10
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from steerlab.arch import resolve_path
from steerlab.errors import EmptyInputError
from steerlab.interventions.columns import (
    Column,
    ColumnEdit,
    ColumnIndexError,
    ColumnTarget,
    _as_address,
    column_groups,
    resolve_column,
)
from steerlab.moe import expert_activations, routing_inputs
from steerlab.reader import Rows, Tap, read

if TYPE_CHECKING:
    from steerlab.model import Model


def random_columns(model: Model, n: int, *, layers: Sequence[int] | int | None = None, seed: int = 0,
                   exclude: Sequence[Column] = ()) -> list[Column]:  # fmt: skip
    """``n`` distinct column addresses drawn uniformly from the chosen layers' groups (a baseline for ablations).

    Example:
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> columns = random_columns(model, 10, layers=[1, 2], seed=1)
        >>> len(set(columns)), {layer for layer, _ in columns} <= {1, 2}
        (10, True)
        >>> columns == random_columns(model, 10, layers=[1, 2], seed=1)      # seeded
        True
    """
    groups = column_groups(model, layers=layers)
    sizes = torch.tensor([g.n_columns for g in groups])
    total = int(sizes.sum())
    skip = {_as_address(c) for c in exclude}
    if n > total - len(skip):
        raise ColumnIndexError(f"asked for {n} random columns but only {total - len(skip)} are available")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    out: list[Column] = []
    chosen: set[Column] = set()
    while len(out) < n:
        flat = int(torch.randint(total, (1,), generator=gen))
        g = int(torch.searchsorted(starts, flat, right=True)) - 1
        address = groups[g].address(flat - int(starts[g]))
        if address not in skip and address not in chosen:
            chosen.add(address)
            out.append(address)
    return out


class _ColumnReader:
    """Writes the activations of one group's columns at each prompt's last token into ``out[prompt, key]``."""

    def __init__(self, model: Model, target: ColumnTarget, out: torch.Tensor, where: dict[tuple, list[int]]):
        self.model, self.target, self.out, self.where = model, target, out, where

    def update(self, x, rows: Rows, layer: int) -> None:
        group, idx = self.target.group, torch.tensor(rows.idx)
        if isinstance(group.expert, int):
            hidden, index, weights = routing_inputs(resolve_path(self.model.hf, group.module), *x)
            b = len(rows.idx)
            last = [t.reshape(b, -1, t.shape[-1])[:, -1] for t in (hidden, index, weights)]
            w = (last[2] * (last[1] == group.expert)).sum(-1)  # [b]: 0 where not routed
            module = resolve_path(self.model.hf, group.module)
            act = expert_activations(self.model, module, group.expert, self.target.columns, last[0])
            act = act * w[:, None].to(act.dtype)
        else:
            act = x[:, -1, list(self.target.columns)]  # left-padded: the last position is every row's last token
        for n, j in enumerate(self.target.columns):
            for k in self.where[(group.layer, group.expert, j)]:
                self.out[idx, k] = act[:, n].float().cpu()

    def result(self) -> None:
        return None


def column_activations(
    model: Model, prompts: Sequence[str], columns: Sequence[Column], *, chat: bool = True, batch_size: int = 16
) -> torch.Tensor:
    """How strongly each column is written at each prompt's last token: ``[n_prompts, n_columns]`` (float32, CPU).
    A column listed twice is read once and reported twice.

    The coefficient ``a`` in the residual write ``a · v``: the neuron's activation (the down projection's input) for
    a dense MLP or shared expert (a shared expert's own output gate is not included), and routing weight times
    activation for a routed expert (0 where the token is not routed to it). Its sign says whether the column
    writes ``+v`` or ``-v`` in these contexts.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("qwen2_moe")                 # MoE: (layer, expert, column) addresses
        >>> acts = column_activations(model, ["Which language has pip?", "Hi"], [(1, 2, 7), (1, "shared", 7)])
        >>> acts.shape, acts.dtype
        (torch.Size([2, 2]), torch.float32)
    """
    prompts = list(prompts)
    if not prompts:
        raise EmptyInputError("no prompts given")
    resolved = [resolve_column(model, c) for c in columns]
    where: dict[tuple, list[int]] = {}
    for k, (g, j) in enumerate(resolved):
        where.setdefault((g.layer, g.expert, j), []).append(k)
    unique = list(dict.fromkeys(g.address(j) for g, j in resolved))
    targets = ColumnEdit(unique, scale=1.0).targets(model)  # grouped per module
    out = torch.zeros(len(prompts), len(resolved))
    taps = [
        Tap("call" if isinstance(t.group.expert, int) else "input", t.group.layer,
            _ColumnReader(model, t, out, where), module=resolve_path(model.hf, t.group.module))  # fmt: skip
        for t in targets
    ]
    read(model, prompts, taps=taps, batch_size=batch_size, chat=chat)
    return out
