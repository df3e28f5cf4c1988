"""Runtime interventions as values: attention heads, MoE experts, concept redirection, down-projection columns.

Every intervention is a frozen value applied with ``with model.apply(iv): ...`` (or baked with
``training.bake``). What to act on is measured in :mod:`steerlab.measure`.

Example:
    >>> from steerlab.interventions import HeadAblation, ExpertMask                  # doctest: +SKIP
    >>> with model.apply(HeadAblation([(12, 3)], rescale_norm=True)):                # doctest: +SKIP
    ...     model.generate(["How do I pick a lock?"])
"""

from steerlab.interventions.columns import (
    ColumnEdit,
    ColumnGroup,
    ColumnIndexError,
    column_groups,
    expert_activations,
    layer_groups,
    noise_edit,
    resolve_column,
)
from steerlab.interventions.experts import ExpertIndexError, ExpertMask, moe_layers
from steerlab.interventions.heads import HeadAblation, HeadIndexError
from steerlab.interventions.linear_redirect import LinearRedirect, MultiKeyRedirect, NotALinearModuleError
from steerlab.interventions.redirect import RankOneRedirect
from steerlab.interventions.redirect_math import (
    DegenerateEditError,
    closed_form_edit,
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
    "HeadAblation",
    "HeadIndexError",
    "LinearRedirect",
    "MultiKeyRedirect",
    "NotALinearModuleError",
    "RankOneRedirect",
    "closed_form_edit",
    "column_groups",
    "expert_activations",
    "layer_groups",
    "moe_layers",
    "noise_edit",
    "rank_one_update",
    "redirect_matrix",
    "resolve_column",
]
