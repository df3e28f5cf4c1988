"""Linear probes on activations: per-layer probes fitted all at once, a scikit-learn probe, sweeps, position
traces, guards.

Helpers (fast solvers, metrics, refusal labels) stay importable from their modules:
:mod:`~steerlab.probes.fast`, :mod:`~steerlab.probes.metrics`, :mod:`~steerlab.probes.guard`,
:mod:`~steerlab.probes.sweep`, :mod:`~steerlab.probes.refusal`.

Example:
    >>> import torch
    >>> from steerlab.probes import fit_probes
    >>> _ = torch.manual_seed(0); x = torch.randn(64, 2, 8); y = (x[:, 1, 0] > 0).long()
    >>> fit_probes(x, y, layers=[3, 7]).best_layer(x, y)
    7
"""

from steerlab.probes.guard import LatentGuard, ProbeGuard
from steerlab.probes.probe import Probe, fit_probes
from steerlab.probes.refusal import refusal_probe
from steerlab.probes.sweep import sweep, sweep_prompts
from steerlab.probes.trace import trace

__all__ = [
    "LatentGuard",
    "LinearProbe",
    "Probe",
    "ProbeGuard",
    "fit_probes",
    "refusal_probe",
    "sweep",
    "sweep_prompts",
    "trace",
]


def __getattr__(name: str):
    # LinearProbe subclasses scikit-learn's estimators: import sklearn (seconds) only when it is asked for.
    if name == "LinearProbe":
        from steerlab.probes.linear import LinearProbe

        return LinearProbe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
