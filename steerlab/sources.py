"""Where a model comes from: tell a local path from a hub id, and check either before transformers sees it.

A string is a *path* if it exists, starts with ``.``, ``~`` or ``/``, ends in ``.gguf``, contains a
backslash, or cannot be a hub id (``name`` or ``org/name``); anything else is a *hub id*. Nothing here
downloads: a hub id loads only from the local Hugging Face cache.

Example:
    >>> is_path_like("/some/dir"), is_path_like("org/model"), is_path_like("./model")
    (True, False, True)
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from steerlab.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def is_hub_id(text: str) -> bool:
    """Whether ``text`` is a well-formed Hugging Face repo id (``name`` or ``org/name``)."""
    return bool(_HUB_ID.match(text)) and ".." not in text and "--" not in text and len(text) <= 96


def is_path_like(text: str) -> bool:
    """Whether ``text`` names a local path rather than a hub id (see module docs)."""
    if text.startswith((".", "~", "/")) or "\\" in text or text.endswith(".gguf"):
        return True
    return Path(text).expanduser().exists() or not is_hub_id(text)


def local_kind(path: Path) -> Literal["gguf", "dir"]:
    """``"gguf"`` for a GGUF file, ``"dir"`` for a model directory; anything else raises :class:`ModelLoadError`."""
    if not path.exists():
        what = "GGUF file" if path.suffix == ".gguf" else "local directory"
        raise ModelLoadError(
            f"{what} {path} does not exist; check the path (a Hugging Face id looks like 'org/name', "
            "without a leading '/', '.' or '~')"
        )
    if path.is_file():
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head == GGUF_MAGIC:
            return "gguf"
        if path.suffix == ".gguf":
            raise ModelLoadError(
                f"{path} is not a GGUF file: it starts with {head!r}, not {GGUF_MAGIC!r} (an incomplete download, a "
                "Git LFS pointer, or another format?); download or export the .gguf again"
            )
        raise ModelLoadError(
            f"{path} is a file, not a model directory or a GGUF file; pass the directory that holds config.json "
            "(what save_pretrained writes) or a .gguf file"
        )
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        raise ModelLoadError(
            f"directory {path} is empty; pass the directory a model was saved to (model.save_pretrained(dir)), "
            "or a .gguf file"
        )
    if not (path / "config.json").is_file():
        ggufs = [name for name in entries if name.endswith(".gguf")]
        hint = (
            f"it holds {', '.join(ggufs)}: load that file, e.g. steerlab.load({str(path / ggufs[0])!r})"
            if ggufs
            else "pass the directory save_pretrained wrote (it has config.json), or a .gguf file"
        )
        shown = ", ".join(entries[:8]) + (", ..." if len(entries) > 8 else "")
        raise ModelLoadError(f"directory {path} has no config.json (it holds: {shown}); {hint}")
    return "dir"


def hub_cached(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds ``repo_id``'s config (no network access)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def unavailable(text: str, embedded: Iterable[str]) -> ModelLoadError:
    """The error for a name that is neither embedded, nor a local path, nor a cached hub id:
    a did-you-mean when it is close to an embedded name, else how to get the model."""
    names = sorted(embedded)
    low = text.lower()
    close = difflib.get_close_matches(low, names, n=3, cutoff=0.6)
    close += [n for n in names if len(low) >= 3 and n.startswith(low) and n not in close]
    if close:
        return ModelLoadError(
            f"no embedded model named {text!r}; did you mean {' or '.join(repr(n) for n in close)}? "
            f"Embedded models: {', '.join(names)}. ({text!r} is not a local path or a cached Hugging Face id either.)"
        )
    from huggingface_hub import constants

    return ModelLoadError(
        f"{text!r} is not an embedded model, not a local path, and not in the local Hugging Face cache "
        f"({constants.HF_HUB_CACHE}); steerlab does not download models. Download it first (e.g. `hf download "
        f"{text}`), pass its local directory or a .gguf file, or use an embedded model: {', '.join(names)}"
    )
