"""``Direction``: per-layer vectors in the residual stream, with metadata; saved as safetensors.

Example:
    >>> import torch
    >>> from steerlab.steering import Direction
    >>> d = Direction(vectors=torch.ones(2, 4), layers=(3, 5), method="mean_diff")
    >>> d.at(5).tolist(), round(float(d.unit().at(3).norm()), 6)
    ([1.0, 1.0, 1.0, 1.0], 1.0)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from steerlab.errors import LayerIndexError, ShapeError


@dataclass(frozen=True)
class Direction:
    """One vector per layer (``vectors[i]`` belongs to ``layers[i]``), plus where and how it was fitted."""

    vectors: torch.Tensor  # [n_layers, d], float32
    layers: tuple[int, ...]
    site: str = "resid_pre"
    position: str | int = "last"
    method: str = "mean_diff"
    model: str = ""
    data_hash: str = ""
    info: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.vectors.dim() != 2 or self.vectors.shape[0] != len(self.layers):
            raise ShapeError(
                f"vectors must be [n_layers, d] with one row per layer; got {tuple(self.vectors.shape)} "
                f"for layers {list(self.layers)}"
            )
        object.__setattr__(self, "vectors", self.vectors.detach().to(torch.float32).cpu())
        object.__setattr__(self, "layers", tuple(int(la) for la in self.layers))

    @property
    def width(self) -> int:
        """Residual width ``d``."""
        return int(self.vectors.shape[1])

    def at(self, layer: int) -> torch.Tensor:
        """The vector of ``layer`` (a layer this direction was fitted at)."""
        if layer not in self.layers:
            raise LayerIndexError(f"this direction has no vector for layer {layer}; it covers layers {list(self.layers)}")
        return self.vectors[self.layers.index(layer)]

    def select(self, layers: int | list[int]) -> Direction:
        """A direction restricted to some of its layers."""
        items = [layers] if isinstance(layers, int) else list(layers)
        return replace(self, vectors=torch.stack([self.at(la) for la in items]), layers=tuple(items))

    def unit(self) -> Direction:
        """Every layer's vector scaled to norm 1."""
        norms = self.vectors.norm(dim=-1, keepdim=True)
        if bool((norms == 0).any()):
            raise ShapeError("cannot normalise a zero vector (a layer's classes had identical means)")
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
        """Write a ``.safetensors`` file with the vectors and the metadata."""
        path = Path(path)
        meta = {
            "layers": json.dumps(list(self.layers)),
            "site": self.site,
            "position": json.dumps(self.position),
            "method": self.method,
            "model": self.model,
            "data_hash": self.data_hash,
            "info": json.dumps(self.info),
            "format": "steerlab.Direction/1",
        }
        save_file({"vectors": self.vectors.contiguous()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Direction:
        """Read a file written by :meth:`save`."""
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != "steerlab.Direction/1":
                raise ShapeError(f"{path} is not a steerlab Direction file")
            vectors = fh.get_tensor("vectors")
        return cls(
            vectors=vectors,
            layers=tuple(json.loads(meta["layers"])),
            site=meta["site"],
            position=json.loads(meta["position"]),
            method=meta["method"],
            model=meta["model"],
            data_hash=meta["data_hash"],
            info=json.loads(meta["info"]),
        )
