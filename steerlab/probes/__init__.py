"""Linear probes on activations: fast all-layer fitting, sweeps, position traces, guards.

Example:
    >>> from steerlab.probes import LinearProbe, fit_probes, sweep_prompts, trace, LatentGuard  # doctest: +SKIP
"""

from steerlab.probes.fast import fit_logistic, fit_standardized
from steerlab.probes.guard import GuardNotBoundError, LatentGuard, ProbeGuard, guard_metrics
from steerlab.probes.linear import LinearProbe
from steerlab.probes.metrics import best_threshold, roc_auc, stratified_folds
from steerlab.probes.probe import Probe, fit_probes
from steerlab.probes.refusal import RefusalProbeFit, refusal_labels, refusal_probe
from steerlab.probes.sweep import SweepResult, sweep, sweep_prompts
from steerlab.probes.trace import PositionTrace, trace

__all__ = [
    "GuardNotBoundError",
    "LatentGuard",
    "LinearProbe",
    "PositionTrace",
    "Probe",
    "ProbeGuard",
    "RefusalProbeFit",
    "SweepResult",
    "best_threshold",
    "fit_logistic",
    "guard_metrics",
    "fit_probes",
    "fit_standardized",
    "refusal_labels",
    "refusal_probe",
    "roc_auc",
    "stratified_folds",
    "sweep",
    "sweep_prompts",
    "trace",
]
