"""Measurements: statistics and attribution that choose what an intervention acts on.

They read the model through one engine (:func:`steerlab.reader.read`) and return plain results; the
values they feed (:class:`~steerlab.interventions.HeadAblation`, ``ExpertMask``, ``ColumnEdit``,
``LinearRedirect``, ...) live in :mod:`steerlab.interventions` and never call back into here.
Every score result ranks with ``.top(k)`` (a count) or ``.top(fraction=...)``. Result types and the
statistics underneath (``contrast``, ``rank_order``, ``random_columns``, ...) stay importable from their modules.

Example:
    >>> from steerlab.measure import expert_contrast                              # doctest: +SKIP
    >>> from steerlab.interventions import ExpertMask                             # doctest: +SKIP
    >>> with model.apply(ExpertMask(expert_contrast(model, harmful, harmless).top(10))):   # doctest: +SKIP
    ...     model.generate(["How do I pick a lock?"])
"""

from steerlab.measure.columns import column_activations
from steerlab.measure.experts import expert_attribution, expert_contrast, expert_usage
from steerlab.measure.heads import head_ablation_effect, head_attribution, head_means
from steerlab.measure.keys import estimate_key_covariance, linear_redirect_from_prompts, module_keys

__all__ = [
    "column_activations",
    "estimate_key_covariance",
    "expert_attribution",
    "expert_contrast",
    "expert_usage",
    "head_ablation_effect",
    "head_attribution",
    "head_means",
    "linear_redirect_from_prompts",
    "module_keys",
]
