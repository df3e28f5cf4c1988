"""``Direction``: per-layer vectors in the residual stream, with metadata; saved as safetensors.

A direction records where it came from: the model (``model``, its name; ``width``, the model's
``d_model``; ``info["n_layers"]``, its depth), the ``site`` and the ``position`` it was fitted at.
The steer ops compare these with the model and site they act on (:func:`steerlab.steering.ops.check_provenance`).

Example:
    >>> import torch
    >>> from steerlab.steering import Direction
    >>> d = Direction(vectors=torch.ones(2, 4), layers=(3, 5), method="mean_diff")
    >>> d.at(5).tolist(), round(float(d.unit().at(3).norm()), 6)
    ([1.0, 1.0, 1.0, 1.0], 1.0)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from steerlab import _valuefiles
from steerlab._checks import check_finite, layer_index, layer_tuple
from steerlab.errors import EmptyInputError, InvalidValueError, LayerIndexError, ShapeError, ZeroVectorError

if TYPE_CHECKING:
    from steerlab.model import Model

FORMAT = "steerlab.Direction/1"
_META_KEYS = ("layers", "site", "position", "method", "model", "data_hash", "info")


def check_position(position: object, what: str = "position") -> str | int:
    """A fitted position: a name (``"last"``, ``"t_inst"``, ...) or an integer offset (numpy / torch ints too)."""
    if isinstance(position, str):
        return position
    try:
        return layer_index(position, what)
    except LayerIndexError:
        raise InvalidValueError(
            f"{what} must be a position name such as 'last' or 't_inst', or an integer offset such as -2; "
            f"got {type(position).__name__} {position!r}"
        ) from None


def model_provenance(model: object, width: int | None = None) -> tuple[str, int | None]:
    """``(name, n_layers)`` of a steerlab Model (checked against ``width``), or ``(name, None)`` for a name."""
    if isinstance(model, str):
        return model, None
    if not all(hasattr(model, a) for a in ("name", "n_layers", "d_model")):
        raise InvalidValueError(f"model must be a steerlab Model or its name (a str); got {type(model).__name__}")
    if width is not None and width != model.d_model:
        raise ShapeError(
            f"the vectors have width {width} but {model.name} has d_model={model.d_model}; pass the model the "
            "activations were collected from"
        )
    return str(model.name), int(model.n_layers)


@dataclass(frozen=True)
class Direction:
    """One vector per layer (``vectors[i]`` belongs to ``layers[i]``), plus where and how it was fitted.

    ``model`` is the name of the model it was fitted on, or the steerlab Model itself (then its
    name is kept and its depth recorded in ``info["n_layers"]``). Vectors must be finite and each
    layer listed once; layers may be numpy or torch integers.
    """

    vectors: torch.Tensor  # [n_layers, d], float32
    layers: tuple[int, ...]
    site: str = "resid_pre"
    position: str | int = "last"
    method: str = "mean_diff"
    model: str | Model = ""
    data_hash: str = ""
    info: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        layers = layer_tuple(self.layers, "layers")
        if not layers:
            raise EmptyInputError("a Direction needs at least one layer; pass layers=(...) with one per vector row")
        vectors = self.vectors if isinstance(self.vectors, torch.Tensor) else torch.as_tensor(self.vectors)
        if vectors.dim() != 2 or vectors.shape[0] != len(layers):
            raise ShapeError(
                f"vectors must be [n_layers, d] with one row per layer; got {tuple(vectors.shape)} "
                f"for layers {list(layers)}"
            )
        vectors = vectors.detach().to(torch.float32).cpu()
        check_finite(vectors, "the direction's vectors", "fit it again on finite activations (NaN in, NaN out)")
        for name in ("site", "method", "data_hash"):
            if not isinstance(getattr(self, name), str):
                raise InvalidValueError(f"{name} must be a str; got {type(getattr(self, name)).__name__}")
        if not isinstance(self.info, dict):
            raise InvalidValueError(f"info must be a dict; got {type(self.info).__name__}")
        name, depth = model_provenance(self.model, int(vectors.shape[1]))
        info = dict(self.info) if depth is None else {**self.info, "n_layers": depth}
        if info.get("n_layers") is not None:
            info["n_layers"] = layer_index(info["n_layers"], "info['n_layers'] (the model's depth)")
        object.__setattr__(self, "vectors", vectors)
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "position", check_position(self.position))
        object.__setattr__(self, "model", name)
        object.__setattr__(self, "info", info)

    @property
    def width(self) -> int:
        """Residual width ``d`` (the ``d_model`` of the model it was fitted on)."""
        return int(self.vectors.shape[1])

    @property
    def model_n_layers(self) -> int | None:
        """Depth of the model it was fitted on (``info["n_layers"]``), or ``None`` when not recorded."""
        return self.info.get("n_layers")

    def at(self, layer: int) -> torch.Tensor:
        """The vector of ``layer`` (a layer this direction was fitted at)."""
        layer = layer_index(layer)
        if layer not in self.layers:
            raise LayerIndexError(f"this direction has no vector for layer {layer}; it covers layers {list(self.layers)}")
        return self.vectors[self.layers.index(layer)]

    def select(self, layers: int | Sequence[int]) -> Direction:
        """A direction restricted to some of its layers."""
        items = layer_tuple(layers)
        if not items:
            raise EmptyInputError("select() needs at least one layer; pass e.g. direction.select([3])")
        return replace(self, vectors=torch.stack([self.at(la) for la in items]), layers=items)

    def unit(self) -> Direction:
        """Every layer's vector scaled to norm 1."""
        norms = self.vectors.norm(dim=-1, keepdim=True)
        zero = [la for la, n in zip(self.layers, norms[:, 0].tolist()) if n == 0]
        if zero:
            raise ZeroVectorError(
                f"cannot normalise the zero vector of layer(s) {zero} (the classes had identical means there); "
                f"leave those layers out with direction.select([...]) or pick another layer"
            )
        return replace(self, vectors=self.vectors / norms)

    def cosine(self, other: Direction) -> dict[int, float]:
        """Cosine similarity per shared layer (e.g. base vs instruct, harmfulness vs refusal)."""
        if other.width != self.width:
            raise ShapeError(f"directions have different widths ({self.width} vs {other.width})")
        shared = [la for la in self.layers if la in other.layers]
        return {la: float(torch.nn.functional.cosine_similarity(self.at(la), other.at(la), dim=0)) for la in shared}

    def cosine_across_layers(self) -> torch.Tensor:
        """[n_layers, n_layers] cosine similarity of this direction's vectors with each other."""
        unit = self.unit().vectors
        return unit @ unit.T

    def save(self, path: str | Path) -> Path:
        """Write a ``.safetensors`` file with the vectors and the metadata (atomically, with a checksum)."""
        meta = {
            "layers": json.dumps(list(self.layers)),
            "site": self.site,
            "position": json.dumps(self.position),
            "method": self.method,
            "model": self.model,
            "data_hash": self.data_hash,
            "info": json.dumps(self.info),
            "format": FORMAT,
        }
        return _valuefiles.write(path, {"vectors": self.vectors}, meta)

    @classmethod
    def load(cls, path: str | Path) -> Direction:
        """Read a file written by :meth:`save`; a missing, damaged or foreign file raises ``ValueFileError``."""
        tensors, meta = _valuefiles.read(path, fmt=FORMAT, tensors=["vectors"], keys=_META_KEYS)
        with _valuefiles.parsing(path, "Direction"):
            return cls(
                vectors=tensors["vectors"],
                layers=json.loads(meta["layers"]),
                site=meta["site"],
                position=json.loads(meta["position"]),
                method=meta["method"],
                model=meta["model"],
                data_hash=meta["data_hash"],
                info=json.loads(meta["info"]),
            )
