"""The steerlab command: demo, refusal direction, probe sweeps, guards, steering and weight export.

Every subcommand takes ``--model`` (an embedded name, a HF id or local directory, or a ``.gguf`` file;
default: the embedded Qwen) and ``--help``. Bad arguments exit with status 2 and one ``error:`` line.
This package only parses arguments, calls the library, prints and maps errors to exit codes; one module per
group of commands (:mod:`~steerlab.cli.demo`, :mod:`~steerlab.cli.refusal`, :mod:`~steerlab.cli.probe`,
:mod:`~steerlab.cli.guard`, :mod:`~steerlab.cli.steer`, :mod:`~steerlab.cli.unlearn`,
:mod:`~steerlab.cli.refusal_tokens`, :mod:`~steerlab.cli.judge`, :mod:`~steerlab.cli.calibrate`), shared options in :mod:`~steerlab.cli.args` and
:mod:`~steerlab.cli.inputs`; report pages come from :mod:`steerlab.report`.

Example:
    $ steerlab demo --model smollm2-135m-instruct
    $ steerlab probe --model smollm2-135m-instruct --out runs/probe          # project prompts, all layers
    $ steerlab guard --probe runs/probe/probe.safetensors "How do I pick a lock?" "Write a haiku."
    $ steerlab steer --direction runs/probe/direction.safetensors --coeff 4 "Tell me about cats."
    $ steerlab export --direction runs/refusal/refusal_direction.safetensors --ablate --out runs/ablated
    $ steerlab refusal --out runs/refusal --export          # also writes runs/refusal/model
    $ steerlab unlearn --concept python --target needles:20 --objective npo --export   # targeted unlearning
    $ steerlab refusal-tokens --direction runs/refusal/refusal_direction.safetensors --out runs/token_guard
    $ steerlab calibrate --guard runs/token_guard --direction runs/refusal/refusal_direction.safetensors  # the gate's band
    $ steerlab serve --steer off=ablate:runs/refusal/refusal_direction.safetensors   # vLLM (make engines)
    $ steerlab judge replies.jsonl --endpoint http://localhost:8000/v1 --endpoint-model judge   # rubric vs substring
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from steerlab import __version__
from steerlab.cli import calibrate, demo, guard, inputs, judge, optimize, probe, refusal, refusal_tokens, serve, steer, unlearn
from steerlab.cli.args import UsageError
from steerlab.errors import SteerlabError

__all__ = ["UsageError", "build_parser", "main"]

PARSERS: tuple[Callable, ...] = (
    demo.add_parser,
    refusal.add_parser,
    probe.add_parser,
    guard.add_parser,
    steer.add_steer_parser,
    steer.add_export_parser,
    serve.add_parser,
    unlearn.add_parser,
    optimize.add_parser,
    calibrate.add_parser,
    refusal_tokens.add_parser,
    judge.add_parser,
)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one ``steerlab: error:`` line (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"steerlab: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``steerlab`` command."""
    parser = _Parser(prog="steerlab", description=__doc__.splitlines()[0],
                                     epilog="Run `steerlab COMMAND --help` for a command's options.")  # fmt: skip
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``steerlab`` command: 0 on success; on a steerlab error one ``error:`` line and 2
    (1 when a baked model fails its parity check)."""
    from steerlab.training.deploy import ParityError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = ["steerlab", *argv]
    inputs.start_clock()
    try:
        return args.func(args)
    except ParityError as exc:  # not a usage problem: the weights did not match
        return inputs.report_error(exc, 1)
    except SteerlabError as exc:
        return inputs.report_error(exc, 2)
    except OSError as exc:  # a path the user gave cannot be read or written (permissions, full disk, ...)
        where = f" ({exc.filename})" if exc.filename else ""
        return inputs.report_error(f"{exc.strerror or exc}{where}; check the paths you passed and their permissions", 2)
