"""What was baked into a model: JSON-able descriptions of interventions, a per-model edit history, the manifest.

:func:`describe` turns an intervention value into plain data (tensors and directions become shapes
and sha256 hashes, plus a direction's own ``data_hash``). :func:`~steerlab.training.bake` records one
entry per bake on the baked HF model, :func:`~steerlab.training.parity` adds its figures to that entry,
and :func:`~steerlab.training.export` writes them all to ``steerlab_manifest.json``.

Example:
    >>> from steerlab.training.manifest import describe
    >>> import torch
    >>> describe(torch.zeros(2))["shape"]
    [2]
"""

from __future__ import annotations

import dataclasses
import hashlib
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from steerlab.steering.direction import Direction

MANIFEST_NAME = "steerlab_manifest.json"
MANIFEST_FORMAT = "steerlab.manifest/1"

_HISTORY: weakref.WeakKeyDictionary[nn.Module, list[dict[str, Any]]] = weakref.WeakKeyDictionary()


def tensor_hash(t: torch.Tensor) -> str:
    """sha256 of a tensor's values as contiguous float32 (float64 stays float64; ints as int64)."""
    t = t.detach().cpu()
    t = t.to(torch.float64 if t.dtype == torch.float64 else torch.float32) if t.is_floating_point() else t.long()
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def describe(value: Any) -> Any:
    """Plain JSON-able data for an intervention, a direction, a tensor or any nested value.

    Example:
        >>> describe({"coeff": 2.0, "layers": (1, 2)})
        {'coeff': 2.0, 'layers': [1, 2]}
    """
    if isinstance(value, Direction):
        return {
            "type": "Direction",
            "layers": list(value.layers),
            "width": value.width,
            "site": value.site,
            "position": value.position,
            "method": value.method,
            "model": value.model,
            "data_hash": value.data_hash,
            "sha256": tensor_hash(value.vectors),
        }
    if isinstance(value, torch.Tensor):
        return {"type": "tensor", "shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch."),
                "sha256": tensor_hash(value)}  # fmt: skip
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: describe(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name != "_"}
        return {"type": type(value).__name__, **fields}
    if isinstance(value, Mapping):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [describe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def history(hf: nn.Module) -> list[dict[str, Any]]:
    """The edit records of a baked HF model, oldest first (a copy)."""
    return [dict(r) for r in _HISTORY.get(hf, [])]


def record(hf: nn.Module, entries: Sequence[dict[str, Any]]) -> None:
    """Set the edit history of ``hf`` (used by bake)."""
    _HISTORY[hf] = [dict(e) for e in entries]


def attach_parity(hf: nn.Module, intervention: Any, report: dict[str, Any]) -> bool:
    """Add parity figures to the newest history entry of ``hf`` that baked ``intervention``; False if none did."""
    described = describe(intervention)
    for entry in reversed(_HISTORY.get(hf, [])):
        if entry.get("intervention") == described:
            entry.setdefault("parity", []).append(dict(report))
            return True
    return False


def public(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """History entries without private (underscore) keys, for the manifest."""
    return [{k: v for k, v in e.items() if not k.startswith("_")} for e in entries]
