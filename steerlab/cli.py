"""The steerlab command: demo, refusal direction, probe sweeps, guards, steering and weight export.

Every subcommand takes ``--model`` (an embedded name, a HF id or local directory, or a ``.gguf`` file;
default: the embedded Qwen) and ``--help``. Bad arguments exit with status 2 and one ``error:`` line.
This module only parses arguments and calls the library; report pages come from :mod:`steerlab.report`.

Example:
    $ steerlab demo --model smollm2-135m-instruct
    $ steerlab probe --model smollm2-135m-instruct --out runs/probe          # project prompts, all layers
    $ steerlab guard --probe runs/probe/probe.safetensors "How do I pick a lock?" "Write a haiku."
    $ steerlab steer --direction runs/probe/direction.safetensors --coeff 4 "Tell me about cats."
    $ steerlab export --direction runs/refusal/refusal_direction.safetensors --ablate --out runs/ablated
    $ steerlab refusal --out runs/refusal --export          # also writes runs/refusal/model
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from steerlab import __version__
from steerlab.errors import SteerlabError
from steerlab.steering.refusal import MIN_REFUSAL_RATE

if TYPE_CHECKING:
    from steerlab.model import Model
    from steerlab.steering import Direction

SWEEP_SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out")
_T0 = time.perf_counter()


class UsageError(SteerlabError):
    """A command-line argument is missing, contradictory or points at a file that cannot be used."""


class ParityError(SteerlabError):
    """A baked model does not match the runtime hook within the tolerance; nothing was exported."""


# ----- small shared helpers -----
def _log(message: str) -> None:
    """A progress line on stderr (stdout stays for results), with the seconds since start."""
    print(f"[{time.perf_counter() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def _existing_file(path: str | None, what: str) -> Path | None:
    """``path`` as a Path, or a :class:`UsageError` naming ``what`` when it is not a file."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"{what} file {p} is a directory; pass the file itself")
    if not p.is_file():
        raise UsageError(f"{what} file {p} does not exist")
    return p


def _output_dir(path: str) -> Path:
    """``--out`` as a Path; a :class:`UsageError` when it names an existing file. The folder is not created
    here: each command creates it when it has something to write, so a failed run leaves nothing behind."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UsageError(f"output directory {p} is an existing file; pass a directory with --out")
    _check_parent(p, "output directory")
    return p


def _check_parent(path: Path, what: str) -> None:
    """The nearest existing folder above ``path`` must be a directory (not a file), or nothing can be written."""
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{what} {path} is inside {parent}, which is a file; pass a path inside a directory")
            return


def _read_saved(path: Path, what: str, read: Callable[[Path], Any]) -> Any:
    """``read(path)``, with any failure that is not a steerlab error (a corrupt or foreign file makes
    safetensors, json or torch raise their own types) turned into one :class:`UsageError` line."""
    try:
        return read(path)
    except SteerlabError:
        raise
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise UsageError(f"{path} is not a readable {what} file ({reason}); pass a file that steerlab saved") from exc


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line) or a JSONL file (a ``"prompt"`` field per line).

    Blank lines are skipped. A file whose first non-blank line starts with ``{`` (or named ``*.jsonl``)
    is read as JSONL.
    """
    p = _existing_file(str(path), "prompt")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"{p} is not UTF-8 text (byte {exc.start}); prompt files are text (one prompt per line) or JSONL"
        ) from exc
    lines = [(i + 1, line.strip()) for i, line in enumerate(text.splitlines()) if line.strip()]
    if not lines:
        raise UsageError(f"{p} holds no prompts; write one prompt per line (or JSONL with a 'prompt' field)")
    if p.suffix != ".jsonl" and not lines[0][1].startswith("{"):
        return [line for _, line in lines]
    prompts = []
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(
                f"{p}:{number} is not valid JSON ({exc.msg}); JSONL files need one object per line"
            ) from exc
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UsageError(f'{p}:{number} has no string \'prompt\' field; each JSONL line needs {{"prompt": "..."}}')
        prompts.append(record["prompt"])
    return prompts


def _position(text: str):
    """argparse type: a named position or a negative offset from the end of the prompt."""
    from steerlab.chat import NAMED_POSITIONS

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


def _int_at_least(minimum: int) -> Callable[[str], int]:
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


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _float_in(low: float = -math.inf, high: float = math.inf, *, open_low: bool = False) -> Callable[[str], float]:
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


_finite_float = _float_in()
_positive_float = _float_in(0.0, open_low=True)
_non_negative_float = _float_in(0.0)
_fraction = _float_in(0.0, 1.0)


