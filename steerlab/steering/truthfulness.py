"""Truthfulness direction (METHODS 9): mean(true) - mean(false) statements at the last token, per layer.

* :func:`truthfulness_direction` — the unnormalised difference of class means of ``resid_pre`` at the
  statement's last token (raw text by default, ``chat=True`` renders it as a user turn), every layer.
* :func:`truthfulness_report` — how well the direction separates held-out statements, per layer: project on
  the unit direction, threshold fitted on the training projections (:func:`projection_accuracy`: the best
  balanced-accuracy cut; a midpoint of class means is thrown off by the few huge activations small models
  carry), test accuracy and test ROC AUC; alongside, a logistic probe per layer
  (:func:`steerlab.probes.fit_probes`) for reference.
* :func:`truth_judgement` / :func:`steering_effect` — ask the model whether a statement is true
  (:data:`JUDGE_TEMPLATE`) and read ``p("True") - p("False")`` at the answer's first token; steer with
  ``AddVector(direction, ±coeff)`` and report the shift, the accuracy and the paper's normalised effect
  (how far subtracting moves true statements toward the false baseline, and adding moves false ones
  toward the true baseline, as a fraction of the baseline gap).

Example:
    >>> from steerlab.data import load_statements
    >>> from steerlab.testing import tiny_model
    >>> model, split = tiny_model("llama"), load_statements(n_test=10)
    >>> report = truthfulness_report(model, split)
    >>> report.n_train, report.n_test, report.best_layer() in report.direction.layers
    (300, 20, True)
    >>> eff = steering_effect(model, report.direction, split.true_test, split.false_test, layers=[1])
    >>> sorted(eff.steered_true)  # the coefficients
    [-1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from steerlab.activations import collect
from steerlab.chat import Position
from steerlab.errors import EmptyInputError, ShapeError
from steerlab.eval.answers import answer_token_ids
from steerlab.eval.logits import last_token_logprobs
from steerlab.steering.direction import Direction
from steerlab.steering.fit import mean_difference, prompts_hash
from steerlab.steering.ops import AddVector

if TYPE_CHECKING:
    from steerlab.data import StatementSplit
    from steerlab.model import Model

JUDGE_TEMPLATE = "Is the following statement true or false? Answer with one word: True or False.\n\n{statement}"


def statement_activations(
    model: Model,
    statements: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    position: Position = "last",
    chat: bool = False,
    batch_size: int = 32,
    progress: bool = False,
) -> tuple[torch.Tensor, list[int]]:
    """``resid_pre`` at one position of each statement: ``([n, n_layers, d], layers)``.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> acts, layers = statement_activations(tiny_model("llama"), ["Paris is in France."])
        >>> acts.shape, layers
        (torch.Size([1, 3, 64]), [0, 1, 2])
    """
    if not statements:
        raise EmptyInputError("no statements given")
    acts = collect(model, list(statements), sites=["resid_pre"], layers=layers, positions=[position], chat=chat,
                   batch_size=batch_size, progress=progress)  # fmt: skip
    return acts.get("resid_pre", position)[:, :, -1], list(acts.layers)


def truthfulness_direction(
    model: Model,
    true: Sequence[str],
    false: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    position: Position = "last",
    chat: bool = False,
    batch_size: int = 32,
    progress: bool = False,
) -> Direction:
    """mean(true) - mean(false) of ``resid_pre`` at ``position`` (default the last token), per layer.

    ``info`` records ``n_layers`` (for depth alignment in :func:`~steerlab.steering.compare.compare_directions`).

    Example:
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> d = truthfulness_direction(model, ["Paris is in France."], ["Paris is in Spain."])
        >>> d.layers, d.info["n_layers"]
        ((0, 1, 2), 3)
    """
    kw = {"layers": layers, "position": position, "chat": chat, "batch_size": batch_size, "progress": progress}
    pos, layer_list = statement_activations(model, true, **kw)
    neg, _ = statement_activations(model, false, **kw)
    return _fit(model, pos, neg, layer_list, position, prompts_hash(true, false), chat)


def _fit(
    model: Model, pos: torch.Tensor, neg: torch.Tensor, layers: list[int], position, digest: str, chat: bool
) -> Direction:
    d = mean_difference(
        pos, neg, layers=layers, site="resid_pre", position=position, model=model.name, data_hash=digest
    )
    return replace(d, method="truthfulness_mean_diff", info={**d.info, "n_layers": model.n_layers, "chat": chat})


def projection_accuracy(direction: Direction, pos_tr, neg_tr, pos_te, neg_te) -> tuple[dict, dict, dict, dict]:
    """Per layer: threshold on the projection onto the unit direction fitted on train (the best balanced-accuracy
    cut, :func:`steerlab.probes.metrics.best_threshold`), its train and test accuracy, and the test ROC AUC of the
    projection (threshold-free). Activations are ``[n, n_layers, d]``; returns four ``{layer: value}`` dicts.
    A zero vector (layer 0 when every statement ends in the same token) scores 50% and AUC 0.5.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> t_tr, t_te = torch.randn(8, 2, 16) + 2, torch.randn(4, 2, 16) + 2  # true statements sit at +2
        >>> f_tr, f_te = torch.randn(8, 2, 16), torch.randn(4, 2, 16)
        >>> d = mean_difference(t_tr, f_tr, layers=[3, 4])
        >>> thr, acc_train, acc_test, auc = projection_accuracy(d, t_tr, f_tr, t_te, f_te)
        >>> acc_test, auc
        ({3: 1.0, 4: 1.0}, {3: 1.0, 4: 1.0})
    """
    from steerlab.probes.metrics import best_threshold, roc_auc

    vecs = direction.vectors
    unit = vecs / vecs.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    parts = {"pt": pos_tr, "nt": neg_tr, "pe": pos_te, "ne": neg_te}
    proj = {k: torch.einsum("nld,ld->nl", x.float(), unit) for k, x in parts.items()}
    labels = [1] * len(proj["pe"]) + [0] * len(proj["ne"])
    out: tuple[dict, dict, dict, dict] = ({}, {}, {}, {})
    for i, la in enumerate(direction.layers):
        t = best_threshold(proj["pt"][:, i], proj["nt"][:, i])

        def acc(p: torch.Tensor, n: torch.Tensor, i: int = i, t: float = t) -> float:
            return float(((p[:, i] >= t).sum() + (n[:, i] < t).sum()) / (len(p) + len(n)))

        out[0][la], out[1][la], out[2][la] = t, acc(proj["pt"], proj["nt"]), acc(proj["pe"], proj["ne"])
        out[3][la] = roc_auc(torch.cat([proj["pe"][:, i], proj["ne"][:, i]]), labels)
    return out


@dataclass(frozen=True)
class TruthReport:
    """A truthfulness direction and how well it classifies statements, per layer."""

    direction: Direction
    thresholds: dict[int, float]
    train_accuracy: dict[int, float]
    test_accuracy: dict[int, float]
    test_auc: dict[int, float] = field(default_factory=dict)
    probe_test_accuracy: dict[int, float] = field(default_factory=dict)
    n_train: int = 0
    n_test: int = 0

    def best_layer(self) -> int:
        """The layer with the highest held-out projection accuracy (the earliest on ties)."""
        return max(self.test_accuracy, key=lambda la: (self.test_accuracy[la], -la))

    def table(self) -> str:
        """Per-layer accuracies as text."""
        probe = bool(self.probe_test_accuracy)
        head = f"{'layer':>5} {'proj train':>10} {'proj test':>9} {'test AUC':>8}" + (
            f" {'probe test':>10}" if probe else ""
        )
        rows = [f"{self.direction.model}: {self.n_train} train / {self.n_test} test statements", head]
        for la in self.direction.layers:
            line = f"{la:>5} {self.train_accuracy[la]:>10.1%} {self.test_accuracy[la]:>9.1%} {self.test_auc[la]:>8.2f}"
            rows.append(line + (f" {self.probe_test_accuracy[la]:>10.1%}" if probe else ""))
        return "\n".join(rows)


def truthfulness_report(
    model: Model,
    split: StatementSplit,
    *,
    layers: Sequence[int] | None = None,
    position: Position = "last",
    chat: bool = False,
    probes: bool = True,
    batch_size: int = 32,
    progress: bool = False,
) -> TruthReport:
    """Fit the direction on ``split``'s training statements; accuracy per layer on its test statements.

    Example:
        >>> from steerlab.data import load_statements
        >>> from steerlab.testing import tiny_model
        >>> rep = truthfulness_report(tiny_model("llama"), load_statements(n_test=10))
        >>> rep.n_test, list(rep.test_accuracy), rep.best_layer() in rep.test_accuracy
        (20, [0, 1, 2], True)
    """
    kw = {"layers": layers, "position": position, "chat": chat, "batch_size": batch_size, "progress": progress}
    parts = [
        statement_activations(model, s, **kw)[0]
        for s in (split.true_train, split.false_train, split.true_test, split.false_test)
    ]
    layer_list = model.layer_indices(layers)
    direction = _fit(
        model, parts[0], parts[1], layer_list, position, prompts_hash(split.true_train, split.false_train), chat
    )
    thr, a_tr, a_te, auc = projection_accuracy(direction, *parts)
    probe_acc: dict[int, float] = {}
    if probes:
        from steerlab.probes import fit_probes

        x_tr, x_te = torch.cat(parts[:2]), torch.cat(parts[2:])
        y_tr = torch.tensor([1] * len(parts[0]) + [0] * len(parts[1]))
        y_te = torch.tensor([1] * len(parts[2]) + [0] * len(parts[3]))
        probe = fit_probes(x_tr, y_tr, layers=layer_list, position=position, labels=("false", "true"), model=model.name)
        probe_acc = {la: float(a) for la, a in zip(layer_list, probe.score(x_te, y_te))}
    return TruthReport(direction, thr, a_tr, a_te, auc, probe_acc, n_train=len(parts[0]) + len(parts[1]),
                       n_test=len(parts[2]) + len(parts[3]))  # fmt: skip


def truth_judgement(
    model: Model, statements: Sequence[str], *, template: str = JUDGE_TEMPLATE, chat: bool = True, batch_size: int = 16
) -> torch.Tensor:
    """``p("True") - p("False")`` ``[n]`` at the answer's first token (variants summed) when the model is asked
    ``template`` about each statement (through the chat template; ``chat=False``: as raw text, e.g. a few-shot
    ``"... This statement is:"`` prompt); measures active ``model.apply`` scopes.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> judged = truth_judgement(tiny_model("llama"), ["Paris is the capital of France."])
        >>> judged.shape, bool(-1 <= judged[0] <= 1)  # p(True) - p(False) per statement
        (torch.Size([1]), True)
    """
    if "{statement}" not in template:
        raise ShapeError("template must contain '{statement}' where the statement goes")
    prompts = [template.format(statement=s) for s in statements]
    lp = last_token_logprobs(model, prompts, batch_size=batch_size, chat=chat)
    t_ids = list(answer_token_ids(model.tokenizer, ["True"]))
    f_ids = list(answer_token_ids(model.tokenizer, ["False"]))
    return lp[:, t_ids].exp().sum(-1) - lp[:, f_ids].exp().sum(-1)


@dataclass(frozen=True)
class SteeringEffect:
    """``p(True) - p(False)`` on true and false statements, at baseline and per steering coefficient."""

    layers: tuple[int, ...]
    base_true: torch.Tensor
    base_false: torch.Tensor
    steered_true: dict[float, torch.Tensor]
    steered_false: dict[float, torch.Tensor]

    @staticmethod
    def _acc(pt: torch.Tensor, pf: torch.Tensor) -> float:
        return float(((pt > 0).float().sum() + (pf <= 0).float().sum()) / (len(pt) + len(pf)))

    @property
    def base_accuracy(self) -> float:
        """Judgement accuracy without steering (true if ``p(True) > p(False)``)."""
        return self._acc(self.base_true, self.base_false)

    def accuracy(self, coeff: float) -> float:
        """Judgement accuracy with ``coeff`` times the direction added."""
        return self._acc(self.steered_true[coeff], self.steered_false[coeff])

    def normalized_effect(self, coeff: float, *, min_gap: float = 0.05) -> float:
        """The paper's normalised effect of ``±|coeff|``: subtracting on true statements and adding on false ones,
        the mean shift of ``p(True) - p(False)`` toward the other class's baseline, over the baseline gap.
        ``nan`` when the baseline gap is below ``min_gap`` (a model that does not tell the classes apart)."""
        c = abs(coeff)
        if c not in self.steered_false or -c not in self.steered_true:
            raise ShapeError(f"normalized_effect needs coefficients +{c} and -{c}; have {sorted(self.steered_true)}")
        gap = float(self.base_true.mean() - self.base_false.mean())
        if gap < min_gap:
            return float("nan")
        down = float(self.base_true.mean() - self.steered_true[-c].mean())
        up = float(self.steered_false[c].mean() - self.base_false.mean())
        return (down + up) / (2 * gap)

    def swing(self, coeff: float) -> float:
        """How far ``±|coeff|`` pushes the judgement: mean ``p(True) - p(False)`` over all statements at ``+|coeff|``
        minus at ``-|coeff|`` (meaningful even when the model cannot tell the classes apart unsteered)."""
        c = abs(coeff)
        if c not in self.steered_true or -c not in self.steered_true:
            raise ShapeError(f"swing needs coefficients +{c} and -{c}; have {sorted(self.steered_true)}")
        plus = torch.cat([self.steered_true[c], self.steered_false[c]]).mean()
        minus = torch.cat([self.steered_true[-c], self.steered_false[-c]]).mean()
        return float(plus - minus)

    def table(self) -> str:
        """Mean ``p(True) - p(False)`` per class and the accuracy, at baseline and per coefficient."""
        rows = [
            f"steering at layers {list(self.layers)}",
            f"{'coeff':>7} {'true: pT-pF':>12} {'false: pT-pF':>13} {'accuracy':>9}",
        ]
        rows.append(
            f"{'base':>7} {float(self.base_true.mean()):>+12.3f} {float(self.base_false.mean()):>+13.3f} {self.base_accuracy:>9.1%}"
        )
        for c in sorted(self.steered_true):
            rows.append(f"{c:>+7.2f} {float(self.steered_true[c].mean()):>+12.3f} "
                        f"{float(self.steered_false[c].mean()):>+13.3f} {self.accuracy(c):>9.1%}")  # fmt: skip
        return "\n".join(rows)


def steering_effect(
    model: Model,
    direction: Direction,
    true: Sequence[str],
    false: Sequence[str],
    *,
    layers: Sequence[int],
    coeffs: Sequence[float] = (-1.0, 1.0),
    source_layer: int | None = None,
    template: str = JUDGE_TEMPLATE,
    chat: bool = True,
    batch_size: int = 16,
    baseline: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> SteeringEffect:
    """Add ``coeff * direction`` (each layer's own vector, or ``source_layer``'s) at ``layers`` on every token and
    measure :func:`truth_judgement` on ``true`` and ``false`` statements, per coefficient. ``baseline`` reuses
    already measured unsteered judgements ``(true, false)`` (e.g. from another ``SteeringEffect``).

    Example:
        >>> from steerlab.testing import tiny_model, tiny_direction
        >>> model = tiny_model("llama")
        >>> true, false = ["Paris is in France."], ["Paris is in Spain."]
        >>> eff = steering_effect(model, tiny_direction(model, layer=1), true, false, layers=[1], coeffs=(-2, 2))
        >>> eff.layers, sorted(eff.steered_true), isinstance(eff.normalized_effect(2), float)
        ((1,), [-2.0, 2.0], True)
    """
    kw = {"template": template, "chat": chat, "batch_size": batch_size}
    if baseline is None:
        baseline = (truth_judgement(model, true, **kw), truth_judgement(model, false, **kw))
    base_t, base_f = baseline
    st, sf = {}, {}
    for c in coeffs:
        with model.apply(AddVector(direction, coeff=float(c), layers=list(layers), source_layer=source_layer)):
            st[float(c)], sf[float(c)] = truth_judgement(model, true, **kw), truth_judgement(model, false, **kw)
    return SteeringEffect(tuple(model.layer_indices(list(layers))), base_t, base_f, st, sf)
