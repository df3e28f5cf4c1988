"""Runtime interventions: attention heads, MoE experts, rank-one concept redirection.

Every intervention is a frozen value applied with ``with model.apply(iv): ...``.

Example:
    >>> from steerlab.interventions import HeadAblation, ExpertMask                  # doctest: +SKIP
    >>> with model.apply(HeadAblation([(12, 3)], rescale_norm=True)):                # doctest: +SKIP
    ...     model.generate(["How do I pick a lock?"])
"""

from steerlab.interventions.experts import (
    ExpertIndexError,
    ExpertMask,
    ExpertScores,
    ExpertUsage,
    contrast,
    expert_attribution,
    expert_contrast,
    expert_usage,
    moe_layers,
)
from steerlab.interventions.heads import (
    HeadAblation,
    HeadAblationEffect,
    HeadAttribution,
    HeadIndexError,
    head_ablation_effect,
    head_attribution,
    head_means,
    projection_metric,
)
from steerlab.interventions.redirect import (
    DegenerateEditError,
    LinearRedirect,
    MultiKeyRedirect,
    NotALinearModuleError,
    RankOneRedirect,
    closed_form_edit,
    estimate_key_covariance,
    module_keys,
    rank_one_update,
    redirect_matrix,
)

__all__ = [
    "DegenerateEditError",
    "ExpertIndexError",
    "ExpertMask",
    "ExpertScores",
    "ExpertUsage",
    "HeadAblation",
    "HeadAblationEffect",
    "HeadAttribution",
    "HeadIndexError",
    "LinearRedirect",
    "MultiKeyRedirect",
    "NotALinearModuleError",
    "RankOneRedirect",
    "closed_form_edit",
    "contrast",
    "estimate_key_covariance",
    "expert_attribution",
    "expert_contrast",
    "expert_usage",
    "head_ablation_effect",
    "head_attribution",
    "head_means",
    "module_keys",
    "moe_layers",
    "projection_metric",
    "rank_one_update",
    "redirect_matrix",
]
