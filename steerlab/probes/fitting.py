"""Guards from the project's prompts and from saved files (what ``steerlab guard`` runs).

* :func:`fit_guard` — a :class:`~steerlab.probes.ProbeGuard` or :class:`~steerlab.probes.LatentGuard` fitted on the
  pooled prompt sets (steerlab's and the packaged public ones), its threshold calibrated on held-out data.
* :func:`saved_guard_kind` — whether a saved file holds a probe (a ``ProbeGuard``) or a ``LatentGuard``.
* :func:`describe_guard` — one line saying what a guard reads and when it flags.

Example:
    >>> from steerlab.testing import tiny_model
    >>> guard = fit_guard(tiny_model("llama"), mode="latent", position="t_inst", layers=None, n_train=5, seed=0,
    ...                   batch_size=16, calibrate=True)
    >>> describe_guard(guard)  # doctest: +ELLIPSIS
    "LatentGuard: cosine score over 3 layers at 't_inst', flag when >= ..."
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from steerlab.chat import Position
from steerlab.errors import InvalidValueError, ValueFileError
from steerlab.probes.guard import LatentGuard, ProbeGuard

if TYPE_CHECKING:
    from steerlab.model import Model

GuardMode = Literal["probe", "latent"]
Guard = ProbeGuard | LatentGuard
GUARD_FORMATS: dict[str, GuardMode] = {"steerlab.Probe/1": "probe", "steerlab.LatentGuard/1": "latent"}


def saved_guard_kind(path: Path) -> GuardMode:
    """``"probe"`` or ``"latent"`` from a saved file's format tag; a :class:`~steerlab.errors.ValueFileError` for a
    file that is not safetensors or holds something else."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            tag = (fh.metadata() or {}).get("format", "")
    except Exception as exc:  # safetensors raises its own error types for non-safetensors files
        raise ValueFileError(f"{path} is not a safetensors file ({exc})") from exc
    if tag not in GUARD_FORMATS:
        raise ValueFileError(f"{path} is neither a steerlab Probe nor a LatentGuard file (format {tag!r})")
    return GUARD_FORMATS[tag]


def fit_guard(
    model: Model,
    *,
    mode: GuardMode,
    position: Position | None,
    layers: Sequence[int] | None,
    n_train: int,
    seed: int,
    batch_size: int,
    calibrate: bool,
    C: float | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    leave_out: Sequence[str] = (),
    scary_kinds: Sequence[str] | None = None,
) -> Guard:
    """A guard fitted on the pooled prompt sets of :func:`steerlab.data.guard_sets.guard_training_data` (at most
    ``n_train`` prompts per set), the configuration that generalised best across sources
    (``experiments/guards_cross_source.py``).

    ``mode="probe"``: a :class:`ProbeGuard` at ``position`` (default: the one of
    :data:`~steerlab.probes.pipeline.DEFAULT_POSITIONS` where its layers do best) with L2 strength ``C`` (default
    0.01), reading the layers :func:`~steerlab.probes.layer_choice.choose_layers` picks among ``layers`` (``None``:
    all; one layer: exactly it) by cross-validation that holds out whole sources and whole safe-but-scary kinds; its
    threshold is calibrated on out-of-fold scores.
    ``mode="latent"``: a :class:`LatentGuard` over ``layers`` (``None``: all) at ``position`` (default ``"t_inst"``,
    METHODS 2), fitted on 80% of each set and calibrated on the other 20%. ``calibrate=False`` keeps the default
    threshold (0.5 / alpha 0). ``progress`` shows progress bars; ``log`` receives a line before fitting. ``leave_out``
    keeps sources out of the pool (see :func:`~steerlab.data.guard_sets.guard_training_data`), to tune or judge on;
    ``scary_kinds`` names its safe-but-scary kinds (default the eight of XSTest; ``ALL_SCARY_KINDS`` adds six more).
    """
    from dataclasses import replace

    from steerlab.data.guard_sets import SCARY_KINDS, guard_training_data
    from steerlab.probes.pipeline import DEFAULT_C, DEFAULT_POSITIONS, probe_data, probe_sweep

    if mode not in ("probe", "latent"):
        raise InvalidValueError(f"mode must be 'probe' or 'latent'; got {mode!r}")
    say = log or (lambda message: None)
    if mode == "probe":
        data = probe_data(files=None, seed=seed, limit=n_train, n_folds=5, leave_out=leave_out, scary_kinds=scary_kinds)
        say(f"fitting a probe guard on {len(data.positive)} + {len(data.negative)} prompts from {len(set(data.groups or []))} sets")
        run = probe_sweep(model, data, site="resid_pre", positions=list(DEFAULT_POSITIONS) if position is None else [position], layers=layers, n_folds=5,
                          C=DEFAULT_C if C is None else C, metric="auc", seed=seed, batch_size=batch_size)  # fmt: skip
        guard = ProbeGuard(probe=run.probe, model=model)
        if calibrate:
            guard = replace(guard, threshold=run.probe.info["guard_threshold"])
            how = run.layer_choice.describe() if run.layer_choice else f"layer {run.layer} (source-held-out AUC {run.value:.3f})"
            say(f"the guard reads {how}; threshold from out-of-fold scores")
        return guard
    data = guard_training_data(per_set=n_train, seed=seed, leave_out=leave_out, scary_kinds=SCARY_KINDS if scary_kinds is None else scary_kinds)
    (fit_h, val_h), (fit_s, val_s) = _slices(data.harmful, data.harmful_sources), _slices(data.harmless, data.harmless_sources)
    say(f"fitting a latent guard on {len(fit_h)} + {len(fit_s)} prompts from {len(data.source_names)} sets")
    kw = {"position": position or "t_inst", "batch_size": batch_size, "progress": progress}
    latent = LatentGuard.fit(model, fit_h, fit_s, layers=layers, **kw)
    if calibrate:
        latent = latent.calibrate(val_h, val_s, batch_size=batch_size, progress=progress)
        say(f"threshold calibrated on {len(val_h)} + {len(val_s)} held-back prompts (20% of each set)")
    return latent


def _slices(prompts: list[str], sources: list[str]) -> tuple[list[str], list[str]]:
    """(80%, 20%) of each source's prompts, in order: fit on the first, calibrate on the second."""
    fit, val = [], []
    for name in dict.fromkeys(sources):
        mine = [p for p, s in zip(prompts, sources) if s == name]
        cut = max(1, round(0.2 * len(mine)))
        val += mine[:cut]
        fit += mine[cut:]
    return fit, val


def _layers(layers: Sequence[int]) -> str:
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {', '.join(map(str, layers))} (mean logit)"


def describe_guard(guard: Guard) -> str:
    """One line: the guard's kind, what it reads (layer(s), position) and its threshold."""
    if isinstance(guard, ProbeGuard):
        p = guard.probe
        return (
            f"ProbeGuard: P(harmful) at {_layers(p.layers)}, position {p.position!r}, "
            f"flag when >= {guard.threshold:.4g}"
        )
    from steerlab.interventions.token_guard import RefusalTokenGuard  # interventions import probes: import here

    if isinstance(guard, RefusalTokenGuard):
        return f"RefusalTokenGuard: the fine-tuned model's P([refuse]) at the first answer token, flag when >= {guard.threshold:.4g}"
    return (
        f"LatentGuard: cosine score over {len(guard.layers)} layers at {guard.position!r}, "
        f"flag when >= {guard.threshold:.4g}"
    )
