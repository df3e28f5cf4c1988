"""Did unlearning unlearn? Forget quality, retain utility, and two honesty checks.

* :func:`answer_logprob` — teacher-forced log-probability of each example's whole reply (exact tokens; runs
  inside active scopes such as :meth:`~steerlab.training.unlearn.ULD.applied`).
* :func:`forgetting_report` — answer probability and greedy accuracy on forget and retain questions,
  and KL of the next-token distribution on harmless prompts, before vs after.
* :func:`probe_after` — a linear probe (logistic regression) trained on the model *before* unlearning
  to tell concept questions from other questions, applied to the model *after*; plus a probe refitted
  after. If the refitted probe still separates them, the concept is still linearly decodable.
* :func:`relearn_check` — a few steps of LoRA fine-tuning on part of the forget set, then accuracy on the
  rest, for the unlearned model and for a model that never knew the facts. Knowledge that was only hidden
  comes back faster than knowledge that was never there.

Example:
    >>> from steerlab.eval.answers import QA
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> qas = [QA("Who made Python?", ("Guido",))]
    >>> report = forgetting_report(model, model, qas, qas, ["Say hello."], max_new_tokens=2)
    >>> report.kl_harmless, report.forget_p_drop
    (0.0, 0.0)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from steerlab.errors import EmptyInputError
from steerlab.eval.answers import QA, answer_probability
from steerlab.eval.logits import kl_divergence, last_token_logprobs

if TYPE_CHECKING:
    from steerlab.model import Model


def greedy_accuracy(
    model: Model, items: Sequence[QA], *, max_new_tokens: int = 8, batch_size: int = 16
) -> torch.Tensor:
    """Per question, 1.0 when the greedy reply contains an accepted answer (case-insensitive), else 0.0.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> greedy_accuracy(tiny_model("llama"), [QA("Say 1.", ("1",))], max_new_tokens=2).shape
        torch.Size([1])
    """
    items = list(items)
    if not items:
        raise EmptyInputError("no questions given; pass a non-empty list of QA items")
    replies = model.generate([qa.question for qa in items], max_new_tokens=max_new_tokens, batch_size=batch_size)
    return torch.tensor([float(any(a.lower() in str(r).lower() for a in qa.answers)) for qa, r in zip(items, replies)])


@torch.no_grad()
def answer_logprob(model: Model, items: Sequence, *, batch_size: int = 16, max_length: int = 128) -> torch.Tensor:
    """Per example (``QA`` — first answer —, ``SFTExample`` or ``(prompt, reply)``), ``log p(reply | prompt)``
    summed over the reply's tokens as the chat template renders them (end-of-turn tokens included).

    Example:
        >>> from steerlab.testing import tiny_model
        >>> lp = answer_logprob(tiny_model("llama"), [QA("Who made Python?", ("Guido",))])
        >>> lp.shape, bool(lp[0] < 0)
        (torch.Size([1]), True)
    """
    from steerlab.training.data import encode_examples
    from steerlab.training.sft import _pad_id, collate
    from steerlab.training.unlearn.losses import sequence_logprob
    from steerlab.training.unlearn.trainer import as_examples

    examples = as_examples(list(items), "items")
    if not examples:
        raise EmptyInputError("no examples given; pass a non-empty list")
    rows = encode_examples(model.chat(), examples, max_length=max_length)
    out = []
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size], pad_id=_pad_id(model.tokenizer))
        logits = model.hf(input_ids=batch["input_ids"].to(model.device),
                          attention_mask=batch["attention_mask"].to(model.device), use_cache=False).logits  # fmt: skip
        out.append(sequence_logprob(logits.float().cpu(), batch["labels"]))
    return torch.cat(out)


@dataclass(frozen=True)
class ForgettingReport:
    """Forget / retain answer probability and greedy accuracy before and after, and harmless-prompt KL."""

    forget_p: tuple[float, float]
    retain_p: tuple[float, float]
    forget_acc: tuple[float, float]
    retain_acc: tuple[float, float]
    kl_harmless: float

    @property
    def forget_p_drop(self) -> float:
        """Relative drop of the mean forget-answer probability (``1 - after / before``)."""
        return 1.0 - self.forget_p[1] / self.forget_p[0] if self.forget_p[0] else 0.0

    @property
    def retain_p_drop(self) -> float:
        """Relative drop of the mean retain-answer probability."""
        return 1.0 - self.retain_p[1] / self.retain_p[0] if self.retain_p[0] else 0.0

    @property
    def forget_acc_drop(self) -> float:
        """Relative drop of forget accuracy (0 when it was 0 before)."""
        return 1.0 - self.forget_acc[1] / self.forget_acc[0] if self.forget_acc[0] else 0.0

    def summary(self) -> dict[str, Any]:
        """Plain numbers for a table or a manifest."""
        return {**asdict(self), "forget_p_drop": self.forget_p_drop, "retain_p_drop": self.retain_p_drop,
                "forget_acc_drop": self.forget_acc_drop}  # fmt: skip


def forgetting_report(
    before: Model,
    after: Model,
    forget: Sequence[QA],
    retain: Sequence[QA],
    harmless: Sequence[str],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 16,
    after_scope: Callable[[Model], AbstractContextManager] | None = None,
) -> ForgettingReport:
    """Answer probability and greedy accuracy on ``forget`` / ``retain`` for both models; mean KL(before || after)
    of the next-token distribution after each ``harmless`` prompt.

    ``after_scope`` measures ``after`` inside ``after_scope(after)`` — an inference-time unlearning such as
    ``ULD(...).applied`` (then ``before`` and ``after`` may be the same model).
    """
    if not harmless:
        raise EmptyInputError("no harmless prompts for the KL check")
    scope = after_scope if after_scope is not None else (lambda _model: nullcontext())

    def measured_after(fn):
        with scope(after):
            return fn(after)

    def both(fn) -> tuple[float, float]:
        return float(fn(before).mean()), float(measured_after(fn).mean())

    kw = {"batch_size": batch_size}
    kl = kl_divergence(last_token_logprobs(before, harmless, **kw),
                       measured_after(lambda m: last_token_logprobs(m, harmless, **kw)))  # fmt: skip
    return ForgettingReport(
        forget_p=both(lambda m: answer_probability(m, forget, **kw)),
        retain_p=both(lambda m: answer_probability(m, retain, **kw)),
        forget_acc=both(lambda m: greedy_accuracy(m, forget, max_new_tokens=max_new_tokens, **kw)),
        retain_acc=both(lambda m: greedy_accuracy(m, retain, max_new_tokens=max_new_tokens, **kw)),
        kl_harmless=float(kl.mean().clamp(min=0.0)),
    )


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels.numpy(), scores.numpy()))


def _features(model: Model, prompts: Sequence[str], layer: int, position: str) -> torch.Tensor:
    from steerlab.activations import collect

    acts = collect(model, list(prompts), layers=[layer], positions=[position], progress=False)
    x = acts["resid_pre", position][:, 0]
    return x.reshape(x.shape[0], -1).double()


def probe_after(
    before: Model,
    after: Model,
    concept: Sequence[str],
    other: Sequence[str],
    *,
    layer: int,
    position: str = "last",
    C: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """Is the concept still linearly decodable after unlearning? Prompts are split in halves (seeded): a
    logistic probe fitted on ``before``'s resid_pre at ``layer`` / ``position`` on one half is scored (AUC) on
    the other half of ``before`` and of ``after``; a probe refitted on ``after``'s first half is scored too.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> out = probe_after(model, model, ["Python?", "Pip?", "Guido?", "PyPI?"], ["Red?", "Blue?", "Paris?", "Bread?"], layer=1)
        >>> out["before"] == out["after"]
        True
    """
    from sklearn.linear_model import LogisticRegression

    concept, other = list(concept), list(other)
    if min(len(concept), len(other)) < 2:
        raise EmptyInputError("probe_after needs at least 2 concept and 2 other prompts (one of each per half)")
    prompts = concept + other
    labels = torch.tensor([1] * len(concept) + [0] * len(other))
    gen = torch.Generator().manual_seed(seed)
    train = torch.zeros(len(prompts), dtype=torch.bool)
    for cls in (1, 0):
        idx = (labels == cls).nonzero().flatten()
        train[idx[torch.randperm(len(idx), generator=gen)[: len(idx) // 2]]] = True
    x_before, x_after = _features(before, prompts, layer, position), _features(after, prompts, layer, position)

    def fit(x: torch.Tensor) -> Any:
        mu, sd = x[train].mean(0), x[train].std(0).clamp(min=1e-6)
        clf = LogisticRegression(C=C, max_iter=2000).fit(((x[train] - mu) / sd).numpy(), labels[train].numpy())
        return lambda z: torch.from_numpy(clf.decision_function(((z[~train] - mu) / sd).numpy()))

    probe = fit(x_before)
    return {
        "before": _auc(probe(x_before), labels[~train]),
        "after": _auc(probe(x_after), labels[~train]),
        "refit_after": _auc(fit(x_after)(x_after), labels[~train]),
    }


def relearn_check(
    models: dict[str, Model],
    train: Sequence[QA],
    test: Sequence[QA],
    *,
    steps: int = 20,
    lr: float = 2e-4,
    r: int = 8,
    batch_size: int = 8,
    seed: int = 0,
    max_new_tokens: int = 8,
) -> dict[str, dict[str, float]]:
    """Relearning attack: LoRA fine-tune each model for ``steps`` on ``train`` (question → first answer), then
    greedy accuracy and mean answer probability on the held-apart ``test`` questions, before and after.

    ``models`` names the models to compare, e.g. ``{"unlearned": u, "never_knew": base}``.
    """
    from steerlab.training.data import SFTExample
    from steerlab.training.sft import SFTConfig, finetune

    examples = [SFTExample(qa.question, qa.answers[0]) for qa in train]
    config = SFTConfig(r=r, alpha=2.0 * r, lr=lr, max_steps=steps, batch_size=batch_size, seed=seed)
    out = {}
    for name, model in models.items():
        tuned = finetune(model, examples, config=config, progress=False).model
        out[name] = {
            "acc_before": float(greedy_accuracy(model, test, max_new_tokens=max_new_tokens).mean()),
            "acc_after": float(greedy_accuracy(tuned, test, max_new_tokens=max_new_tokens).mean()),
            "p_before": float(answer_probability(model, test).mean()),
            "p_after": float(answer_probability(tuned, test).mean()),
        }
    return out
