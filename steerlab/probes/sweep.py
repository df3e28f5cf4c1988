"""Cross-validated probe sweeps over layers x positions, with a plotly heatmap.

Every (layer, position) cell gets its own logistic probe; for each fold all cells are fitted in
one batched Newton solve (chunked to bound memory), and scored on the held-out fold by
accuracy and ROC AUC.

Example:
    >>> from steerlab.data import DEMO_HARMFUL, DEMO_HARMLESS
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> result = sweep_prompts(model, DEMO_HARMFUL, DEMO_HARMLESS, positions=["last"], n_folds=3, progress=False)
    >>> result.accuracy.shape                  # [layers, columns]
    torch.Size([3, 1])
    >>> layer, column, accuracy = result.best("accuracy")
    >>> column, 0.0 <= accuracy <= 1.0
    ('last', True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from steerlab.activations import collect
from steerlab.chat import Position
from steerlab.errors import EmptyInputError, InvalidValueError, ShapeError
from steerlab.probes.fast import fit_standardized
from steerlab.probes.metrics import roc_auc, stratified_folds
from steerlab.probes.probe import example_weights

if TYPE_CHECKING:
    from steerlab.model import Model

_CHUNK_BYTES = 512 * 2**20


@dataclass(frozen=True)
class SweepResult:
    """Held-out accuracy and AUC per (layer, position column), mean and std over folds."""

    layers: tuple[int, ...]
    columns: tuple[str, ...]
    accuracy: torch.Tensor  # [n_layers, n_columns]
    accuracy_std: torch.Tensor
    auc: torch.Tensor
    auc_std: torch.Tensor
    n_folds: int
    n_samples: int

    def _metric(self, metric: str) -> torch.Tensor:
        if metric not in ("accuracy", "auc"):
            raise InvalidValueError(f"metric must be 'accuracy' or 'auc'; got {metric!r}")
        return self.accuracy if metric == "accuracy" else self.auc

    def best(self, metric: str = "accuracy") -> tuple[int, str, float]:
        """(layer, column, value) of the best cell; ties go to the earliest layer, then column."""
        values = self._metric(metric)
        flat = int(torch.argmax(values))
        i, j = divmod(flat, values.shape[1])
        return self.layers[i], self.columns[j], float(values[i, j])

    def table(self, metric: str = "accuracy") -> str:
        """Plain-text table: one row per layer, one column per position."""
        values = self._metric(metric)
        width = max(8, *(len(c) for c in self.columns))
        lines = ["layer " + " ".join(c.rjust(width) for c in self.columns)]
        for i, layer in enumerate(self.layers):
            lines.append(f"{layer:>5} " + " ".join(f"{float(v):.3f}".rjust(width) for v in values[i]))
        return "\n".join(lines)

    def figure(self, metric: str = "accuracy"):
        """Plotly heatmap (positions x layers) of the held-out ``metric``."""
        import plotly.graph_objects as go

        values = self._metric(metric)
        fig = go.Figure(go.Heatmap(z=values.T.tolist(), x=list(self.layers), y=list(self.columns), colorscale="Viridis", colorbar={"title": metric}))
        fig.update_layout(title=f"Probe {metric} ({self.n_folds}-fold CV, n={self.n_samples})", xaxis_title="layer", yaxis_title="position")
        return fig

    def to_dict(self) -> dict:
        """JSON-ready summary."""
        return {
            "layers": list(self.layers),
            "columns": list(self.columns),
            "accuracy": self.accuracy.tolist(),
            "accuracy_std": self.accuracy_std.tolist(),
            "auc": self.auc.tolist(),
            "auc_std": self.auc_std.tolist(),
            "n_folds": self.n_folds,
            "n_samples": self.n_samples,
        }


def sweep(
    x: torch.Tensor,
    y: Sequence[int] | torch.Tensor,
    *,
    layers: Sequence[int],
    columns: Sequence[str] | None = None,
    n_folds: int = 5,
    C: float = 1.0,
    standardize: bool = True,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    folds: torch.Tensor | None = None,
    balanced: bool = False,
    sample_weight: torch.Tensor | None = None,
) -> SweepResult:
    """Cross-validate a probe per (layer, position) on ``x`` ``[n, n_layers, n_positions, d]``.

    ``folds`` (``[n]`` fold indices, e.g. :func:`~steerlab.probes.metrics.grouped_folds` to hold out whole
    sources) replaces the seeded stratified folds; ``n_folds`` is then their count. ``balanced`` and
    ``sample_weight`` weight each fold's fit as in :func:`~steerlab.probes.probe.fit_probes`.

    Example:
        >>> x = torch.randn(60, 2, 3, 4); y = (x[:, 1, 2, 0] > 0).long()
        >>> r = sweep(x, y, layers=[0, 1], n_folds=3)
        >>> r.best()[:2]
        (1, '2')
    """
    y = torch.as_tensor(y).long()
    if x.dim() == 3:
        x = x[:, :, None]
    if x.dim() != 4 or x.shape[1] != len(layers):
        raise ShapeError(f"x must be [n, {len(layers)} layers, n_positions, d]; got {tuple(x.shape)}")
    n, n_layers, n_pos, d = x.shape
    if len(y) != n:
        raise ShapeError(f"{n} activations but {len(y)} labels")
    columns = tuple(columns) if columns is not None else tuple(str(j) for j in range(n_pos))
    if len(columns) != n_pos:
        raise ShapeError(f"{len(columns)} column names for {n_pos} positions")
    if folds is None:
        folds = stratified_folds(y, n_folds=n_folds, seed=seed)
    elif len(folds) != n:
        raise ShapeError(f"{len(folds)} fold indices for {n} samples")
    else:
        n_folds = int(folds.max()) + 1
    if sample_weight is not None:
        sample_weight = torch.as_tensor(sample_weight, dtype=torch.float64)
        if sample_weight.shape != (n,):
            raise ShapeError(f"sample_weight must hold one weight per sample ({n}); got shape {tuple(sample_weight.shape)}")
    problems = x.reshape(n, n_layers * n_pos, d).transpose(0, 1)  # [k, n, d]
    chunk = max(1, _CHUNK_BYTES // max(1, n * d * 8 * 2))
    acc = torch.zeros(n_folds, n_layers * n_pos)
    auc = torch.zeros(n_folds, n_layers * n_pos)
    for f in range(n_folds):
        train, test = folds != f, folds == f
        for start in range(0, problems.shape[0], chunk):
            part = problems[start : start + chunk]
            weight = example_weights(y[train], balanced=balanced, sample_weight=None if sample_weight is None else sample_weight[train])
            w, b = fit_standardized(part[:, train], y[train], C=C, sample_weight=weight, standardize=standardize, dtype=dtype)
            logits = torch.einsum("knd,kd->kn", part[:, test].double(), w.double()) + b.double()[:, None]
            acc[f, start : start + chunk] = ((logits > 0).long() == y[test]).float().mean(-1)
            auc[f, start : start + chunk] = torch.tensor([roc_auc(row, y[test]) for row in logits])
    shape = (n_layers, n_pos)
    return SweepResult(
        layers=tuple(layers),
        columns=columns,
        accuracy=acc.mean(0).reshape(shape),
        accuracy_std=acc.std(0).reshape(shape),
        auc=auc.mean(0).reshape(shape),
        auc_std=auc.std(0).reshape(shape),
        n_folds=n_folds,
        n_samples=n,
    )


def position_columns(model: Model, positions: Sequence[Position], widths: Sequence[int]) -> list[str]:
    """Readable column names: ``post_inst`` columns carry their template token."""
    header = model.chat().header_ids
    names = []
    for p, k in zip(positions, widths):
        if k == 1:
            names.append(str(p))
        elif p == "post_inst" and k == len(header):
            names.extend(f"post_inst:{model.tokenizer.decode([t])!r}" for t in header)
        else:
            names.extend(f"{p}[{j}]" for j in range(k))
    return names


def sweep_prompts(
    model: Model,
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    positions: Sequence[Position] = ("t_inst", "post_inst"),
    layers: Sequence[int] | None = None,
    site: str = "resid_pre",
    n_folds: int = 5,
    C: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> SweepResult:
    """Collect ``site`` activations of two prompt sets and sweep layers x positions."""
    if not positive or not negative:
        raise EmptyInputError("both prompt sets need prompts")
    if "all" in positions:
        raise ShapeError("'all' has a different length per prompt; sweep fixed positions (use trace() for every token)")
    acts = collect(model, list(positive) + list(negative), sites=[site], layers=layers, positions=list(positions), batch_size=batch_size, progress=progress)
    parts = [acts.get(site, p) for p in positions]
    x = torch.cat(parts, dim=2)
    y = torch.tensor([1] * len(positive) + [0] * len(negative))
    columns = position_columns(model, positions, [t.shape[2] for t in parts])
    return sweep(x, y, layers=acts.layers, columns=columns, n_folds=n_folds, C=C, seed=seed)
