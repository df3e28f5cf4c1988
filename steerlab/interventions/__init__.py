"""Runtime interventions: attention heads, MoE experts, rank-one concept redirection, down-projection columns.

Every intervention is a frozen value applied with ``with model.apply(iv): ...``.

Example:
    >>> from steerlab.interventions import HeadAblation, ExpertMask                  # doctest: +SKIP
    >>> with model.apply(HeadAblation([(12, 3)], rescale_norm=True)):                # doctest: +SKIP
    ...     model.generate(["How do I pick a lock?"])
"""

from steerlab.interventions.columns import (
    ColumnEdit,
    ColumnGroup,
    ColumnIndexError,
    column_activations,
    column_groups,
    expert_activations,
    layer_groups,
    noise_edit,
    random_columns,
    resolve_column,
)
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
    "ColumnEdit",
    "ColumnGroup",
    "ColumnIndexError",
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
    "column_activations",
    "column_groups",
    "contrast",
    "estimate_key_covariance",
    "expert_activations",
    "expert_attribution",
    "expert_contrast",
    "expert_usage",
    "head_ablation_effect",
    "head_attribution",
    "head_means",
    "layer_groups",
    "module_keys",
    "moe_layers",
    "noise_edit",
    "projection_metric",
    "random_columns",
    "rank_one_update",
    "redirect_matrix",
    "resolve_column",
]
