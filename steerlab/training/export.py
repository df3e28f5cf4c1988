"""Export a (baked) model to a directory that plain transformers loads, with a manifest of what was done to it.

* ``format="safetensors"``: ``save_pretrained`` (config, safetensors weights, generation config) plus
  the tokenizer; ``AutoModelForCausalLM.from_pretrained(path)`` loads it with no steerlab installed.
* ``format="gguf"``: one ``model.gguf`` with llama.cpp tensor names (llama/qwen2-style dense models; see
  :mod:`steerlab.training.gguf_export`); load it with ``from_pretrained(path, gguf_file="model.gguf")``.

Both write ``steerlab_manifest.json``: the edits baked in (with their parameters and the hashes of their
directions and tensors), parity figures, the source model, file hashes and library versions.
Every file written gets the mode a plain ``open()`` gives (``0644`` under umask 022), weights included.

Example:
    >>> import tempfile
    >>> from transformers import AutoModelForCausalLM
    >>> from steerlab.testing import tiny_model, tiny_direction
    >>> from steerlab.training import bake
    >>> model = tiny_model("llama")
    >>> path = export(bake(model, steerlab.Ablate(tiny_direction(model))), Path(tempfile.mkdtemp()) / "ablated")
    >>> type(AutoModelForCausalLM.from_pretrained(path)).__name__
    'LlamaForCausalLM'
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import steerlab
from steerlab import compat
from steerlab._files import shared_outputs, write_text
from steerlab.embedded import sha256_file
from steerlab.errors import NotExportableError
from steerlab.model import Model
from steerlab.training.manifest import MANIFEST_FORMAT, MANIFEST_NAME, describe, history, public

ExportFormat = Literal["safetensors", "gguf"]
GGUFPrecision = Literal["f32", "f16"]


def _versions() -> dict[str, str]:
    import torch
    import transformers

    out = {"steerlab": steerlab.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
    from importlib.metadata import PackageNotFoundError, version

    try:
        out["gguf"] = version("gguf")
    except PackageNotFoundError:
        out["gguf"] = "not installed"
    return out


def _save_safetensors(model: Model, path: Path) -> list[Path]:
    with compat.quantizer_detached(model.hf):  # GGUF-loaded: the weights are plain floats now
        model.hf.save_pretrained(path, safe_serialization=True)
    model.tokenizer.save_pretrained(path)
    return sorted(path.glob("*.safetensors"))


def export(
    model: Model,
    path: str | Path,
    *,
    format: ExportFormat = "safetensors",
    manifest: Mapping[str, Any] | None = None,
    precision: GGUFPrecision = "f32",
    source_gguf: str | Path | None = None,
    gguf_name: str = "model.gguf",
) -> Path:
    """Write ``model`` to the directory ``path`` (created if needed) and return it.

    ``manifest`` adds your own fields (under ``"extra"``) to ``steerlab_manifest.json``. GGUF only:
    ``precision`` is ``"f32"`` (exact) or ``"f16"`` (1D tensors stay f32); tokenizer metadata is copied from
    ``source_gguf`` (default: the GGUF the model was loaded from, when steerlab knows it) or built from the HF
    tokenizer. Unsupported combinations raise :class:`~steerlab.errors.NotExportableError`.

    Example:
        >>> import tempfile
        >>> from steerlab.testing import tiny_model, tiny_direction
        >>> from steerlab.training import bake
        >>> model, out = tiny_model("llama"), Path(tempfile.mkdtemp())
        >>> baked = bake(model, steerlab.Ablate(tiny_direction(model)))
        >>> export(baked, out / "llama-ablated").name
        'llama-ablated'
        >>> sorted(f.name for f in export(baked, out / "llama-ablated-gguf", format="gguf", precision="f16").iterdir())
        ['model.gguf', 'steerlab_manifest.json']
    """
    if format not in ("safetensors", "gguf"):
        raise NotExportableError(f"format must be 'safetensors' or 'gguf', got {format!r}")
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise NotExportableError(f"{out} exists and is not a directory; export writes a directory")
    out.mkdir(parents=True, exist_ok=True)
    with shared_outputs(out):  # safetensors writes weights as 0600; give every written file the mode open() would
        if format == "gguf":
            from steerlab.training.gguf_export import write_gguf

            files = [write_gguf(model, out / gguf_name, precision=precision, source_gguf=source_gguf)]
        else:
            files = _save_safetensors(model, out)
    edits = public(history(model.hf))
    body = {
        "format": MANIFEST_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "steerlab_version": steerlab.__version__,
        "source_model": edits[0]["source_model"] if edits else model.name,
        "model_name": model.name,
        "model_type": model.spec.model_type,
        "architectures": list(getattr(model.config, "architectures", None) or [type(model.hf).__name__]),
        "weights_format": format,
        "precision": precision if format == "gguf" else str(model.dtype).removeprefix("torch."),
        "files": {f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size} for f in files},
        "load_with": (
            f"AutoModelForCausalLM.from_pretrained(path, gguf_file={files[0].name!r})"
            if format == "gguf"
            else "AutoModelForCausalLM.from_pretrained(path)"
        ),
        "edits": edits,
        "parity": [p for e in edits for p in e.get("parity", [])],
        "versions": _versions(),
        "extra": describe(dict(manifest)) if manifest else {},
    }
    write_text(out / MANIFEST_NAME, json.dumps(body, indent=2, sort_keys=False) + "\n")
    return out


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The ``steerlab_manifest.json`` of an export directory.

    Example:
        >>> import tempfile
        >>> from steerlab.testing import tiny_model, tiny_direction
        >>> from steerlab.training import bake
        >>> model = tiny_model("llama")
        >>> path = export(bake(model, steerlab.Ablate(tiny_direction(model))), Path(tempfile.mkdtemp()) / "ablated")
        >>> read_manifest(path)["edits"][0]["intervention"]["type"]
        'Ablate'
    """
    file = Path(path) / MANIFEST_NAME
    if not file.is_file():
        raise NotExportableError(f"{path} has no {MANIFEST_NAME}; is it a steerlab export directory?")
    return json.loads(file.read_text())
