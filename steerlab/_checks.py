"""Checks shared by the values (directions, steer ops, probes, guards): layer indices and finite numbers.

* :func:`layer_index` — one layer index: an ``int``, or a numpy / torch integer scalar; not a float, bool or string.
* :func:`layer_list` — a list of layer indices (or one index) as a list of ``int``.
* :func:`layer_tuple` — the same as a tuple of ``int``, each listed once.
* :func:`finite_number` — a real, finite number (a coefficient, a threshold) as a ``float``.
* :func:`check_finite` — a tensor without NaN or infinity.
* :func:`linear_parts` — ``(weight, bias)`` of a module that must be a plain 2D linear map.

Example:
    >>> import numpy as np, torch
    >>> layer_tuple([np.int64(3), torch.tensor(5)])
    (3, 5)
    >>> layer_tuple("3")
    Traceback (most recent call last):
    ...
    steerlab.errors.LayerIndexError: layers must be a list of layer indices such as [3], not the string '3'
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from steerlab.chat import as_index
from steerlab.errors import InvalidValueError, LayerIndexError, NonFiniteError, ShapeError


def _is_bool(value: object) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return True
    return isinstance(value, (torch.Tensor, np.ndarray)) and value.dtype in (torch.bool, np.bool_)


def _is_scalar(value: object) -> bool:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.ndim == 0
    return not isinstance(value, (str, bytes)) and not hasattr(value, "__iter__")


def layer_index(value: object, what: str = "layer") -> int:
    """``value`` as an ``int`` layer index (``3``, ``np.int64(3)``, ``torch.tensor(3)``), or a clear error."""
    idx = as_index(value)
    if idx is None:
        kind = "the boolean" if _is_bool(value) else type(value).__name__
        raise LayerIndexError(
            f"{what} must be one integer layer index, got {kind} {value!r}; pass an integer such as 3 "
            "(negative counts from the end)"
        )
    return idx


def layer_list(value: object, what: str = "layers") -> list[int]:
    """A list of layer indices (or a single one) as a list of ``int``, in the given order."""
    if isinstance(value, (str, bytes)):
        raise LayerIndexError(f"{what} must be a list of layer indices such as [3], not the string {value!r}")
    if _is_scalar(value):
        return [layer_index(value, what)]
    return [layer_index(v, f"{what}[{i}]") for i, v in enumerate(value)]


def layer_tuple(value: object, what: str = "layers") -> tuple[int, ...]:
    """:func:`layer_list` as a tuple in which each layer may appear once."""
    out = tuple(layer_list(value, what))
    repeated = sorted({la for la in out if out.count(la) > 1})
    if repeated:
        raise LayerIndexError(f"{what} lists layer(s) {repeated} more than once ({list(out)}); list each layer once")
    return out


def finite_number(value: object, what: str) -> float:
    """``value`` as a finite ``float`` (a Python, numpy or one-element torch number), or a clear error."""
    is_tensor = isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex()
    if _is_bool(value) or not (is_tensor or isinstance(value, numbers.Real)):
        raise InvalidValueError(f"{what} must be a real number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise NonFiniteError(f"{what} is {number}; pass a finite number")
    return number


def check_finite(tensor: torch.Tensor, what: str, fix: str) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` and ``fix`` when ``tensor`` holds NaN or infinity."""
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        n_nan = int(torch.isnan(tensor).sum())
        raise NonFiniteError(
            f"{what} holds {int(bad.sum())} non-finite value(s) of {tensor.numel()} ({n_nan} NaN, "
            f"{int(bad.sum()) - n_nan} infinite); {fix}"
        )


def linear_parts(module: torch.nn.Module, *, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight, bias)`` of ``module`` when it has a 2D weight, else a :class:`ShapeError` saying that ``what``
    needs a plain linear module."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ShapeError(
            f"{type(module).__name__} has no 2D weight; {what} needs a plain linear module "
            "(merge adapters / dequantise first)"
        )
    return weight, getattr(module, "bias", None)
