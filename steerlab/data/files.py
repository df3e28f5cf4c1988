"""Reading your own prompt sets from files: plain text (one prompt per line) or JSONL (a ``"prompt"`` field).

* :func:`read_prompts` — the prompts of one file, or a :class:`PromptFileError` naming the file, the line and the fix.
* :func:`read_replies` — (prompts, replies) of a JSONL file of ``{"prompt": ..., "reply": ...}`` lines, to judge.

Example:
    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "harmless.txt"
    >>> _ = path.write_text("Write a haiku.\\n\\nTell me a joke.\\n")
    >>> read_prompts(path)
    ['Write a haiku.', 'Tell me a joke.']
"""

from __future__ import annotations

import json
from pathlib import Path

from steerlab.errors import SteerlabError


class PromptFileError(SteerlabError, ValueError):
    """A prompt file is missing, a directory, not UTF-8 text, empty, or has a JSONL line without a ``prompt``."""


def prompt_file(path: str | Path) -> Path:
    """``path`` as a Path, or a :class:`PromptFileError` when it is a directory or does not exist."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise PromptFileError(f"prompt file {p} is a directory; pass the file itself")
    if not p.is_file():
        raise PromptFileError(f"prompt file {p} does not exist")
    return p


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line) or a JSONL file (a ``"prompt"`` field per line).

    Blank lines are skipped; the other lines are stripped. A file named ``*.jsonl`` or whose first non-blank
    line starts with ``{`` is read as JSONL. Raises :class:`PromptFileError` for a missing, non-UTF-8 or
    empty file and for a JSONL line that is not an object with a string ``"prompt"``.
    """
    p = prompt_file(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PromptFileError(
            f"{p} is not UTF-8 text (byte {exc.start}); prompt files are text (one prompt per line) or JSONL"
        ) from exc
    lines = [(i + 1, line.strip()) for i, line in enumerate(text.splitlines()) if line.strip()]
    if not lines:
        raise PromptFileError(f"{p} holds no prompts; write one prompt per line (or JSONL with a 'prompt' field)")
    if p.suffix != ".jsonl" and not lines[0][1].startswith("{"):
        return [line for _, line in lines]
    return [_jsonl_prompt(p, number, line) for number, line in lines]


def read_replies(path: str | Path) -> tuple[list[str], list[str]]:
    """Prompts and replies from a JSONL file: one ``{"prompt": "...", "reply": "..."}`` object per line (blank lines
    skipped; an empty reply is kept, it is a verdict of its own). Raises :class:`PromptFileError` naming the line.

    Example:
        >>> import json, pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "replies.jsonl"
        >>> _ = path.write_text(json.dumps({"prompt": "Hi", "reply": "Hello!"}) + "\\n")
        >>> read_replies(path)
        (['Hi'], ['Hello!'])
    """
    p = prompt_file(path)
    try:
        lines = [(i + 1, line.strip()) for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()) if line.strip()]
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{p} is not UTF-8 text (byte {exc.start}); a reply file is JSONL") from exc
    if not lines:
        raise PromptFileError(f'{p} holds no replies; write one {{"prompt": "...", "reply": "..."}} object per line')
    prompts, replies = [], []
    for number, line in lines:
        record = _jsonl_record(p, number, line)
        prompts.append(record["prompt"])
        reply = record.get("reply")
        if not isinstance(reply, str):
            raise PromptFileError(f'{p}:{number} has no string \'reply\' field; each line needs {{"prompt": "...", "reply": "..."}}')
        replies.append(reply)
    return prompts, replies


def _jsonl_prompt(path: Path, number: int, line: str) -> str:
    """The ``"prompt"`` of line ``number`` of a JSONL prompt file."""
    return _jsonl_record(path, number, line)["prompt"]


def _jsonl_record(path: Path, number: int, line: str) -> dict:
    """Line ``number`` of a JSONL file as an object with a string ``"prompt"``."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PromptFileError(
            f"{path}:{number} is not valid JSON ({exc.msg}); JSONL files need one object per line"
        ) from exc
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise PromptFileError(
            f'{path}:{number} has no string \'prompt\' field; each JSONL line needs {{"prompt": "..."}}'
        )
    return record
