"""Writing files the way ``open()`` would: readable by whoever the user's umask allows.

Atomic writes go through a temporary file that is renamed into place, and temporary files are
created private (``0600``); so are files written by libraries that write atomically themselves
(``safetensors.torch.save_file`` and so ``save_pretrained``). The helpers here give such files the
mode a plain ``open(path, "w")`` would have given them: ``0o666 & ~umask`` (``0644`` under umask 022).

* :func:`atomic_write` — write through a temporary file in the target folder, set the mode, rename.
* :func:`write_text` / :func:`save_safetensors` — the two common cases of it.
* :func:`shared_outputs` — a ``with`` block around third-party writers (``save_pretrained``): every file
  it creates or replaces in a folder gets the normal mode; files it leaves alone keep theirs.

Example:
    >>> import tempfile, pathlib
    >>> from steerlab._files import write_text, file_mode
    >>> path = write_text(pathlib.Path(tempfile.mkdtemp()) / "a.json", "{}")
    >>> path.stat().st_mode & 0o777 == file_mode()
    True
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def umask() -> int:
    """The process umask (read from ``/proc`` where possible: setting it to read it races with other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    """The permission bits ``open()`` gives a new file: ``0o666 & ~umask``."""
    return 0o666 & ~umask()


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary path next to ``path``, give it :func:`file_mode`, rename it onto ``path``.

    Readers never see a half-written file, and a failed write leaves ``path`` as it was.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write UTF-8 ``text`` to ``path`` with the normal file mode."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """``safetensors.torch.save_file`` with the normal file mode (it writes ``0600`` files on its own)."""
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(dict(tensors), str(tmp), metadata=metadata))


def _listing(folder: Path) -> dict[Path, tuple[int, int]]:
    out: dict[Path, tuple[int, int]] = {}
    for path in folder.rglob("*") if folder.is_dir() else ():
        if path.is_file():
            st = path.stat()
            out[path] = (st.st_ino, st.st_mtime_ns)
    return out


@contextlib.contextmanager
def shared_outputs(folder: str | Path) -> Iterator[Path]:
    """Give every file created or replaced under ``folder`` inside the block the normal file mode.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp())
        >>> with shared_outputs(out):
        ...     _ = (out / "config.json").write_text("{}")
        >>> (out / "config.json").stat().st_mode & 0o777 == file_mode()
        True
    """
    folder = Path(folder)
    before = _listing(folder)
    yield folder
    mode = file_mode()
    for path, key in _listing(folder).items():
        if before.get(path) != key:
            os.chmod(path, mode)
