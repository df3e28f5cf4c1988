"""The probe-sweep pipeline: two prompt sets -> a cross-validated sweep over layers x positions -> the best cell's
probe and difference-of-means direction -> files (what ``steerlab probe`` runs).

* :func:`probe_data` — the two prompt sets: two prompt files, or the project's training split.
* :func:`check_sweep_positions` — reject positions that cannot be swept (``"all"``) before loading a model.
* :func:`probe_sweep` — collect, sweep, pick the best cell, fit its probe and direction: a :class:`ProbeRun`. On
  pooled sources the probe (the guard) reads the layers :func:`~steerlab.probes.layer_choice.choose_layers` picks,
  at the one-column position where they do best; they generalise across sources and kinds of prompt better than
  the best cell's one layer.
* :func:`save_probe_run` — ``probe.safetensors``, ``direction.safetensors``, ``sweep.json`` and ``sweep.html``.

Example:
    >>> import tempfile
    >>> from steerlab.report import RunInfo
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> data = probe_data(files=None, seed=0, limit=16, n_folds=2)
    >>> run = probe_sweep(model, data, site="resid_pre", positions=["t_inst", "last"], layers=None,
    ...                   n_folds=2, C=1.0, metric="accuracy", seed=0, batch_size=16)
    >>> info = RunInfo.collect(model=model.name, dtype="float32")
    >>> out = save_probe_run(run, Path(tempfile.mkdtemp()) / "probe", info=info)
    >>> sorted(f.name for f in out.iterdir())
    ['direction.safetensors', 'plotly.min.js', 'probe.safetensors', 'sweep.html', 'sweep.json']
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from steerlab.activations import collect
from steerlab.chat import Position
from steerlab.errors import InvalidValueError
from steerlab.probes.layer_choice import LayerChoice
from steerlab.probes.layer_choice import choose_layers as _choose
from steerlab.probes.metrics import best_threshold, grouped_folds, source_weights, stratified_folds
from steerlab.probes.probe import Probe, fit_probes
from steerlab.probes.sweep import SweepResult, position_columns, sweep

if TYPE_CHECKING:
    from steerlab.model import Model
    from steerlab.report import RunInfo
    from steerlab.steering import Direction

SWEEP_SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out")
DEFAULT_SOURCE = "steerlab.data.guard_sets.guard_training_data()"
DEFAULT_PER_SET = 120
# Pooled means (inst_mean, inst_to_last_mean) separate unseen safe-but-scary kinds better, but a guard fitted on
# steerlab's own sets reading them transfers worse to public sets (experiments/guard_positions_nested.py): not default.
DEFAULT_POSITIONS: tuple[Position, ...] = ("t_inst", "last")
DEFAULT_C = 0.01  # stronger L2 than sklearn's default generalised better across sources (experiments/guards_cross_source.py)
Metric = Literal["accuracy", "auc"]


@dataclass(frozen=True)
class ProbeData:
    """The positive (e.g. harmful) and negative prompts of a sweep, and a line saying where they came from.
    ``groups`` names each prompt's source (positive ones first) when the prompts pool several sources: the sweep
    then holds out whole sources per fold. ``families`` maps sources that share a style but differ in harmfulness
    (a safe-but-scary kind's safe and unsafe prompts) to their family, held out together when the guard's layers are
    chosen."""

    positive: list[str]
    negative: list[str]
    source: str
    groups: list[str] | None = None
    families: dict[str, str] | None = None


@dataclass(frozen=True)
class ProbeRun:
    """A finished sweep: its result, the best cell (``layer``, ``column``, the ``position`` it reads, ``value`` of
    ``metric``), the direction fitted there, the probe (at the best cell, or on pooled sources at the layers of
    ``layer_choice`` and the position where they did best: ``probe.position``), and the settings that produced it."""

    model: str
    data: str
    site: str
    positions: list[Position]
    C: float
    metric: Metric
    result: SweepResult
    layer: int
    column: str
    position: Position
    value: float
    probe: Probe
    direction: Direction
    layer_choice: LayerChoice | None = None

    def best(self) -> dict[str, Any]:
        """The best cell as plain data (``layer``, ``column``, ``position``, ``metric``, ``value``)."""
        return {"layer": self.layer, "column": self.column, "position": self.position, "metric": self.metric,
                "value": self.value}  # fmt: skip

    def guard(self) -> dict[str, Any]:
        """The probe's layers and, when they were chosen, how (plain data for ``sweep.json``)."""
        out: dict[str, Any] = {"layers": list(self.probe.layers), "position": self.probe.position}
        if self.layer_choice is not None:
            c = self.layer_choice
            out |= {"chosen_by": "best minimum of source-held-out and kind-held-out CV AUC (steerlab.probes.layer_choice)",
                    "source_held_out_auc": c.pooled_auc, "kind_held_out_auc": c.family_auc}  # fmt: skip
        return out


def probe_data(
    *,
    files: tuple[str | Path, str | Path] | None,
    seed: int,
    limit: int | None,
    n_folds: int,
    leave_out: Sequence[str] = (),
    scary_kinds: Sequence[str] | None = None,
) -> ProbeData:
    """The two prompt sets of a sweep: ``files`` (positive, negative; see :func:`steerlab.data.files.read_prompts`;
    ``limit`` keeps at most that many prompts per class), or with ``files=None`` the guard training pool of
    :func:`steerlab.data.guard_sets.guard_training_data` (every set written for steerlab and every packaged public
    set; ``limit`` prompts per set, default 120; without the sources ``leave_out`` names; with the safe-but-scary kinds
    ``scary_kinds`` names, default :data:`~steerlab.data.guard_sets.SCARY_KINDS`), whose sources the folds keep whole.

    Raises :class:`~steerlab.errors.InvalidValueError` when a class has fewer prompts than ``n_folds``.
    """
    groups, families = None, None
    if files is not None and leave_out:
        raise InvalidValueError("leave_out selects sources of the built-in pool; with files, leave the prompts out of the files")
    if files is not None and scary_kinds is not None:
        raise InvalidValueError("scary_kinds selects kinds of the built-in pool; with files, put the prompts in the files")
    if files is not None:
        from steerlab.data.files import read_prompts

        pos, neg, source = read_prompts(files[0]), read_prompts(files[1]), f"{files[0]} vs {files[1]}"
        if limit is not None:
            pos, neg = pos[:limit], neg[:limit]
    else:
        from steerlab.data.guard_sets import ALL_SCARY_KINDS, SCARY_KINDS, guard_training_data, kind_families

        kinds = SCARY_KINDS if scary_kinds is None else tuple(scary_kinds)
        data = guard_training_data(per_set=limit or DEFAULT_PER_SET, seed=seed, leave_out=leave_out, scary_kinds=kinds)
        pos, neg, groups = data.harmful, data.harmless, data.harmful_sources + data.harmless_sources
        families = kind_families(groups)
        source = f"{DEFAULT_SOURCE} ({len(data.source_names)} sets, at most {limit or DEFAULT_PER_SET} prompts each)"
        if kinds != SCARY_KINDS:
            source += ", with six more safe-but-scary kinds" if kinds == ALL_SCARY_KINDS else f", safe-but-scary kinds {', '.join(kinds)}"
        if leave_out:
            source += f", without {', '.join(leave_out)}"
    if min(len(pos), len(neg)) < n_folds:
        raise InvalidValueError(
            f"{n_folds}-fold cross-validation needs at least {n_folds} prompts per class; got {len(pos)} and {len(neg)}"
        )
    return ProbeData(positive=pos, negative=neg, source=source, groups=groups, families=families)


def check_sweep_positions(positions: Sequence[Position]) -> None:
    """Raise :class:`~steerlab.errors.InvalidValueError` for ``"all"``, which no sweep can use."""
    if "all" in positions:
        raise InvalidValueError(
            "'all' has a different length per prompt and cannot be swept; "
            "use fixed positions such as t_inst, last, post_inst"
        )


def column_position(positions: Sequence[Position], widths: Sequence[int], column: int) -> Position:
    """The position (name or negative offset) that sweep column ``column`` reads, given each position's width."""
    for p, k in zip(positions, widths):
        if column < k:
            if k == 1:
                return p
            if p == "post_inst":
                return column - k  # the post-instruction span ends at the last prompt token
            raise InvalidValueError(f"position {p!r} spans {k} tokens; pass a single-token position")
        column -= k
    raise IndexError(column)


def probe_sweep(
    model: Model,
    data: ProbeData,
    *,
    site: str,
    positions: Sequence[Position],
    layers: Sequence[int] | None,
    n_folds: int,
    C: float,
    metric: Metric,
    seed: int,
    batch_size: int,
    log: Callable[[str], None] | None = None,
    choose_layers: bool = True,
) -> ProbeRun:
    """Collect ``site`` activations of both prompt sets at ``positions`` and ``layers`` (``None``: all), cross-validate
    a logistic probe (inverse L2 strength ``C``) per cell, and fit the best cell's difference of means and probe.

    When ``data`` pools sources (``groups``) and more than one layer is swept, the probe reads the layers
    :func:`~steerlab.probes.layer_choice.choose_layers` picks, at the one-column position (a token or a pooled mean)
    whose choice has the best minimum of its two AUCs (``choose_layers=False``: the best cell's layer and position);
    its threshold is calibrated on out-of-fold scores either way. ``log`` receives a line before collecting and one
    per position compared.
    """
    from steerlab.data.fingerprints import Fingerprints
    from steerlab.steering.fit import mean_difference, prompts_hash

    check_sweep_positions(positions)
    positions = list(positions)
    pos, neg = data.positive, data.negative
    if log is not None:
        log(f"sweeping {len(pos)} + {len(neg)} prompts ({data.source}) at {site}, positions {positions}")
    acts = collect(model, pos + neg, sites=[site], layers=layers, positions=positions, batch_size=batch_size)
    parts = [acts.get(site, p) for p in positions]
    widths = [t.shape[2] for t in parts]
    x, y = torch.cat(parts, dim=2), torch.tensor([1] * len(pos) + [0] * len(neg))
    columns = position_columns(model, positions, widths)
    folds = None if data.groups is None else grouped_folds(data.groups, y, n_folds=n_folds)
    # pooled sources: classes of different sizes, and every source weighs the same, so a small source of hard
    # cases (one safe-but-scary kind) counts as much as a large generic one (experiments/guards_cross_source.py)
    balanced = data.groups is not None
    weight = None if data.groups is None else source_weights(data.groups)
    fit_kw = {"C": C, "balanced": balanced, "sample_weight": weight}
    result = sweep(x, y, layers=acts.layers, columns=columns, n_folds=n_folds, seed=seed, folds=folds, **fit_kw)
    layer, column, value = result.best(metric)
    i, j = acts.layers.index(layer), columns.index(column)
    position = column_position(positions, widths, j)
    meta = {"site": site, "position": position, "model": model.name}
    choice, g = None, j  # the guard's layers and column: the best cell's unless chosen on pooled sources
    if choose_layers and data.groups is not None and len(acts.layers) > 1:
        choice, g = _choose_guard(x, y, data, columns=columns, widths=widths, layers=acts.layers, n_folds=n_folds, C=C, log=log)
    read = [layer] if choice is None else list(choice.layers)
    idx = [acts.layers.index(la) for la in read]
    guard_meta = {**meta, "position": column_position(positions, widths, g)}
    probe = fit_probes(x[:, idx, g], y, layers=read, labels=("harmless", "harmful"), **fit_kw, **guard_meta)
    threshold = out_of_fold_threshold(x[:, idx, g], y, n_folds=n_folds, seed=seed, folds=folds, **fit_kw)
    how = "source-held-out" if folds is not None else "stratified"
    probe = replace(probe, info={**probe.info, "guard_threshold": threshold, "threshold_from": f"{n_folds}-fold {how} out-of-fold scores"},
                    trained_on=Fingerprints.of(pos, neg))  # fmt: skip
    direction = mean_difference(
        x[y == 1][:, i : i + 1, j], x[y == 0][:, i : i + 1, j], layers=[layer], data_hash=prompts_hash(pos, neg), **meta
    )
    return ProbeRun(model=model.name, data=data.source, site=site, positions=positions, C=C, metric=metric,
                    result=result, layer=layer, column=column, position=position, value=value, probe=probe,
                    direction=direction, layer_choice=choice)  # fmt: skip


def _choose_guard(x, y, data: ProbeData, *, columns, widths, layers, n_folds, C, log) -> tuple[LayerChoice, int]:
    """The guard's layers and column: :func:`~steerlab.probes.layer_choice.choose_layers` at every position that is
    one column (a token or a pooled mean; ``widths`` per position, in column order), keeping the position whose
    choice has the best minimum of its two AUCs (ties: the first)."""
    starts = [sum(widths[:k]) for k in range(len(widths))]
    single = [start for start, width in zip(starts, widths) if width == 1]
    if not single:
        raise InvalidValueError("no swept position is one column a guard can read; add 'last' or 'inst_to_last_mean'")
    best: tuple[float, LayerChoice, int] | None = None
    for j in single:
        choice = _choose(x[:, :, j], y, layers=layers, groups=data.groups, families=data.families or {}, n_folds=n_folds, C=C)
        value = min(choice.pooled_auc, math.inf if choice.family_auc is None else choice.family_auc)
        if log is not None and len(single) > 1:
            log(f"at {columns[j]}, the guard would read {choice.describe()}")
        if best is None or value > best[0]:
            best = (value, choice, j)
    assert best is not None
    if log is not None:
        log(f"the guard reads {columns[best[2]]}, {best[1].describe()}")
    return best[1], best[2]


def out_of_fold_threshold(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    C: float,
    n_folds: int,
    seed: int,
    folds: torch.Tensor | None = None,
    balanced: bool = False,
    sample_weight: torch.Tensor | None = None,
) -> float:
    """The best balanced-accuracy threshold on ``P(positive)`` of each example scored by a probe fitted on the other
    folds (``x`` ``[n, k, d]``, ``k`` layers read as one: :meth:`~steerlab.probes.probe.Probe.ensemble_proba`;
    ``folds`` given, or seeded stratified ones): a threshold calibrated on data the scoring probe did not see.

    Example:
        >>> x = torch.randn(40, 1, 4); y = (x[:, 0, 0] > 0).long()
        >>> 0.0 < out_of_fold_threshold(x, y, C=1.0, n_folds=4, seed=0) < 1.0
        True
    """
    folds = stratified_folds(y, n_folds=n_folds, seed=seed) if folds is None else folds
    scores = torch.empty(len(y))
    for f in range(int(folds.max()) + 1):
        test = folds == f
        weight = None if sample_weight is None else sample_weight[~test]
        probe = fit_probes(x[~test], y[~test], layers=list(range(x.shape[1])), C=C, balanced=balanced, sample_weight=weight)
        scores[test] = probe.ensemble_proba(x[test])
    return best_threshold(scores[y == 1], scores[y == 0])


def save_probe_run(run: ProbeRun, out: Path, *, info: RunInfo) -> Path:
    """Write ``probe.safetensors``, ``direction.safetensors``, ``sweep.json`` (settings, best cell, sweep, ``info``)
    and ``sweep.html`` (heatmaps, with ``plotly.min.js``) into ``out`` (created if needed); return ``out``."""
    from steerlab.report import write_sweep_report

    out.mkdir(parents=True, exist_ok=True)
    run.probe.save(out / "probe.safetensors")
    run.direction.save(out / "direction.safetensors")
    best = run.best()
    summary = {"model": run.model, "data": run.data, "site": run.site, "positions": run.positions, "C": run.C,
               "best": best, "guard": run.guard(),
               "files": {"probe": "probe.safetensors", "direction": "direction.safetensors", "heatmap": "sweep.html"},
               "sweep": run.result.to_dict(), "run": info.to_dict()}  # fmt: skip
    (out / "sweep.json").write_text(json.dumps(summary, indent=1))
    write_sweep_report(out, run.result, metric=run.metric, info=info, data=run.data, site=run.site, best=best)
    return out
