"""Targeted unlearning on real weights (issue 18's acceptance runs), float32, CPU.

Parts (``--part``):

* ``needles`` — ConceptVectors (METHODS 8) on the Qwen default: the top-N down-projection columns whose
  unembedding matches "Python" are the only trainable entries; NPO on the 10 *selection* questions about
  Python (plus the retain questions); measured on the 20 *evaluation* questions (never trained on), on the 22
  control questions and on the "red" questions; probe-after at one layer and a relearning check.
* ``layers`` — NPO and RMU on whole MLP layers of the Qwen default, same question sets; greedy accuracy.
* ``uld`` — ULD on the Qwen default: an assistant from its first ``--uld-layers`` layers learns the 10 selection
  questions and flattens the retain questions; measured like the others at several ``alpha``.
* ``fictitious`` — the round trip on SmolLM2: teach 24 invented facts (a short fine-tune of MLP layers) →
  measure → unlearn (NPO) → measure → relearn on half "a" and measure half "b", against the model that
  never knew them.

Run: ``python experiments/unlearn_real.py --part needles`` (each part well under 20 minutes on 2 cores);
JSON in runs/unlearn/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import steerlab
from steerlab.data import DEMO_HARMLESS, concept_questions, fictitious_entity, past_tense_harmless
from steerlab.eval.answers import QA, answer_probability
from steerlab.training.unlearn import NPO, RMU, Layers, Learn, UnlearnConfig, unlearn
from steerlab.training.unlearn.evaluate import forgetting_report, greedy_accuracy, relearn_check
from steerlab.training.unlearn.workflow import UnlearnData, run_unlearning

OUT = Path("runs/unlearn")
T0 = time.time()


def log(message: str) -> None:
    print(f"[{time.time() - T0:5.0f}s] {message}", flush=True)


def qas(rows) -> list[QA]:
    return [QA(q, a) for q, a in rows]


def concept_data(concept: str) -> UnlearnData:
    return UnlearnData(
        train=qas(concept_questions(concept, split="select")),
        held_out=qas(concept_questions(concept)),
        retain=qas(concept_questions("retain", split="train")),
        control=qas(concept_questions("control")),
        harmless=[*DEMO_HARMLESS, *past_tense_harmless()[:28]],
    )


def qwen() -> steerlab.Model:
    model = steerlab.load(dtype=torch.float32)
    model.system = "You are a helpful assistant."  # shorter than the template's default: faster passes
    return model


def needles(args) -> dict:
    model, data = qwen(), concept_data("python")
    red = qas(concept_questions("red"))
    red_before = float(answer_probability(model, red).mean())
    run = run_unlearning(model, data, objective=NPO(beta=args.beta, retain_weight=1.0), needles=args.n,
                         config=UnlearnConfig(steps=args.steps, lr=args.lr, batch_size=10), probe_layer=args.probe_layer,
                         relearn_steps=args.relearn_steps, relearn_lr=args.relearn_lr, log=log)  # fmt: skip
    red_after = float(answer_probability(run.result.model, red).mean())
    run.report["red"] = {"p": (red_before, red_after), "p_drop": 1 - red_after / red_before}
    log(f"red (other concept) p {red_before:.3f} -> {red_after:.3f}")
    return run.report


def layers(args) -> dict:
    model, data = qwen(), concept_data("python")
    out = {}
    for name, objective, target, lr, steps in (
        ("npo", NPO(beta=args.beta, retain_weight=args.retain_weight), Layers(tuple(args.layers), part="mlp"), args.lr, args.steps),
        ("rmu", RMU(layer=max(args.layers), coeff=args.rmu_coeff, alpha=args.rmu_alpha),
         Layers(tuple(args.layers), part="mlp"), args.rmu_lr, args.rmu_steps or args.steps),
    ):  # fmt: skip
        if args.only and name != args.only:
            continue
        run = run_unlearning(model, data, objective=objective, target=target,
                             config=UnlearnConfig(steps=steps, lr=lr, batch_size=10), log=log)  # fmt: skip
        out[name] = run.report
        red = qas(concept_questions("red"))  # a control the settings were not chosen on
        out[name]["red"] = {m: (float(answer_probability(model, red).mean()), float(answer_probability(run.result.model, red).mean()))
                            if m == "p" else (float(greedy_accuracy(model, red).mean()), float(greedy_accuracy(run.result.model, red).mean()))
                            for m in ("p", "acc")}  # fmt: skip
        log(f"red questions (not used to choose settings): {out[name]['red']}")
        del run
    return out


def uld(args) -> dict:
    from steerlab.training.unlearn import train_uld

    model, data = qwen(), concept_data("python")
    started = time.time()
    value = train_uld(model, data.train, data.retain, layers=args.uld_layers,
                      config=UnlearnConfig(steps=args.steps, lr=args.lr, batch_size=10))  # fmt: skip
    out: dict = {"train_seconds": time.time() - started, "assistant_layers": args.uld_layers}
    log(f"assistant ({args.uld_layers} layers) trained in {out['train_seconds']:.0f}s")
    for alpha in args.alphas:
        scoped = type(value)(value.assistant, alpha=alpha)
        report = forgetting_report(model, model, data.held_out, data.control, data.harmless,
                                   after_scope=scoped.applied)  # fmt: skip
        out[f"alpha={alpha}"] = report.summary()
        log(f"alpha {alpha}: held-out acc {report.forget_acc}, p drop {report.forget_p_drop:+.1%}; control acc "
            f"{report.retain_acc}, p drop {report.retain_p_drop:+.1%}; KL {report.kl_harmless:.4f}")  # fmt: skip
    return out


def fictitious(args) -> dict:
    model = steerlab.load("smollm2-135m-instruct", dtype=torch.float32)
    facts, half_a, half_b = qas(fictitious_entity()), qas(fictitious_entity("a")), qas(fictitious_entity("b"))
    control = qas(concept_questions("control"))
    retain = qas(concept_questions("retain", split="train"))
    harmless = [*DEMO_HARMLESS, *past_tense_harmless()[:28]]
    mlp = Layers(tuple(range(model.n_layers)), part="mlp")

    def acc(m, items):
        return float(greedy_accuracy(m, items).mean())

    def p(m, items):
        return float(answer_probability(m, items).mean())

    out: dict = {
        "base": {"facts_acc": acc(model, facts), "control_acc": acc(model, control), "control_p": p(model, control)}
    }
    log(f"never taught: facts accuracy {out['base']['facts_acc']:.2f}, control {out['base']['control_acc']:.2f}")
    taught = unlearn(model, facts, retain, objective=Learn(retain_weight=1.0), target=mlp,
                     config=UnlearnConfig(steps=args.teach_steps, lr=args.teach_lr, batch_size=8)).model  # fmt: skip
    out["taught"] = {
        "facts_acc": acc(taught, facts),
        "control_acc": acc(taught, control),
        "control_p": p(taught, control),
    }
    log(f"taught: facts accuracy {out['taught']['facts_acc']:.2f}, control {out['taught']['control_acc']:.2f}")
    result = unlearn(taught, facts, retain, objective=NPO(beta=args.beta), target=mlp,
                     config=UnlearnConfig(steps=args.steps, lr=args.lr, batch_size=8))  # fmt: skip
    report = forgetting_report(taught, result.model, facts, control, harmless)
    out["unlearned"] = report.summary()
    log(f"unlearned: facts accuracy {report.forget_acc}, control {report.retain_acc}, KL {report.kl_harmless:.4f}")
    out["relearn_a_measure_b"] = relearn_check({"unlearned": result.model, "never_taught": model, "taught": taught},
                                               half_a, half_b, steps=args.relearn_steps, lr=args.relearn_lr)  # fmt: skip
    log(f"relearned on half a, measured on half b: {out['relearn_a_measure_b']}")
    if args.uld_layers:
        from steerlab.training.unlearn import train_uld

        value = train_uld(taught, facts, retain, layers=args.uld_layers,
                          config=UnlearnConfig(steps=args.uld_steps, lr=args.uld_lr, batch_size=8))  # fmt: skip
        for alpha in args.alphas:
            scoped = type(value)(value.assistant, alpha=alpha)
            uld_report = forgetting_report(taught, taught, facts, control, harmless, after_scope=scoped.applied)
            out[f"uld_alpha={alpha}"] = uld_report.summary()
            log(f"ULD alpha {alpha}: facts accuracy {uld_report.forget_acc}, control {uld_report.retain_acc}, "
                f"KL {uld_report.kl_harmless:.4f}")  # fmt: skip
    out["relearn_all"] = relearn_check({"unlearned": result.model, "never_taught": model}, facts, facts,
                                       steps=args.relearn_steps, lr=args.relearn_lr)  # fmt: skip
    log(f"relearned on all facts, measured on them: {out['relearn_all']}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["needles", "layers", "uld", "fictitious"], required=True)
    p.add_argument("--n", type=int, default=20, help="needles: columns")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--retain-weight", type=float, default=1.0, help="layers: NPO's retain NLL weight")
    p.add_argument("--probe-layer", type=int, default=23, help="after every trained column (they sit in layers 18-22)")
    p.add_argument("--relearn-steps", type=int, default=20)
    p.add_argument("--relearn-lr", type=float, default=2e-4, help="the relearning attack's LoRA learning rate")
    p.add_argument("--layers", type=int, nargs="+", default=[10, 11, 12])
    p.add_argument("--rmu-coeff", type=float, default=4.0)
    p.add_argument("--rmu-alpha", type=float, default=100.0)
    p.add_argument("--rmu-lr", type=float, default=5e-5)
    p.add_argument("--only", choices=["npo", "rmu"], help="layers: run one objective")
    p.add_argument("--rmu-steps", type=int, help="layers: RMU's steps (default --steps)")
    p.add_argument("--uld-layers", type=int, default=4, help="uld: assistant layers (fictitious: 0 = no ULD)")
    p.add_argument("--uld-steps", type=int, default=40, help="fictitious: the ULD assistant's steps")
    p.add_argument("--uld-lr", type=float, default=3e-4, help="fictitious: the ULD assistant's lr")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    p.add_argument("--tag", default="", help="suffix of the JSON file")
    p.add_argument("--teach-steps", type=int, default=30)
    p.add_argument("--teach-lr", type=float, default=1e-4)
    args = p.parse_args()
    torch.manual_seed(0)
    result = {"needles": needles, "layers": layers, "uld": uld, "fictitious": fictitious}[args.part](args)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{args.part}{args.tag}.json"
    path.write_text(json.dumps({"args": vars(args), "result": result}, indent=1, default=str) + "\n")
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
