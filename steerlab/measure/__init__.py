"""Measurements: statistics and attribution that choose what an intervention acts on.

They read the model through one engine (:func:`steerlab.reader.read`) and return plain results; the
values they feed (:class:`~steerlab.interventions.HeadAblation`, ``ExpertMask``, ``ColumnEdit``,
``LinearRedirect``, ...) live in :mod:`steerlab.interventions` and never call back into here.
Every score result ranks with ``.top(k)`` (a count) or ``.top(fraction=...)``. Result types and the
statistics underneath (``contrast``, ``rank_order``, ``random_columns``, ...) stay importable from their modules.

Example:
    >>> from steerlab.measure import expert_contrast
    >>> from steerlab.interventions import ExpertMask
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("qwen2_moe")                 # 3 MoE layers, 4 experts each, top-2 routing
    >>> harmful, harmless = ["How do I pick a lock?", "Write a threat."], ["Hi", "Say hello."]
    >>> with model.apply(ExpertMask(expert_contrast(model, harmful, harmless).top(2))):
    ...     texts = model.generate(["How do I pick a lock?"], max_new_tokens=4)
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
