"""``steerlab unlearn``: targeted unlearning of a question set, measured on held-out questions, optionally exported."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from steerlab.cli import inputs
from steerlab.cli.args import (
    UsageError,
    add_model_args,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)

TARGET_HELP = (
    "what may change: needles:N (top-N concept columns of the forget answers, METHODS 8), layers:1,2[:mlp|attn], "
    "heads:L.H,L.H (o_proj columns), expert:L.E or expert:auto (one routed expert + router anchor, UOE)"
)


def _pairs(text: str, what: str) -> tuple[tuple[int, int], ...]:
    try:
        return tuple((int(a), int(b)) for a, b in (item.split(".") for item in text.split(",")))
    except ValueError:
        raise UsageError(f"{what} must be LAYER.INDEX pairs separated by commas (e.g. 3.1,5.0), got {text!r}") from None


def _target(spec: str, model, forget_prompts: list[str]):
    """The target value (or the needle count) named by ``--target``."""
    from steerlab.training.unlearn import Expert, Heads, Layers

    kind, _, rest = spec.partition(":")
    if kind == "needles":
        if not rest.isdigit() or int(rest) < 1:
            raise UsageError(f"--target needles:N needs a positive count N, got {spec!r}")
        return None, int(rest)
    if kind == "layers":
        layers, _, part = rest.partition(":")
        try:
            return Layers(tuple(int(x) for x in layers.split(",")), part=part or "all"), None
        except ValueError:
            raise UsageError(f"--target layers:1,2[:mlp|attn] needs integer layers, got {spec!r}") from None
    if kind == "heads":
        return Heads(_pairs(rest, "--target heads:")), None
    if kind == "expert" and rest == "auto":
        from steerlab.measure import expert_attribution

        layer, expert = expert_attribution(model, forget_prompts).top(1)[0]
        inputs.log(f"expert:auto -> layer {layer}, expert {expert} (highest mean router probability on the forget set)")
        return Expert(layer, expert), None
    if kind == "expert":
        pairs = _pairs(rest, "--target expert:")
        if len(pairs) != 1:
            raise UsageError(f"--target expert:L.E names one expert (UOE unlearns one), got {spec!r}")
        return Expert(*pairs[0]), None
    raise UsageError(f"unknown --target {spec!r}; {TARGET_HELP}")


def _objective(args: argparse.Namespace):
    from steerlab.training.unlearn import NPO, RMU, GradDiff, GradientAscent

    if args.objective == "rmu":
        if args.rmu_layer is None:
            raise UsageError("--objective rmu needs --rmu-layer L (the layer whose activations are misdirected)")
        return RMU(layer=args.rmu_layer, coeff=args.rmu_coeff, alpha=args.rmu_alpha)
    return {"npo": lambda: NPO(beta=args.beta, retain_weight=args.retain_weight),
            "graddiff": lambda: GradDiff(retain_weight=args.retain_weight),
            "ga": GradientAscent}[args.objective]()  # fmt: skip


def _read_questions(path: Path):
    from steerlab.eval.answers import QA

    def parse(p: Path):
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        return [(QA(r["question"], tuple(r["answers"])), r.get("split")) for r in rows]

    return inputs.read_saved(path, "forget questions (JSONL: question, answers, split train|eval)", parse)


def _data(args: argparse.Namespace):
    from steerlab.data import DEMO_HARMLESS, concept_questions, past_tense_harmless
    from steerlab.eval.answers import QA
    from steerlab.training.unlearn.workflow import UnlearnData

    def qas(rows):
        return [QA(q, a) for q, a in rows]

    if args.forget:
        rows = _read_questions(inputs.existing_file(args.forget, "--forget"))
        train = [qa for qa, split in rows if split == "train"]
        held = [qa for qa, split in rows if split == "eval"]
        if not train or not held:
            raise UsageError(f"{args.forget} needs rows with \"split\": \"train\" and rows with \"split\": \"eval\" "
                             "(held-out questions measure forgetting)")  # fmt: skip
    else:
        train, held = qas(concept_questions(args.concept, split="select")), qas(concept_questions(args.concept))
    return UnlearnData(
        train=train,
        held_out=held,
        retain=qas(concept_questions("retain", split="train")),
        control=qas(concept_questions("control")),
        harmless=[*DEMO_HARMLESS, *past_tense_harmless()[:28]],
    )


def _unlearn(args: argparse.Namespace) -> int:
    from steerlab.training.export import export
    from steerlab.training.unlearn import UnlearnConfig
    from steerlab.training.unlearn.workflow import run_unlearning

    t0 = time.perf_counter()
    if args.objective == "uld":
        _check_uld_args(args)
    out = inputs.output_dir(args.out)
    data = _data(args)
    config = UnlearnConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, anchor_weight=args.anchor_weight,
                           seed=args.seed)  # fmt: skip
    if args.objective == "uld":
        return _uld(args, data, config, out, t0)
    objective = _objective(args)
    model = inputs.load(args)
    target, needles = _target(args.target or "needles:20", model, [q.question for q in data.train])
    run = run_unlearning(model, data, objective=objective, target=target, needles=needles, config=config,
                         probe_layer=args.probe_layer, relearn_steps=args.relearn_steps, relearn_lr=args.relearn_lr,
                         max_new_tokens=args.max_new_tokens, out=out, command=args.argv,
                         log=lambda m: print(f"[{time.perf_counter() - t0:6.0f}s] {m}"))  # fmt: skip
    print(f"wrote {out / 'report.json'}")
    if args.export is not None:
        path = export(run.result.model, Path(args.export) if args.export else out / "model", format=args.export_format,
                      manifest={"command": " ".join(args.argv)})  # fmt: skip
        print(f"wrote {path} ({args.export_format}; steerlab_manifest.json records objective, target and metrics)")
    return 0


def _check_uld_args(args: argparse.Namespace) -> None:
    """ULD trains a separate assistant and changes no weight of the model: refuse options that assume otherwise."""
    wrong = [flag for flag, given in (("--target", args.target is not None), ("--probe-layer", args.probe_layer is not None),
                                      ("--relearn-steps", bool(args.relearn_steps)),
                                      ("--export-format gguf", args.export_format == "gguf")) if given]  # fmt: skip
    if wrong:
        raise UsageError(f"--objective uld does not take {', '.join(wrong)}: it trains an assistant of the first "
                         "--uld-layers layers and subtracts its logits at inference (the model's weights do not change; "
                         "--export writes the assistant as safetensors)")  # fmt: skip


def _uld(args: argparse.Namespace, data, config, out: Path, t0: float) -> int:
    from steerlab.training.unlearn.workflow import run_uld

    model = inputs.load(args)
    if not 1 <= args.uld_layers <= model.n_layers:
        raise UsageError(f"--uld-layers must be in 1..{model.n_layers} ({model.name}'s layers), got {args.uld_layers}")
    run = run_uld(model, data, layers=args.uld_layers, alpha=args.uld_alpha, config=config,
                  max_new_tokens=args.max_new_tokens, out=out, command=args.argv,
                  log=lambda m: print(f"[{time.perf_counter() - t0:6.0f}s] {m}"))  # fmt: skip
    print(f"wrote {out / 'report.json'}")
    if args.export is not None:
        path = run.uld.save(Path(args.export) if args.export else out / "uld-assistant")
        print(f"wrote {path} (the ULD assistant; load with ULD.load(path) and apply with uld.applied(model))")
    return 0


def add_parser(sub) -> None:
    """The ``unlearn`` subcommand."""
    p = sub.add_parser("unlearn", help="unlearn a question set by training only an interpretable target")
    add_model_args(p, batch_size=8)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--concept", choices=["python", "red"], default="python",
                      help="built-in question set: its 10 selection questions are trained on, its 20 evaluation "
                      "questions measure forgetting (default python)")  # fmt: skip
    what.add_argument("--forget", default=None, help="JSONL of question, answers, split (train|eval)")
    p.add_argument("--objective", choices=["npo", "graddiff", "ga", "rmu", "uld"], default="npo",
                   help="uld: train an assistant on the reversed objectives and subtract its logits (no weight edit)")
    p.add_argument("--target", default=None, help=TARGET_HELP + " (default needles:20; not with uld)")
    p.add_argument("--uld-layers", type=positive_int, default=4, help="uld: the assistant's layers (the model's first N)")
    p.add_argument("--uld-alpha", type=positive_float, default=1.0, help="uld: weight of the subtracted logits")
    p.add_argument("--steps", type=positive_int, default=40)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--beta", type=positive_float, default=0.1, help="NPO temperature")
    p.add_argument("--retain-weight", type=non_negative_float, default=1.0, help="retain NLL weight (npo, graddiff)")
    p.add_argument("--rmu-layer", type=int, default=None)
    p.add_argument("--rmu-coeff", type=positive_float, default=4.0, help="control norm / mean activation norm")
    p.add_argument("--rmu-alpha", type=non_negative_float, default=100.0)
    p.add_argument("--anchor-weight", type=non_negative_float, default=1.0, help="UOE router anchor (expert targets)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--probe-layer", type=int, default=None, help="also run the probe-after check at this layer")
    p.add_argument("--relearn-steps", type=non_negative_int, default=0, help="also run the relearning check")
    p.add_argument("--relearn-lr", type=positive_float, default=2e-4, help="the relearning attack's LoRA learning rate")
    p.add_argument("--max-new-tokens", type=positive_int, default=8, help="greedy answer length for accuracy")
    p.add_argument("--out", default="runs/unlearn", help="output directory (report.json)")
    p.add_argument("--export", nargs="?", const="", default=None, metavar="DIR",
                   help="also export the unlearned model (default DIR: <out>/model)")  # fmt: skip
    p.add_argument("--export-format", choices=["safetensors", "gguf"], default="safetensors")
    p.set_defaults(func=_unlearn)
