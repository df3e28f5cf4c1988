"""Runtime interventions as values: attention heads, MoE experts, concept redirection, down-projection columns.

Every intervention is a frozen value applied with ``with model.apply(iv): ...`` (or baked with
``training.bake``). What to act on is measured in :mod:`steerlab.measure`; the helpers the values use
(column groups, the rank-one algebra) stay importable from their modules.

Example:
    >>> from steerlab.interventions import HeadAblation, ExpertMask                  # doctest: +SKIP
    >>> with model.apply(HeadAblation([(12, 3)], rescale_norm=True)):                # doctest: +SKIP
    ...     model.generate(["How do I pick a lock?"])
"""

from steerlab.interventions.columns import ColumnEdit, ColumnIndexError
from steerlab.interventions.experts import ExpertIndexError, ExpertMask
from steerlab.interventions.heads import HeadAblation, HeadIndexError
from steerlab.interventions.linear_redirect import LinearRedirect, MultiKeyRedirect, NotALinearModuleError
from steerlab.interventions.redirect import RankOneRedirect
from steerlab.interventions.redirect_math import DegenerateEditError

__all__ = [
    "ColumnEdit",
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
]
