"""Interop with TransformerLens and nnsight: steerlab interventions and directions on their models.

The optional packages are imported only when a function needs them
(``pip install steerlab[interop]``). Both wrappers run the HF model's own modules, so an
intervention gives the same outputs through their hook points as through steerlab's hooks, and
``steerlab.load(bridge_or_lm)`` unwraps either one back into a steerlab Model. Hook names, raw hook
functions and directions as TransformerLens hooks stay in :mod:`~steerlab.interop.tl_directions`;
generation with interventions through nnsight in :mod:`~steerlab.interop.nnsight_bridge`.

Example (needs ``transformer_lens``):
    >>> from steerlab.interop import to_bridge, apply_tl
    >>> from steerlab.testing import tiny_model, tiny_direction
    >>> model = tiny_model("llama")
    >>> bridge, tokens = to_bridge(model, copy=True), model.encode(["Say hello."]).input_ids
    >>> with apply_tl(bridge, steerlab.Ablate(tiny_direction(model))):
    ...     logits = bridge(tokens)
    >>> logits.shape  # [batch, tokens, vocabulary]
    torch.Size([1, 32, 400])
"""

from steerlab.interop._common import InteropError, InteropUnavailableError
from steerlab.interop.nnsight_bridge import nnsight_intervene, to_language_model
from steerlab.interop.tl_directions import direction_from_tl
from steerlab.interop.transformer_lens_bridge import apply_tl, to_bridge

__all__ = [
    "InteropError",
    "InteropUnavailableError",
    "apply_tl",
    "direction_from_tl",
    "nnsight_intervene",
    "to_bridge",
    "to_language_model",
]
