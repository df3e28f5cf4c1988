"""Runtime interventions as values: attention heads, MoE experts, concept redirection, down-projection columns.

Every intervention is a frozen value applied with ``with model.apply(iv): ...`` (or baked with
``training.bake``). What to act on is measured in :mod:`steerlab.measure`; the helpers the values use
(column groups, the rank-one algebra) stay importable from their modules.

Example:
    >>> from steerlab.interventions import HeadAblation, ExpertMask
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("qwen2_moe")                 # 3 layers, 4 heads and 4 experts each
    >>> with model.apply(HeadAblation([(2, 3)], rescale_norm=True), ExpertMask([(1, 0)])):
    ...     texts = model.generate(["How do I pick a lock?"], max_new_tokens=4)
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
