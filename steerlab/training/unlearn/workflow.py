"""One unlearning run end to end (what ``steerlab unlearn`` does): pick the target, train, measure, export.

:func:`run_uld` does the same for ULD (an assistant subtracted at inference; nothing merged).
:func:`run_unlearning` takes question sets (:class:`UnlearnData`), an objective and a target — or
``needles=N``: the top ``N`` ConceptVectors columns of the forget answers' words that write toward them on
the training questions (METHODS 8) — trains with
:func:`~steerlab.training.unlearn.unlearn`, measures forgetting on held-out forget questions and on control
questions, KL on harmless prompts, optionally the probe-after and relearning checks, and writes
``report.json`` (and the exported model, whose manifest carries objective, target and metrics).

Example:
    >>> import tempfile
    >>> from steerlab.testing import tiny_model
    >>> from steerlab.training.unlearn import GradDiff
    >>> data = UnlearnData(train=[QA("Write a poem.", "poem")], held_out=[QA("Recite a short poem.", "poem")],
    ...                    retain=[QA("Capital of France?", "Paris")], control=[QA("Capital of Italy?", "Rome")],
    ...                    harmless=["Say hello."])
    >>> run = run_unlearning(tiny_model("llama"), data, objective=GradDiff(), needles=4,
    ...                      config=UnlearnConfig(steps=2), out=tempfile.mkdtemp(), max_new_tokens=2)
    >>> sorted(run.report)[:3], len(run.result.target.columns)
    (['command', 'config', 'control'], 4)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steerlab.errors import EmptyInputError, InvalidValueError
from steerlab.eval.answers import QA, answer_probability
from steerlab.training.manifest import describe
from steerlab.training.unlearn.evaluate import forgetting_report, greedy_accuracy, probe_after, relearn_check
from steerlab.training.unlearn.objectives import Objective
from steerlab.training.unlearn.targets import Columns, Target
from steerlab.training.unlearn.trainer import UnlearnConfig, UnlearnResult, record_metrics, unlearn
from steerlab.training.unlearn.uld import ULD, train_uld

if TYPE_CHECKING:
    from steerlab.model import Model


@dataclass(frozen=True)
class UnlearnData:
    """Question sets of one run: ``train`` (forget, trained on), ``held_out`` (forget, measured only),
    ``retain`` (kept, trained on by objectives with a retain term), ``control`` (kept, measured only) and
    ``harmless`` prompts for the KL check."""

    train: Sequence[QA]
    held_out: Sequence[QA]
    retain: Sequence[QA]
    control: Sequence[QA]
    harmless: Sequence[str]

    def __post_init__(self) -> None:
        empty = [name for name in ("train", "held_out", "control", "harmless") if not getattr(self, name)]
        if empty:
            raise EmptyInputError(f"UnlearnData needs non-empty {', '.join(empty)}")
        overlap = {q.question for q in self.train} & {q.question for q in self.held_out}
        if overlap:
            raise InvalidValueError(
                f"{len(overlap)} held-out forget questions are also training questions (e.g. {min(overlap)!r}); "
                "measure forgetting on questions the method was not trained on"
            )


@dataclass(frozen=True)
class UnlearnRun:
    """The trained result and the report written to ``report.json``."""

    result: UnlearnResult
    report: dict[str, Any]
    out: Path | None = None
    info: dict[str, Any] = field(default_factory=dict, compare=False)


def concept_words(items: Sequence[QA]) -> list[str]:
    """The distinct first answers of the forget questions: the words a concept-vector search looks for."""
    return list(dict.fromkeys(qa.answers[0] for qa in items))


def run_unlearning(
    model: Model,
    data: UnlearnData,
    *,
    objective: Objective,
    target: Target | None = None,
    needles: int | None = None,
    config: UnlearnConfig | None = None,
    probe_layer: int | None = None,
    relearn_steps: int = 0,
    relearn_lr: float = 2e-4,
    max_new_tokens: int = 8,
    out: str | Path | None = None,
    command: Sequence[str] = (),
    log: Callable[[str], None] = lambda message: None,
) -> UnlearnRun:
    """Unlearn ``data.train`` from ``model`` (``target``, or the top ``needles`` concept columns) and measure it."""
    from steerlab.steering import find_concept_vectors

    if (target is None) == (needles is None):
        raise InvalidValueError(
            "pass exactly one of target=... (a parameter mask) or needles=N (top-N concept columns)"
        )
    config = config or UnlearnConfig()
    started = time.perf_counter()
    if needles is not None:
        words = concept_words(data.train)
        # METHODS 8's vocabulary reading, kept to the columns that write *toward* the concept on the training
        # questions (the in-context sign filter; without it the top hits include columns that suppress it)
        search = find_concept_vectors(model, words, top_k=20).in_context(model, [q.question for q in data.train], n=200)
        if len(search) < needles:
            raise EmptyInputError(
                f"the concept search for {words} kept {len(search)} columns that write toward it, fewer than "
                f"needles={needles}; pass a smaller count"
            )
        target = Columns(tuple(search.columns(needles)))
        log(f"needles: top {needles} concept columns of {words} (in-context sign): {list(target.columns)[:5]}...")
    result = unlearn(model, data.train, data.retain, objective=objective, target=target, config=config)
    log(f"trained {result.trained_parameters} parameters for {config.steps} steps in {result.seconds:.0f}s")
    report: dict[str, Any] = {
        "command": list(command),
        "model": model.name,
        "objective": describe(objective),
        "target": describe(result.target),
        "trained_parameters": result.trained_parameters,
        "config": describe(config),
        **_measure(model, result.model, data, max_new_tokens=max_new_tokens, log=log),
        "routing_share": result.routing_share,
        "losses": {"first": result.losses[0], "last": result.losses[-1]},
    }
    if probe_layer is not None:
        report["probe_after"] = probe_after(model, result.model, [q.question for q in data.held_out],
                                            [q.question for q in data.control], layer=probe_layer)  # fmt: skip
        log(f"probe at layer {probe_layer} (AUC): {report['probe_after']}")
    if relearn_steps:
        report["relearn"] = relearn_check({"unlearned": result.model, "original": model}, data.train, data.held_out,
                                          steps=relearn_steps, lr=relearn_lr, max_new_tokens=max_new_tokens)  # fmt: skip
        log(f"relearning {relearn_steps} steps on the training questions, held-out accuracy: {report['relearn']}")
    report["seconds"] = time.perf_counter() - started
    result.add_metrics(
        {k: report[k] for k in ("forget_held_out", "control", "kl_harmless", "probe_after", "relearn") if k in report}
    )
    return UnlearnRun(result, report, _write(report, out))


def run_uld(
    model: Model,
    data: UnlearnData,
    *,
    layers: int = 4,
    alpha: float = 1.0,
    config: UnlearnConfig | None = None,
    max_new_tokens: int = 8,
    out: str | Path | None = None,
    command: Sequence[str] = (),
    log: Callable[[str], None] = lambda message: None,
) -> ULDRun:
    """ULD on ``data``: an assistant from ``model``'s first ``layers`` layers trained on the reversed objectives,
    measured like :func:`run_unlearning` with ``logits - alpha · assistant logits``. The probe-after and
    relearning checks do not apply (the target's weights and residual stream are unchanged).

    Example:
        >>> from steerlab.testing import tiny_model
        >>> data = UnlearnData(train=[QA("Write a poem.", "poem")], held_out=[QA("Recite a short poem.", "poem")],
        ...                    retain=[QA("Capital of France?", "Paris")], control=[QA("Capital of Italy?", "Rome")],
        ...                    harmless=["Say hello."])
        >>> run = run_uld(tiny_model("llama"), data, layers=1, config=UnlearnConfig(steps=2), max_new_tokens=2)
        >>> run.report["objective"]["type"], run.uld.assistant.n_layers
        ('ULD', 1)
    """
    config = config or UnlearnConfig()
    started = time.perf_counter()
    uld = train_uld(model, data.train, data.retain, layers=layers, alpha=alpha, config=config)
    log(f"trained a {layers}-layer ULD assistant for {config.steps} steps in {time.perf_counter() - started:.0f}s")
    report: dict[str, Any] = {
        "command": list(command),
        "model": model.name,
        "objective": {"type": "ULD", "assistant_layers": layers, "alpha": alpha, "assistant_objective": "Reversed"},
        "config": describe(config),
        **_measure(model, model, data, max_new_tokens=max_new_tokens, log=log, after_scope=uld.applied),
        "seconds": time.perf_counter() - started,
    }
    record_metrics(uld.assistant, {k: report[k] for k in ("forget_held_out", "control", "kl_harmless")})
    return ULDRun(uld, report, _write(report, out))


@dataclass(frozen=True)
class ULDRun:
    """The trained :class:`~steerlab.training.unlearn.ULD` value and its report."""

    uld: ULD
    report: dict[str, Any]
    out: Path | None = None


def _measure(
    model: Model,
    after: Model,
    data: UnlearnData,
    *,
    max_new_tokens: int,
    log: Callable[[str], None],
    after_scope: Callable[[Model], AbstractContextManager] | None = None,
) -> dict[str, Any]:
    """Held-out forget, trained forget, control and KL numbers of ``after`` (inside ``after_scope``) vs ``model``."""
    held = forgetting_report(model, after, data.held_out, data.control, data.harmless, max_new_tokens=max_new_tokens,
                             after_scope=after_scope)  # fmt: skip
    scope = after_scope or (lambda _model: nullcontext())

    def on_train(fn) -> tuple[float, float]:
        with scope(after):
            measured_after = float(fn(after).mean())
        return float(fn(model).mean()), measured_after

    log(f"held-out forget p {held.forget_p[0]:.3f} -> {held.forget_p[1]:.3f} ({held.forget_p_drop:+.1%} drop), "
        f"control p {held.retain_p[0]:.3f} -> {held.retain_p[1]:.3f} ({held.retain_p_drop:+.1%}), KL {held.kl_harmless:.4f}")  # fmt: skip
    summary = held.summary()
    return {
        "forget_held_out": {k: summary[k] for k in ("forget_p", "forget_acc", "forget_p_drop", "forget_acc_drop")},
        "forget_trained": {
            "forget_p": on_train(lambda m: answer_probability(m, data.train)),
            "forget_acc": on_train(lambda m: greedy_accuracy(m, data.train, max_new_tokens=max_new_tokens)),
        },
        "control": {k.replace("retain", "control"): v for k, v in summary.items() if k.startswith("retain")},
        "kl_harmless": held.kl_harmless,
    }


def _write(report: dict[str, Any], out: str | Path | None) -> Path | None:
    if out is None:
        return None
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return path
