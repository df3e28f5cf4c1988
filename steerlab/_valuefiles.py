"""Reading and writing the safetensors files of steerlab values (directions, probes, guards), with clear errors.

Every file carries a ``format`` tag in its metadata and, since this module, a ``sha256`` of its tensors
and metadata, so a damaged file (flipped bytes, truncated) is caught on load instead of loading as
wrong numbers. Files without the checksum (written before it) still load.

* :func:`write` — atomic write with the normal file mode and the checksum.
* :func:`read` — the tensors and metadata, or a :class:`~steerlab.errors.ValueFileError` naming the file.
* :func:`parsing` — a ``with`` block that turns errors while building the value into that error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from steerlab._files import save_safetensors
from steerlab.errors import SteerlabError, ValueFileError

# format tag -> (kind, how to load it)
FORMATS: dict[str, tuple[str, str]] = {
    "steerlab.Direction/1": ("Direction", "steerlab.steering.Direction.load"),
    "steerlab.Probe/1": ("Probe", "steerlab.probes.Probe.load (a ProbeGuard file: ProbeGuard.load)"),
    "steerlab.LinearProbe/1": ("LinearProbe", "steerlab.probes.LinearProbe.load"),
    "steerlab.LatentGuard/1": ("LatentGuard", "steerlab.probes.LatentGuard.load"),
}


def digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """sha256 over the metadata (without ``sha256``) and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in metadata.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Write ``tensors`` and ``metadata`` (plus its ``sha256``) atomically to ``path``."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {**metadata, "sha256": digest(tensors, metadata)}
    return save_safetensors(tensors, path, meta)


def read(
    path: str | Path, *, fmt: str, tensors: Sequence[str], keys: Sequence[str], optional: Sequence[str] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The named ``tensors`` (and those of ``optional`` the file has) and the metadata of a ``fmt`` file; every
    listed metadata key must be there."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    kind = FORMATS[fmt][0]
    if path.is_dir():
        raise ValueFileError(f"{path} is a directory, not a {kind} file; pass the .safetensors file written by {kind}.save")
    if not path.exists():
        raise ValueFileError(f"{path} does not exist; pass the path of a file written by {kind}.save")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            names = set(fh.keys())
            found = meta.get("format")
            if found != fmt:
                if found in FORMATS:
                    other, other_loader = FORMATS[found]
                    raise ValueFileError(f"{path} is a steerlab {other} file, not a {kind}; load it with {other_loader}")
                raise ValueFileError(
                    f"{path} is a safetensors file but not a steerlab {kind} file (format tag {found!r}, tensors "
                    f"{sorted(names)[:8]}); pass a file written by {kind}.save"
                )
            missing = [k for k in keys if k not in meta] + [t for t in tensors if t not in names]
            if missing:
                raise ValueFileError(
                    f"{path} is a damaged {kind} file: it lacks {', '.join(map(repr, missing))}; "
                    f"save the {kind} again (or restore the file from a copy)"
                )
            out = {name: fh.get_tensor(name) for name in names}
    except (SafetensorError, OSError, ValueError) as exc:
        if isinstance(exc, ValueFileError):
            raise
        raise ValueFileError(
            f"{path} is not a readable {kind} file: {exc} (truncated, damaged, or not safetensors); "
            f"save the {kind} again, or restore the file from a copy"
        ) from exc
    if "sha256" in meta and digest(out, meta) != meta["sha256"]:
        raise ValueFileError(
            f"{path} is a damaged {kind} file: its contents do not match the checksum it was saved with "
            f"(changed bytes?); save the {kind} again, or restore the file from a copy"
        )
    return {name: out[name] for name in [*tensors, *optional] if name in out}, meta


@contextlib.contextmanager
def parsing(path: str | Path, kind: str) -> Iterator[None]:
    """Errors while building a value from a file's contents become a :class:`ValueFileError` naming the file."""
    try:
        yield
    except ValueFileError:
        raise
    except (SteerlabError, ValueError, TypeError, KeyError) as exc:
        raise ValueFileError(
            f"{path} does not hold a valid {kind}: {exc}. Save the {kind} again from valid data, "
            "or restore the file from a copy"
        ) from exc
