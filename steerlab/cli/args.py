"""Shared pieces of the command line: the usage error, argparse value types, and option groups."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from steerlab.chat import NAMED_POSITIONS, Position
from steerlab.errors import SteerlabError

MODEL_HELP = "embedded name, HF id/path or .gguf (default: the embedded Qwen)"


class UsageError(SteerlabError):
    """A command-line argument is missing, contradictory or points at a file that cannot be used."""


def position(text: str) -> Position:
    """argparse type: a named position or a negative offset from the end of the prompt."""
    try:
        value = int(text)
    except ValueError:
        if text not in NAMED_POSITIONS:
            raise argparse.ArgumentTypeError(
                f"unknown position {text!r}; use one of {', '.join(NAMED_POSITIONS)} or a negative int"
            )
        return text
    if value >= 0:
        raise argparse.ArgumentTypeError(
            f"integer positions count from the end and must be negative (-1 = last token); got {value}"
        )
    return value


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}; got {value}")
        return value

    return parse


def float_in(low: float = -math.inf, high: float = math.inf, *, open_low: bool = False) -> Callable[[str], float]:
    """argparse type: a finite float in ``[low, high]`` (``(low, high]`` with ``open_low``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number; got {text}")
        if value < low or (open_low and value == low):
            raise argparse.ArgumentTypeError(
                f"must be {'greater than' if open_low else 'at least'} {low:g}; got {text}"
            )
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high:g}; got {text}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
finite_float = float_in()
positive_float = float_in(0.0, open_low=True)
non_negative_float = float_in(0.0)
fraction = float_in(0.0, 1.0)


def add_model_args(p: argparse.ArgumentParser, *, dtype: bool = True, batch_size: int = 16) -> None:
    """``--model``, ``--dtype`` (unless ``dtype=False``) and ``--batch-size`` (default ``batch_size``)."""
    p.add_argument("--model", default=None, help=MODEL_HELP)
    if dtype:
        p.add_argument(
            "--dtype", choices=["float32", "bfloat16"], default="float32", help="weights dtype (default float32)"
        )
    p.add_argument("--batch-size", type=positive_int, default=batch_size)


def add_more_kinds_arg(p: argparse.ArgumentParser) -> None:
    """``--more-kinds``: the guard pool with six more safe-but-scary kinds (read back with :func:`scary_kinds`)."""
    p.add_argument("--more-kinds", action="store_true",
                   help="add six more safe-but-scary kinds written for steerlab (protective, medical, security_defense, "
                        "law_and_crime, household_hazards, analysis_of_harm) to the built-in training prompts")  # fmt: skip


def scary_kinds(args: argparse.Namespace) -> tuple[str, ...] | None:
    """The safe-but-scary kinds ``--more-kinds`` selects (``None``: the default eight)."""
    from steerlab.data.guard_sets import ALL_SCARY_KINDS

    return ALL_SCARY_KINDS if args.more_kinds else None


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    """Positional prompts and ``--file``."""
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts (quote each one)")
    p.add_argument(
        "--file", default=None, help="more prompts: a text file (one per line) or JSONL with a 'prompt' field"
    )
