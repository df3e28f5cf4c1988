"""Guards from the project's prompts and from saved files (what ``steerlab guard`` runs).

* :func:`fit_guard` — a :class:`~steerlab.probes.ProbeGuard` or :class:`~steerlab.probes.LatentGuard` fitted on the
  training part of :func:`steerlab.data.load_split`, its threshold calibrated on the validation part.
* :func:`saved_guard_kind` — whether a saved file holds a probe (a ``ProbeGuard``) or a ``LatentGuard``.
* :func:`describe_guard` — one line saying what a guard reads and when it flags.

Example:
    >>> from steerlab.testing import tiny_model
    >>> guard = fit_guard(tiny_model("llama"), mode="latent", position="t_inst", layers=None, n_train=16, seed=0,
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
    position: Position,
    layers: Sequence[int] | None,
    n_train: int,
    seed: int,
    batch_size: int,
    calibrate: bool,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> Guard:
    """A guard fitted on the first ``n_train`` prompts per class of the training split (``load_split(seed=seed)``).

    ``mode="probe"``: a :class:`ProbeGuard` at ``layers[0]`` (``layers=None``: the best layer by cross-validation;
    more than one layer is an :class:`~steerlab.errors.InvalidValueError`). ``mode="latent"``: a
    :class:`LatentGuard` over ``layers`` (``None``: all). Both read ``position``. With ``calibrate`` the threshold
    is calibrated on the validation split; otherwise the guard keeps its default threshold. ``progress`` shows
    progress bars; ``log`` receives a line before fitting and after calibrating.
    """
    from steerlab.data import load_split

    if mode not in ("probe", "latent"):
        raise InvalidValueError(f"mode must be 'probe' or 'latent'; got {mode!r}")
    if mode == "probe" and layers is not None and len(layers) != 1:
        raise InvalidValueError(f"a probe guard reads one layer; got layers {list(layers)}")
    say = log or (lambda message: None)
    split = load_split(seed=seed)
    harmful, harmless = split.harmful_train[:n_train], split.harmless_train[:n_train]
    say(f"fitting a {mode} guard on {len(harmful)} + {len(harmless)} training prompts")
    kw = {"position": position, "batch_size": batch_size, "progress": progress}
    guard: Guard
    if mode == "latent":
        guard = LatentGuard.fit(model, harmful, harmless, layers=layers, **kw)
    else:
        guard = ProbeGuard.fit(model, harmful, harmless, layer=None if layers is None else layers[0], **kw)
    if calibrate:
        guard = guard.calibrate(split.harmful_val, split.harmless_val, batch_size=batch_size, progress=progress)
        say(f"threshold calibrated on {len(split.harmful_val)} + {len(split.harmless_val)} validation prompts")
    return guard


def describe_guard(guard: Guard) -> str:
    """One line: the guard's kind, what it reads (layer(s), position) and its threshold."""
    if isinstance(guard, ProbeGuard):
        p = guard.probe
        return (
            f"ProbeGuard: P(harmful) at layer {p.layers[0]}, position {p.position!r}, "
            f"flag when >= {guard.threshold:.4g}"
        )
    return (
        f"LatentGuard: cosine score over {len(guard.layers)} layers at {guard.position!r}, "
        f"flag when >= {guard.threshold:.4g}"
    )