def _gather_prompts(args: argparse.Namespace) -> list[str]:
    """Positional prompts plus those of ``--file``; a :class:`UsageError` when there are none."""
    prompts = list(args.prompts) + (read_prompts(args.file) if args.file else [])
    if not prompts:
        raise UsageError("no prompts: pass them as arguments or with --file FILE")
    return prompts


def _check_model_arg(model: str | None) -> None:
    """A local ``--model`` directory must hold a checkpoint (a ``config.json``)."""
    if model is None:
        return
    p = Path(model).expanduser()
    if p.is_dir() and not (p / "config.json").is_file():
        raise UsageError(
            f"--model {model} is a directory without config.json; pass a saved HF checkpoint directory, "
            "a .gguf file or an embedded name"
        )


def _open_model(source: str | None, dtype: str) -> Model:
    """``steerlab.load(source)`` in ``dtype``; errors of files transformers cannot read become a :class:`UsageError`."""
    import torch

    import steerlab

    _check_model_arg(source)
    try:
        return steerlab.load(source, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as exc:
        if isinstance(exc, SteerlabError):
            raise
        reason = " ".join(str(exc).split())
        raise UsageError(f"could not load the model {source!r}: {reason}") from exc


def _load(args: argparse.Namespace, *, dtype: str | None = None) -> Model:
    """The model named by ``--model`` in ``--dtype`` (or ``dtype``), with a log line."""
    name = dtype or getattr(args, "dtype", "float32")
    model = _open_model(args.model, name)
    _log(f"loaded {model.name} ({model.spec.model_type}, {model.n_layers} layers, d={model.d_model}, {name})")
    return model


def _load_direction(path: str, layer: int | None = None, *, ablate: bool = False) -> Direction:
    """A saved direction; ``layer`` (``--layer``) must be one of its layers where the op needs its vector."""
    from steerlab.steering import Direction

    direction = _read_saved(_existing_file(path, "direction"), "steerlab Direction", Direction.load)
    needs_own = ablate or len(direction.layers) > 1  # AddVector of a one-layer direction may add it anywhere
    if layer is not None and needs_own and layer not in direction.layers:
        raise UsageError(f"--layer {layer} is not a layer of the direction (it covers {list(direction.layers)})")
    if ablate and layer is None and len(direction.layers) > 1:
        raise UsageError(
            f"the direction covers layers {list(direction.layers)}; pick the vector to ablate with --layer"
        )
    return direction


def _short(text: str, width: int = 70) -> str:
    """One line, at most ``width`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


# ----- demo -----
def _demo(args: argparse.Namespace) -> int:
    import torch

    import steerlab
    from steerlab.data import DEMO_HARMFUL, DEMO_HARMLESS

    t0 = time.perf_counter()
    model = _open_model(args.model, "float32")
    print(
        f"loaded {model.name} ({model.spec.model_type}, {model.n_layers} layers, d={model.d_model}) "
        f"in {time.perf_counter() - t0:.1f}s"
    )
    fmt = model.chat()
    rendered = fmt.render(DEMO_HARMLESS[0])
    print("\nrendered chat prompt:\n" + rendered.text)
    print(f"post-instruction span (end of turn + assistant header): {fmt.suffix!r} = {len(fmt.header_ids)} tokens")

    prompts = DEMO_HARMFUL + DEMO_HARMLESS
    t0 = time.perf_counter()
    acts = steerlab.collect(
        model, prompts, sites=["resid_pre"], positions=["t_inst", "last"], batch_size=args.batch_size
    )
    print(f"collected resid_pre at t_inst and last for {len(prompts)} prompts in {time.perf_counter() - t0:.1f}s\n")

    n = len(DEMO_HARMFUL)
    print("layer  |h| t_inst  |h| last  sep t_inst  sep last  cos(diff t_inst, diff last)")
    for j, layer in enumerate(acts.layers):
        row = []
        diffs = []
        for pos in ("t_inst", "last"):
            x = acts.get("resid_pre", pos)[:, j, 0].double()
            diff = x[:n].mean(0) - x[n:].mean(0)
            spread = torch.cat([x[:n] - x[:n].mean(0), x[n:] - x[n:].mean(0)]).norm(dim=-1).mean()
            sep = (diff.norm() / spread).item() if spread > 0 else 0.0  # layer 0: one token, one embedding
            row.append((x.norm(dim=-1).mean().item(), sep))
            diffs.append(diff)
        cos = torch.nn.functional.cosine_similarity(diffs[0], diffs[1], dim=0, eps=1e-12).item()
        print(f"{layer:5d}  {row[0][0]:10.2f}  {row[1][0]:8.2f}  {row[0][1]:10.3f}  {row[1][1]:8.3f}  {cos:8.3f}")
    print("\nsep = |mean(harmful) - mean(harmless)| / mean distance to class mean (higher: classes further apart)")
    return 0


# ----- bake + parity + export (export and refusal --export) -----
def parity_prompts(n: int = 3) -> list[str]:
    """A few held-out project prompts (``n`` harmful + ``n`` harmless test prompts) for parity checks."""
    from steerlab.data import load_split

    split = load_split()
    return split.harmful_test[:n] + split.harmless_test[:n]


def bake_and_export(
    model: Model,
    intervention: Any,
    out: Path,
    *,
    format: str = "safetensors",
    precision: str = "f32",
    tol: float = 1e-2,
    prompts: Sequence[str] | None = None,
    manifest: dict | None = None,
) -> dict[str, Any]:
    """Bake ``intervention`` into a copy of ``model``, check parity against the hook, export to ``out``.

    Returns ``{"path", "format", "parity", "tolerance"}``. Raises :class:`ParityError` (before writing
    anything) when the largest logit difference exceeds ``tol``.
    """
    from steerlab.training import bake, export, parity

    baked = bake(model, intervention)
    _log(f"baked {type(intervention).__name__} into the weights")
    report = parity(model, baked, intervention, list(prompts or parity_prompts()), max_new_tokens=8)
    _log(
        f"parity on {report.n_prompts} prompts ({report.n_tokens} tokens): max |logit diff| {report.max_abs_logit_diff:.3g} "
        f"(logit scale {report.logit_scale:.3g}), greedy 8-token match {report.generation_match:.0%}"
    )
    if report.max_abs_logit_diff > tol:
        raise ParityError(
            f"the baked model differs from the hooked one by up to {report.max_abs_logit_diff:.3g} in the logits "
            f"(tolerance {tol:g}); nothing was exported. Bake in float32 (--dtype float32) or raise --tol"
        )
    path = export(baked, out, format=format, precision=precision, manifest=manifest)
    _log(f"exported {format} to {path}")
    return {"path": str(path), "format": format, "tolerance": tol, "parity": report.to_dict()}


def _export(args: argparse.Namespace) -> int:
    from steerlab.steering import Ablate, AddVector

    _output_dir(args.out)
    direction = _load_direction(args.direction, args.layer, ablate=args.ablate)
    model = _load(args)
    if args.ablate:
        iv = Ablate(direction, source_layer=args.layer)
    else:
        iv = AddVector(direction, coeff=args.coeff, layers=None if args.layer is None else [args.layer], unit=args.unit)
    manifest = {"command": "steerlab export", "direction_file": str(Path(args.direction).resolve())}
    info = bake_and_export(
        model, iv, Path(args.out), format=args.format, precision=args.precision, tol=args.tol, manifest=manifest
    )
    rep = info["parity"]
    print(f"max |logit diff| (hooked vs baked, {rep['n_prompts']} prompts): {rep['max_abs_logit_diff']:.3g}")
    print(f"greedy {rep['max_new_tokens']}-token generations identical: {rep['generation_match']:.0%}")
    print(f"wrote {info['path']} ({args.format}); load it with transformers' AutoModelForCausalLM.from_pretrained")
    return 0


# ----- probe -----
def _probe_data(args: argparse.Namespace) -> tuple[list[str], list[str], str]:
    """(positive, negative, where from): the two files, or the project's training split."""
    if (args.harmful is None) != (args.harmless is None):
        raise UsageError(
            "pass both --harmful and --harmless, or neither (then the project's training prompts are used)"
        )
    if args.harmful is not None:
        pos, neg, source = read_prompts(args.harmful), read_prompts(args.harmless), f"{args.harmful} vs {args.harmless}"
    else:
        from steerlab.data import load_split

        split = load_split(seed=args.seed)
        pos, neg, source = split.harmful_train, split.harmless_train, "steerlab.data.load_split() train parts"
    if args.limit is not None:
        pos, neg = pos[: args.limit], neg[: args.limit]
    if min(len(pos), len(neg)) < args.folds:
        raise UsageError(
            f"{args.folds}-fold cross-validation needs at least {args.folds} prompts per class; got {len(pos)} and {len(neg)}"
        )
    return pos, neg, source


def _column_position(positions: Sequence, widths: Sequence[int], column: int):
    """The position (name or negative offset) that sweep column ``column`` reads."""
    for p, k in zip(positions, widths):
        if column < k:
            if k == 1:
                return p
            if p == "post_inst":
                return column - k  # the post-instruction span ends at the last prompt token
            raise UsageError(f"position {p!r} spans {k} tokens; pass a single-token position")
        column -= k
    raise IndexError(column)


def _probe(args: argparse.Namespace) -> int:
    import torch

    import steerlab
    from steerlab.probes import fit_probes, sweep
    from steerlab.probes.sweep import position_columns
    from steerlab.report import RunInfo, write_sweep_report
    from steerlab.steering import mean_difference, prompts_hash

    if "all" in args.positions:
        raise UsageError(
            "'all' has a different length per prompt and cannot be swept; use fixed positions such as t_inst, last, post_inst"
        )
    pos, neg, source = _probe_data(args)
    out = _output_dir(args.out)
    model = _load(args)
    _log(f"sweeping {len(pos)} + {len(neg)} prompts ({source}) at {args.site}, positions {args.positions}")
    acts = steerlab.collect(
        model, pos + neg, sites=[args.site], layers=args.layers, positions=args.positions, batch_size=args.batch_size
    )
    parts = [acts.get(args.site, p) for p in args.positions]
    widths = [t.shape[2] for t in parts]
    x, y = torch.cat(parts, dim=2), torch.tensor([1] * len(pos) + [0] * len(neg))
    columns = position_columns(model, args.positions, widths)
    result = sweep(x, y, layers=acts.layers, columns=columns, n_folds=args.folds, C=args.C, seed=args.seed)
    layer, column, value = result.best(args.metric)
    i, j = acts.layers.index(layer), columns.index(column)
    position = _column_position(args.positions, widths, j)
    meta = {"site": args.site, "position": position, "model": model.name}
    probe = fit_probes(x[:, i : i + 1, j], y, layers=[layer], C=args.C, labels=("harmless", "harmful"), **meta)
    direction = mean_difference(
        x[y == 1][:, i : i + 1, j], x[y == 0][:, i : i + 1, j], layers=[layer], data_hash=prompts_hash(pos, neg), **meta
    )

    out.mkdir(parents=True, exist_ok=True)
    probe.save(out / "probe.safetensors")
    direction.save(out / "direction.safetensors")
    best = {"layer": layer, "column": column, "position": position, "metric": args.metric, "value": value}
    summary = {"model": model.name, "data": source, "site": args.site, "positions": args.positions, "C": args.C, "best": best,
               "files": {"probe": "probe.safetensors", "direction": "direction.safetensors", "heatmap": "sweep.html"},
               "sweep": result.to_dict()}  # fmt: skip
    info = RunInfo.collect(model=model.name, dtype=args.dtype, seed=args.seed, argv=args.argv)
    summary["run"] = info.to_dict()
    (out / "sweep.json").write_text(json.dumps(summary, indent=1))
    write_sweep_report(out, result, metric=args.metric, info=info, data=source, site=args.site, best=best)
    print(result.table(args.metric))
    print(f"\nbest: layer {layer}, position {column} ({args.metric} {value:.3f}, {args.folds}-fold CV)")
    print(
        f"wrote {out}/sweep.json, sweep.html (with plotly.min.js), probe.safetensors (layer {layer}, position {position!r}), "
        "direction.safetensors"
    )
    return 0


# ----- guard -----
def _guard_kind(path: Path) -> str:
    """``"probe"`` or ``"latent"`` from a saved file's format tag."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            tag = (fh.metadata() or {}).get("format", "")
    except Exception as exc:  # safetensors raises its own error types for non-safetensors files
        raise UsageError(f"{path} is not a safetensors file ({exc})") from exc
    kinds = {"steerlab.Probe/1": "probe", "steerlab.LatentGuard/1": "latent"}
    if tag not in kinds:
        raise UsageError(f"{path} is neither a steerlab Probe nor a LatentGuard file (format {tag!r})")
    return kinds[tag]


def _fit_guard(model: Model, args: argparse.Namespace):
    """A guard fitted on the project's training prompts and calibrated on its validation prompts."""
    from steerlab.data import load_split
    from steerlab.probes import LatentGuard, ProbeGuard

    split = load_split(seed=args.seed)
    n = args.n_train
    kw = {"position": args.position, "batch_size": args.batch_size, "progress": True}
    _log(
        f"fitting a {args.mode} guard on {min(n, len(split.harmful_train))} + {min(n, len(split.harmless_train))} training prompts"
    )
    if args.mode == "latent":
        guard = LatentGuard.fit(model, split.harmful_train[:n], split.harmless_train[:n], layers=args.layers, **kw)
    else:
        layer = None if args.layers is None else args.layers[0]
        guard = ProbeGuard.fit(model, split.harmful_train[:n], split.harmless_train[:n], layer=layer, **kw)
    if args.threshold is None:
        guard = guard.calibrate(split.harmful_val, split.harmless_val, batch_size=args.batch_size, progress=True)
        _log(f"threshold calibrated on {len(split.harmful_val)} + {len(split.harmless_val)} validation prompts")
    return guard


def _guard_summary(guard) -> str:
    from steerlab.probes import ProbeGuard

    if isinstance(guard, ProbeGuard):
        p = guard.probe
        return f"ProbeGuard: P(harmful) at layer {p.layers[0]}, position {p.position!r}, flag when >= {guard.threshold:.4g}"
    return f"LatentGuard: cosine score over {len(guard.layers)} layers at {guard.position!r}, flag when >= {guard.threshold:.4g}"


def _guard(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from steerlab.probes import LatentGuard, ProbeGuard

    prompts = _gather_prompts(args)
    path = _existing_file(args.probe, "guard")
    if path is not None:
        kind = _guard_kind(path)
        if args.mode is not None and args.mode != kind:
            raise UsageError(
                f"{path} holds a {kind} guard but --mode {args.mode} was given; drop --mode or pass another file"
            )
        args.mode = kind
    else:
        args.mode = args.mode or "probe"
    if args.save_to and path is not None:
        raise UsageError("--save writes a freshly fitted guard; it cannot be combined with --probe")
    if args.save_to and Path(args.save_to).expanduser().is_dir():
        raise UsageError(f"--save {args.save_to} is a directory; pass a file name such as guard.safetensors")
    if args.save_to:
        _check_parent(Path(args.save_to).expanduser(), "--save file")
    if args.mode == "probe" and args.layers is not None and len(args.layers) > 1:
        raise UsageError(f"a probe guard reads one layer; got --layers {' '.join(map(str, args.layers))}")
    model = _load(args)
    if path is not None:
        kind = ProbeGuard if args.mode == "probe" else LatentGuard
        guard = _read_saved(path, f"steerlab {kind.__name__}", lambda f: kind.load(f, model=model))
    else:
        guard = _fit_guard(model, args)
    if args.threshold is not None:
        guard = replace(guard, threshold=args.threshold)
    if args.save_to:
        Path(args.save_to).expanduser().parent.mkdir(parents=True, exist_ok=True)
        guard.save(args.save_to)
        _log(f"saved the guard to {args.save_to}")
    scores = guard.score(prompts, batch_size=args.batch_size, progress=True)
    print(_guard_summary(guard))
    print(f"{'score':>8}  {'flag':<4}  prompt")
    for prompt, score in zip(prompts, scores.tolist()):
        print(f"{score:>8.4f}  {'yes' if score >= guard.threshold else 'no':<4}  {_short(prompt)}")
    print(f"flagged {int((scores >= guard.threshold).sum())} of {len(prompts)}")
    return 0


# ----- steer -----
def _steer_op(direction: Direction, args: argparse.Namespace):
    """The intervention and a label for it."""
    from steerlab.steering import Ablate, AddVector

    if args.ablate:
        op = Ablate(direction, source_layer=args.layer)
        return (
            op,
            f"direction ablated (vector of layer {args.layer if args.layer is not None else direction.layers[0]}, every layer)",
        )
    layers = None if args.layer is None else [args.layer]
    op = AddVector(direction, coeff=args.coeff, layers=layers, unit=args.unit)
    shown = list(direction.layers) if layers is None else layers
    return op, f"direction added x{args.coeff:g}{' (unit)' if args.unit else ''} at layer(s) {shown}"


def _steer(args: argparse.Namespace) -> int:
    prompts = _gather_prompts(args)
    direction = _load_direction(args.direction, args.layer, ablate=args.ablate)
    model = _load(args)
    op, label = _steer_op(direction, args)
    gen = {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "progress": True}
    before = model.generate(prompts, **gen)
    with model.apply(op):
        after = model.generate(prompts, **gen)
    print(f"steering: {label}\n")
    for prompt, a, b in zip(prompts, before, after):
        print(f"prompt: {prompt}\n  before: {_short(a, 200)}\n  after:  {_short(b, 200)}\n")
    return 0


# ----- refusal -----
def _export_refusal(args: argparse.Namespace, direction: Direction, out: Path) -> dict[str, Any]:
    """Bake the direction's ablation into a float32 copy of the model and export it."""
    from steerlab.steering import Ablate

    target = Path(args.export) if args.export else out / "model"
    model = _load(args, dtype="float32")
    manifest = {
        "command": "steerlab refusal --export",
        "direction_file": str((out / "refusal_direction.safetensors").resolve()),
    }
    return bake_and_export(model, Ablate(direction), target, format=args.export_format, manifest=manifest, tol=args.tol)


def _refusal(args: argparse.Namespace) -> int:
    import random

    from steerlab.data import advbench, load_split
    from steerlab.report import RunInfo, write_refusal_report, write_selection_report
    from steerlab.steering.evaluate import evaluate_refusal_direction
    from steerlab.steering.refusal import refusal_direction

    t0 = time.perf_counter()
    out = _output_dir(args.out)
    if args.export:
        _output_dir(args.export)
    split = load_split(seed=args.seed)
    held_out = advbench()
    if args.n_eval > len(held_out):
        raise UsageError(
            f"--n-eval {args.n_eval} is more than the {len(held_out)} AdvBench prompts; pass at most {len(held_out)}"
        )
    run_model = _open_model(args.model, args.eval_dtype)
    print(
        f"[{time.perf_counter() - t0:6.0f}s] loaded {run_model.name}: select and generate in {args.eval_dtype}, "
        "fit in float32"
    )
    # the float32 copy is loaded only after the check that the model refuses (a model that does not fails sooner)
    fit_model = run_model if args.eval_dtype == "float32" else (lambda: _open_model(args.model, "float32"))
    direction, report = refusal_direction(
        run_model, split.harmful_train, split.harmless_train, harmful_val=split.harmful_val,
        harmless_val=split.harmless_val, filter_train=args.filter, fit_model=fit_model, kl_max=args.kl_max,
        induce_min=args.induce_min, induce_coeff=args.coeff, min_refusal_rate=args.min_refusal_rate,
        batch_size=args.batch_size,
    )  # fmt: skip
    del fit_model
    out.mkdir(parents=True, exist_ok=True)  # the first file to write: a failed selection leaves no folder
    direction.save(out / "refusal_direction.safetensors")
    chosen = report.chosen
    print(
        f"[{time.perf_counter() - t0:6.0f}s] selected position {chosen.position}, layer {chosen.layer}\n{report.table()}"
    )

    random.Random(args.seed).shuffle(held_out)
    result = evaluate_refusal_direction(
        run_model, direction, harmful=held_out[: args.n_eval], harmless=split.harmless_test,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, coeff=args.coeff,
    )  # fmt: skip
    print(
        f"[{time.perf_counter() - t0:6.0f}s] held-out evaluation (greedy, {args.max_new_tokens} new tokens):\n{result.as_table()}"
    )
    info = RunInfo.collect(
        model=run_model.name, dtype=f"float32 (fit), {args.eval_dtype} (selection, evaluation)", seed=args.seed,
        argv=args.argv,
    )  # fmt: skip
    del run_model
    body: dict[str, Any] = {"run": info.to_dict(), "selection": report.to_dict(), "evaluation": result.to_dict()}
    export_info, status = None, 0
    if args.export is not None:
        try:
            export_info = _export_refusal(args, direction, out)
        except SteerlabError as exc:  # keep the reports; the missing export is the non-zero exit
            body["export"] = {"error": str(exc)}
            status = _error(exc, 1 if isinstance(exc, ParityError) else 2)
        else:
            body["export"] = export_info
            print(f"[{time.perf_counter() - t0:6.0f}s] exported the ablated model to {export_info['path']} "
                  f"(max |logit diff| vs the hook {export_info['parity']['max_abs_logit_diff']:.3g})")  # fmt: skip
    (out / "report.json").write_text(json.dumps(body, indent=1))
    write_selection_report(out, report, info=info)
    write_refusal_report(out, report, result, info=info, export_info=export_info)
    print(f"wrote {out}/refusal_direction.safetensors, report.json, report.html, selection.html, plotly.min.js")
    return status


# ----- the parser -----
def _add_model_args(p: argparse.ArgumentParser, *, dtype: bool = True, batch_size: int = 16) -> None:
    p.add_argument("--model", default=None, help="embedded name, HF id/path or .gguf (default: the embedded Qwen)")
    if dtype:
        p.add_argument(
            "--dtype", choices=["float32", "bfloat16"], default="float32", help="weights dtype (default float32)"
        )
    p.add_argument("--batch-size", type=_positive_int, default=batch_size)


def _add_prompt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts (quote each one)")
    p.add_argument(
        "--file", default=None, help="more prompts: a text file (one per line) or JSONL with a 'prompt' field"
    )


def _demo_parser(sub) -> None:
    demo = sub.add_parser(
        "demo", help="load a model, render a chat prompt, collect activations, print a per-layer summary"
    )
    demo.add_argument("--model", default=None, help="embedded name, HF id/path or .gguf (default: the embedded Qwen)")
    demo.add_argument("--batch-size", type=_positive_int, default=8)
    demo.set_defaults(func=_demo)


def _refusal_parser(sub) -> None:
    ref = sub.add_parser("refusal", help="fit and select the refusal direction, evaluate ablation and addition")
    ref.add_argument("--model", default=None, help="embedded name, HF id/path or .gguf (default: the embedded Qwen)")
    ref.add_argument("--out", default="runs/refusal", help="output directory")
    ref.add_argument("--n-eval", type=_positive_int, default=100, help="held-out AdvBench prompts to generate on")
    ref.add_argument("--max-new-tokens", type=_positive_int, default=64)
    ref.add_argument("--filter", choices=["score", "judge", "none"], default="judge", help="training-prompt filter")
    # METHODS 1 filters at KL < 0.1 on validation; with 32 validation prompts a pick at 0.098 measured 0.140 on
    # held-out harmless prompts, so the main job keeps a margin (pick at 0.046 -> 0.066 held out).
    ref.add_argument("--kl-max", type=_positive_float, default=0.05, help="KL filter on validation (METHODS 1: 0.1)")
    ref.add_argument(
        "--induce-min", type=_finite_float, default=0.0, help="induce filter: mean refusal score above this"
    )
    # METHODS 1 adds the raw difference of means (coefficient 1). On the 0.5B Qwen no candidate lifts the mean
    # harmless refusal score above 0 at coefficient 1 (best -0.54: position -1, layer 18), while 2 does (+1.11);
    # experiments/refusal_candidate_grid.py prints the grid.
    ref.add_argument(
        "--coeff", type=_positive_float, default=2.0, help="addition coefficient (induce filter and evaluation)"
    )
    ref.add_argument("--eval-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ref.add_argument("--batch-size", type=_positive_int, default=16)
    ref.add_argument("--seed", type=_non_negative_int, default=0)
    ref.add_argument(
        "--min-refusal-rate",
        type=_fraction,
        default=MIN_REFUSAL_RATE,
        help="stop early unless the model refuses at least this fraction of the harmful validation prompts "
        f"(default {MIN_REFUSAL_RATE}; 0 skips the check)",
    )
    ref.add_argument(
        "--export",
        nargs="?",
        const="",
        default=None,
        metavar="DIR",
        help="also bake the direction's ablation into float32 weights and export them (default DIR: <out>/model)",
    )
    ref.add_argument("--export-format", choices=["safetensors", "gguf"], default="safetensors")
    ref.add_argument(
        "--tol",
        type=_non_negative_float,
        default=1e-2,
        help="largest allowed logit difference, baked vs hooked (export only)",
    )
    ref.set_defaults(func=_refusal)


def _probe_parser(sub) -> None:
    p = sub.add_parser("probe", help="cross-validated probe sweep over layers x positions; saves the best probe",
                       description="Collect activations of two prompt sets, cross-validate a logistic probe per layer and "
                                   "position, and write sweep.json, sweep.html (heatmaps), probe.safetensors (the best "
                                   "cell's probe) and direction.safetensors (its difference of class means).")  # fmt: skip
    _add_model_args(p)
    p.add_argument(
        "--harmful", default=None, help="positive class prompts: text (one per line) or JSONL ('prompt' field)"
    )
    p.add_argument(
        "--harmless", default=None, help="negative class prompts (default for both: the project's training split)"
    )
    p.add_argument(
        "--positions",
        nargs="+",
        type=_position,
        default=["t_inst", "last"],
        help="positions to sweep (default: t_inst last)",
    )
    p.add_argument("--layers", nargs="+", type=int, default=None, help="layers to sweep (default: all)")
    p.add_argument("--site", choices=SWEEP_SITES, default="resid_pre")
    p.add_argument("--folds", type=_int_at_least(2), default=5)
    p.add_argument("--C", type=_positive_float, default=1.0, help="inverse L2 strength of the logistic probes")
    p.add_argument("--metric", choices=["accuracy", "auc"], default="accuracy", help="what picks the best cell")
    p.add_argument("--limit", type=_positive_int, default=None, help="use at most this many prompts per class")
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--out", default="runs/probe", help="output directory")
    p.set_defaults(func=_probe)


def _guard_parser(sub) -> None:
    p = sub.add_parser("guard", help="score prompts with a latent-space guard and flag harmful ones",
                       description="Score prompts with a saved guard (--probe FILE: a probe from `steerlab probe` or a saved "
                                   "ProbeGuard/LatentGuard), or fit one on the project's training prompts (--fit, the default) "
                                   "and calibrate its threshold on the validation prompts.")  # fmt: skip
    _add_model_args(p)
    _add_prompt_args(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--probe", default=None, metavar="FILE", help="a saved Probe, ProbeGuard or LatentGuard (.safetensors)"
    )
    src.add_argument("--fit", action="store_true", help="fit a guard on the project's training prompts (the default)")
    p.add_argument(
        "--mode",
        choices=["latent", "probe"],
        default=None,
        help="LatentGuard (cosine rule) or ProbeGuard (default: probe)",
    )
    p.add_argument(
        "--threshold",
        type=_finite_float,
        default=None,
        help="flag when score >= this (default: the saved or calibrated one)",
    )
    p.add_argument("--position", type=_position, default="t_inst", help="where a fitted guard reads (default t_inst)")
    p.add_argument(
        "--layers",
        nargs="+",
        type=int,
        default=None,
        help="fitted guard layers (probe: one layer; default: best by CV / all)",
    )
    p.add_argument(
        "--n-train",
        type=_int_at_least(2),
        default=128,
        help="training prompts per class for --fit (at least 2: the probe guard picks its layer by cross-validation)",
    )
    # dest is not "save": nnsight (when imported) gives every object a .save method, which argparse then
    # mistakes for an already-set value and never fills in the default
    p.add_argument("--save", dest="save_to", default=None, metavar="FILE", help="save the fitted guard here")
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.set_defaults(func=_guard)


def _steer_parser(sub) -> None:
    p = sub.add_parser("steer", help="generate with a saved direction added or ablated; print before and after")
    _add_model_args(p, batch_size=8)
    _add_prompt_args(p)
    p.add_argument("--direction", required=True, help="a saved Direction (.safetensors)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--coeff", type=_finite_float, help="add coeff x the direction (AddVector)")
    how.add_argument("--ablate", action="store_true", help="project the direction out everywhere (Ablate)")
    p.add_argument(
        "--layer",
        type=int,
        default=None,
        help="AddVector: the layer to add at; Ablate: whose vector (default: the direction's)",
    )
    p.add_argument("--unit", action="store_true", help="AddVector: scale the vector to norm 1 first")
    p.add_argument("--max-new-tokens", type=_positive_int, default=48)
    p.set_defaults(func=_steer)


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="bake a direction into the weights, check parity with the hook, export",
                       description="Bake Ablate (--ablate) or AddVector (--coeff X [--layer L]) of a saved direction into a copy "
                                   "of the weights, compare its logits with the runtime hook on a few prompts, and export a "
                                   "directory plain transformers loads (safetensors or GGUF) with steerlab_manifest.json.")  # fmt: skip
    _add_model_args(p, dtype=True, batch_size=16)
    p.add_argument("--direction", required=True, help="a saved Direction (.safetensors)")
    p.add_argument("--out", required=True, help="export directory")
    p.add_argument("--format", choices=["safetensors", "gguf"], default="safetensors")
    p.add_argument("--precision", choices=["f32", "f16"], default="f32", help="GGUF tensor precision")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--ablate", action="store_true", help="bake the direction's ablation (Ablate)")
    how.add_argument("--coeff", type=_finite_float, help="bake coeff x the direction added at --layer (AddVector)")
    p.add_argument(
        "--layer", type=int, default=None, help="AddVector: the layer; Ablate: whose vector (default: the direction's)"
    )
    p.add_argument("--unit", action="store_true", help="AddVector: scale the vector to norm 1 first")
    p.add_argument(
        "--tol", type=_non_negative_float, default=1e-2, help="largest allowed logit difference, baked vs hooked"
    )
    p.set_defaults(func=_export)


PARSERS: tuple[Callable, ...] = (
    _demo_parser,
    _refusal_parser,
    _probe_parser,
    _guard_parser,
    _steer_parser,
    _export_parser,
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
    global _T0
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = ["steerlab", *argv]
    _T0 = time.perf_counter()
    try:
        return args.func(args)
    except ParityError as exc:  # not a usage problem: the weights did not match
        return _error(exc, 1)
    except SteerlabError as exc:
        return _error(exc, 2)
    except OSError as exc:  # a path the user gave cannot be read or written (permissions, full disk, ...)
        where = f" ({exc.filename})" if exc.filename else ""
        return _error(f"{exc.strerror or exc}{where}; check the paths you passed and their permissions", 2)


def _error(message: object, status: int) -> int:
    """Print one ``steerlab: error:`` line on stderr and return ``status``."""
    print(f"steerlab: error: {' '.join(str(message).split())}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
