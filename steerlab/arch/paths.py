"""Following the registry's dotted paths on a loaded model, and checking layer indices (no family knowledge).

Example:
    >>> from steerlab.testing import tiny_model
    >>> hf = tiny_model("llama").hf
    >>> type(resolve_path(hf, "model.layers.0.self_attn.o_proj")).__name__
    'Linear'
    >>> normalize_layer(-1, 3)
    2
"""

from __future__ import annotations

from torch import nn

from steerlab import compat
from steerlab.errors import LayerIndexError, UnknownArchitectureError


def normalize_layer(layer: int, n_layers: int) -> int:
    """Map a possibly negative layer index into ``range(n_layers)`` or raise a clear error."""
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise LayerIndexError(f"layer index must be an int, got {layer!r}")
    idx = layer + n_layers if layer < 0 else layer
    if not 0 <= idx < n_layers:
        raise LayerIndexError(
            f"layer {layer} is out of range: this model has {n_layers} layers; "
            f"use 0..{n_layers - 1} (or -{n_layers}..-1 counting from the end)"
        )
    return idx


def resolve_path(root: nn.Module, path: str, *, missing_ok: bool = False, unwrap: bool = True):
    """Follow a dotted attribute path from ``root``; ``missing_ok`` returns ``None`` instead of raising.

    Wrappers an interop library swapped into the tree (a TransformerLens bridge's components) are looked through
    (:func:`steerlab.compat.unwrap_module`): the path ends on the HF module the wrapper runs. ``unwrap=False``
    keeps the wrappers (to reach the wrapper's own hook points).
    """
    plain = compat.unwrap_module if unwrap else (lambda module: module)
    obj = plain(root)
    for part in path.split("."):
        if part.isdigit() and isinstance(obj, (nn.ModuleList, list, tuple)):
            obj = plain(obj[int(part)])
            continue
        if not hasattr(obj, part):
            if missing_ok:
                return None
            raise UnknownArchitectureError(
                f"path {path!r} does not exist on {type(root).__name__} (failed at {part!r}); "
                "the registry spec does not match this model: fix or re-register it with "
                "steerlab.arch.register(ArchSpec(...), overwrite=True)"
            )
        obj = plain(getattr(obj, part))
    return obj
