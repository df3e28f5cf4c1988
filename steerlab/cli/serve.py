"""``steerlab serve``: vLLM's OpenAI-compatible server with saved directions chosen per request (the engines venv)."""

from __future__ import annotations

import argparse

from steerlab.cli import inputs
from steerlab.cli.args import UsageError, add_model_args, finite_float, int_at_least


def steering_spec(text: str) -> tuple[str, str, str, float | None]:
    """``NAME=ablate:PATH`` or ``NAME=add:PATH:COEFF`` -> ``(name, kind, path, coeff)``.

    Example:
        >>> steering_spec("refusal-on=add:runs/refusal/refusal_direction.safetensors:1.5")
        ('refusal-on', 'add', 'runs/refusal/refusal_direction.safetensors', 1.5)
    """
    name, sep, rest = text.partition("=")
    kind, _, tail = rest.partition(":")
    if not sep or not name or kind not in ("ablate", "add") or not tail:
        raise argparse.ArgumentTypeError(f"--steer {text!r}: use NAME=ablate:PATH or NAME=add:PATH:COEFF")
    if kind == "ablate":
        return name, kind, tail, None
    path, _, coeff = tail.rpartition(":")
    if not path:
        raise argparse.ArgumentTypeError(f"--steer {text!r}: an addition needs its coefficient, NAME=add:PATH:COEFF")
    return name, kind, path, finite_float(coeff)


def _serve(args: argparse.Namespace) -> int:
    from steerlab import compat
    from steerlab.backends.vllm_server import serve
    from steerlab.training.deploy import direction_edit

    compat.import_vllm()  # before loading anything: without vLLM this is one line and exit 2

    names = [s[0] for s in args.steer]
    if len(set(names)) != len(names):
        raise UsageError(f"--steer names must differ, got {names}")
    edits = {}
    for name, kind, path, coeff in args.steer:
        direction = inputs.load_direction(path, args.layer, ablate=kind == "ablate")
        edits[name] = direction_edit(direction, ablate=kind == "ablate", coeff=coeff, layer=args.layer, unit=False)
    model = inputs.load(args)
    serve(model, edits, host=args.host, port=args.port, max_model_len=args.max_model_len, log=inputs.log)
    return 0


def add_parser(sub) -> None:
    """The ``serve`` subcommand."""
    p = sub.add_parser(
        "serve",
        help="vLLM's OpenAI-compatible server; each request may name a steering in vllm_xargs (needs make engines)",
        description="Serve the model with vLLM; a request steers with \"vllm_xargs\": {\"steerlab\": NAME, "
        "\"steerlab_scale\": 1.0} (no field: plain). Runs in the engines venv (make engines).",
    )
    add_model_args(p)
    p.add_argument("--steer", action="append", type=steering_spec, required=True, metavar="NAME=KIND:PATH[:COEFF]",
                   help="register a steering: NAME=ablate:DIRECTION or NAME=add:DIRECTION:COEFF (repeatable)")  # fmt: skip
    p.add_argument("--layer", type=int_at_least(0), default=None, help="the direction's layer to use (default: its own)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int_at_least(1), default=8000)
    p.add_argument("--max-model-len", type=int_at_least(16), default=2048)
    p.set_defaults(func=_serve)
