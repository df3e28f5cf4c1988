"""Interop with TransformerLens and nnsight: steerlab interventions and directions on their models.

The optional packages are imported only when a function needs them
(``pip install steerlab[interop]``). Both wrappers run the HF model's own modules, so an
intervention gives the same outputs through their hook points as through steerlab's hooks, and
``steerlab.load(bridge_or_lm)`` unwraps either one back into a steerlab Model.

Example:
    >>> from steerlab.interop import to_bridge, apply_tl, to_language_model, nnsight_intervene   # doctest: +SKIP
"""

from steerlab.interop._common import Firing, InteropError, InteropUnavailableError
from steerlab.interop.nnsight_bridge import nnsight_generate, nnsight_intervene, to_language_model
from steerlab.interop.transformer_lens_bridge import (
    TL_NAMES,
    TLHook,
    apply_tl,
    direction_from_tl,
    direction_to_tl_hooks,
    tl_hook_name,
    tl_hooks,
    tl_site,
    to_bridge,
)

__all__ = [
    "TL_NAMES",
    "Firing",
    "InteropError",
    "InteropUnavailableError",
    "TLHook",
    "apply_tl",
    "direction_from_tl",
    "direction_to_tl_hooks",
    "nnsight_generate",
    "nnsight_intervene",
    "tl_hook_name",
    "tl_hooks",
    "tl_site",
    "to_bridge",
    "to_language_model",
]
