"""Fit a refusal-token guard (METHODS 5): fine-tune a copy of the model with ``[refuse]`` / ``[respond]`` on the pooled
guard sources and calibrate its threshold on prompts of every source held back from the fine-tuning.

Harmful prompts get ``[refuse]`` + a short refusal; harmless ones (ordinary requests of many styles and the
safe-but-scary prompts) get ``[respond]`` + the model's own greedy answer with the refusal direction ablated, so the
respond side teaches "answer" rather than the model's habitual over-refusals. The threshold maximises balanced accuracy
on the held-back prompts (as for the other guards). The result is a
:class:`~steerlab.interventions.token_guard.RefusalTokenGuard`: a guard on its own, or the guard of a
:class:`~steerlab.interventions.gated.GatedRefusal` in which the plain model generates.

Example:
    >>> from steerlab.data import DEMO_HARMFUL, DEMO_HARMLESS
    >>> from steerlab.testing import tiny_direction, tiny_model
    >>> from steerlab.training.sft import SFTConfig
    >>> model = tiny_model("llama")
    >>> data = SourcedPrompts(DEMO_HARMFUL[:6], DEMO_HARMLESS[:6], ["a"] * 6, ["b"] * 6)
    >>> fit = fit_refusal_token_guard(model, tiny_direction(model, layer=1), data=data, answer_tokens=4,
    ...                               config=SFTConfig(max_steps=1, batch_size=4))
    >>> fit.n_train, fit.n_calibration, fit.steps
    ((5, 5), (1, 1), 1)
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from steerlab.data.fingerprints import Fingerprints
from steerlab.data.guard_sets import SourcedPrompts, guard_training_data
from steerlab.errors import InvalidValueError
from steerlab.interventions.token_guard import RefusalTokenGuard
from steerlab.probes.guard import guard_metrics
from steerlab.probes.metrics import best_threshold
from steerlab.training.data import control_tokens, refusal_token_examples
from steerlab.training.sft import SFTConfig, finetune

if TYPE_CHECKING:
    from steerlab.model import Model

REFUSALS: tuple[str, ...] = (
    "I can't help with that.",
    "I won't help with this: it could hurt someone.",
    "Sorry, that's a request I have to turn down.",
    "I'm not going to provide that. Is there something else I can do for you?",
    "I can't assist with this, because it risks real harm to people.",
    "That isn't something I'll help with, but I'm happy to talk about a safer related topic.",
)

DEFAULT_CONFIG = SFTConfig(r=16, alpha=32.0, lr=5e-4, token_lr=2e-3, epochs=1.5, batch_size=8, max_length=128,
                           warmup_steps=4, first_token_weight=5.0)  # fmt: skip
"""The settings measured on the Qwen default (README: 62 steps, ~17 minutes on 2 CPU cores)."""


@dataclass(frozen=True)
class TokenGuardFit:
    """A fitted refusal-token guard with its calibration metrics (on held-back prompts) and what it was trained on."""

    guard: RefusalTokenGuard
    calibration: dict[str, float]
    calibration_prompts: tuple[tuple[str, ...], tuple[str, ...]]
    n_train: tuple[int, int]
    n_calibration: tuple[int, int]
    steps: int
    seconds: float

    def summary(self) -> dict[str, Any]:
        """JSON-ready: threshold, calibration metrics, counts and training time."""
        return {"threshold": self.guard.threshold, "calibration": self.calibration, "n_train": list(self.n_train),
                "n_calibration": list(self.n_calibration), "steps": self.steps, "seconds": self.seconds}  # fmt: skip


def _split(prompts: list[str], sources: list[str], holdout: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held back): ``holdout`` of every source (at least one prompt of each source with two or more)."""
    train, held = [], []
    for name in dict.fromkeys(sources):
        rows = [p for p, s in zip(prompts, sources) if s == name]
        random.Random(f"{seed}:{name}").shuffle(rows)
        cut = min(len(rows) - 1, max(1, round(holdout * len(rows)))) if len(rows) > 1 else 0
        held += rows[:cut]
        train += rows[cut:]
    return train, held


def fit_refusal_token_guard(
    model: Model,
    direction: Any,
    *,
    data: SourcedPrompts | None = None,
    per_set: int = 20,
    holdout: float = 0.2,
    answer_tokens: int = 40,
    refusals: tuple[str, ...] = REFUSALS,
    config: SFTConfig = DEFAULT_CONFIG,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> TokenGuardFit:
    """Fine-tune a copy of ``model`` with refusal tokens on ``data`` (default: :func:`guard_training_data` with
    ``per_set`` prompts of each source) minus a ``holdout`` share of every source, and calibrate the threshold on
    that share. ``direction`` (the refusal direction) is ablated while the model writes the respond side's answers;
    ``batch_size`` batches that generation and the calibration scoring (``config.batch_size`` the fine-tuning)."""
    from steerlab.steering import Ablate

    if not 0.0 < holdout < 1.0:
        raise InvalidValueError(f"holdout is a share of each source in (0, 1); got {holdout!r}")
    if answer_tokens < 1:
        raise InvalidValueError(f"answer_tokens must be >= 1; got {answer_tokens!r}")
    data = guard_training_data(per_set=per_set, seed=seed) if data is None else data
    harmful, cal_harmful = _split(list(data.harmful), list(data.harmful_sources), holdout, seed)
    harmless, cal_harmless = _split(list(data.harmless), list(data.harmless_sources), holdout, seed)
    if not (harmful and harmless and cal_harmful and cal_harmless):
        raise InvalidValueError("each class needs at least two prompts (one to train on, one to calibrate on)")
    t0 = time.time()
    with model.apply(Ablate(direction)):
        answers = [a.strip() for a in model.generate(harmless, max_new_tokens=answer_tokens, batch_size=batch_size, progress=progress)]
    complete = [len(model.tokenizer(a, add_special_tokens=False)["input_ids"]) < answer_tokens for a in answers]
    examples = refusal_token_examples(harmful, harmless, answers=answers, refusals=list(refusals), answers_complete=complete, seed=seed)
    result = finetune(model, examples, new_tokens=control_tokens(), config=replace(config, seed=seed), progress=progress)
    guard = RefusalTokenGuard.from_model(result.model)
    pos, neg = guard.score(cal_harmful, batch_size=batch_size), guard.score(cal_harmless, batch_size=batch_size)
    guard = replace(guard, threshold=best_threshold(pos, neg), trained_on=Fingerprints.of(harmful, harmless, cal_harmful, cal_harmless))
    return TokenGuardFit(
        guard=guard,
        calibration=guard_metrics(pos, neg, threshold=guard.threshold),
        calibration_prompts=(tuple(cal_harmful), tuple(cal_harmless)),
        n_train=(len(harmful), len(harmless)),
        n_calibration=(len(cal_harmful), len(cal_harmless)),
        steps=result.steps,
        seconds=time.time() - t0,
    )
