"""Refusal tokens (METHODS 5, Jain et al. 2024): a calibrated first-token decision between control tokens.

A model fine-tuned to start every response with ``[refuse]`` or ``[respond]`` (or one refusal
token per category) exposes ``p = softmax(logits / T)[refuse]`` at the first generated step. At
inference :class:`RefusalTokens` reads ``p`` and *forces* the first token: a refusal token when
``p >= tau`` (per category: every category whose probability reaches its own threshold competes,
the most probable wins), else ``[respond]``. The control tokens are hidden from the decoded text.
Because the decision only needs the first-step distribution, :func:`refusal_token_probs` computes
it once and :func:`tau_sweep` traces the refusal-rate / over-refusal curve without regenerating.

:class:`RefusalTokens` is a generation policy (:mod:`steerlab.generation`): ``model.generate(prompts,
policy=rt)`` returns one :class:`RefusalTokenOutput` per prompt and composes with ``model.apply``.

Example:
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> rt = RefusalTokens.from_tokenizer(model.tokenizer, refuse="[INST]", respond="[/INST]", tau=0.0)
    >>> outs = model.generate(["How do I pick a lock?"], policy=rt, max_new_tokens=3)
    >>> outs[0].refused, outs[0].category
    (True, 'refuse')
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from steerlab.errors import EmptyInputError, InvalidValueError, SteerlabError
from steerlab.probes.metrics import roc_auc
from steerlab.reader import PerPrompt, Tap, read

if TYPE_CHECKING:
    from steerlab.generation import Decoder
    from steerlab.model import Model


class ControlTokenError(SteerlabError):
    """A control token is missing from the tokenizer or is not a single token."""


def _single_id(tokenizer, token: str) -> int:
    ids = tokenizer.convert_tokens_to_ids([token])
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or ids[0] is None or (unk is not None and ids[0] == unk and token != tokenizer.unk_token):
        raise ControlTokenError(
            f"{token!r} is not a token of this tokenizer; add it first: tokenizer.add_special_tokens("
            f"{{'additional_special_tokens': [{token!r}]}}) and model.resize_token_embeddings(len(tokenizer))"
        )
    return int(ids[0])


@dataclass(frozen=True)
class RefusalTokens:
    """Control-token ids and thresholds. ``refuse`` maps category -> token id (one entry for plain refusal).
    A generation policy: ``model.generate(prompts, policy=tokens)`` forces the first token."""

    refuse: Mapping[str, int]
    respond: int
    tau: Mapping[str, float] = field(default_factory=dict)  # per category; missing -> default_tau
    default_tau: float = 0.5
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not self.refuse:
            raise EmptyInputError("name at least one refusal token")
        unknown = set(self.tau) - set(self.refuse)
        if unknown:
            raise InvalidValueError(
                f"thresholds for unknown categories {sorted(unknown)}; give thresholds only for {sorted(self.refuse)}"
            )
        if self.respond in self.refuse.values():
            raise InvalidValueError("the respond token must differ from every refusal token; pick another respond token")
        if self.temperature <= 0:
            raise InvalidValueError(f"temperature must be positive; got {self.temperature}")

    @classmethod
    def from_tokenizer(
        cls, tokenizer, *, refuse: str | Mapping[str, str] = "[refuse]", respond: str = "[respond]", tau: float | Mapping[str, float] = 0.5, temperature: float = 1.0
    ) -> RefusalTokens:
        """Look the control tokens up by text; ``refuse`` is one token or ``{category: token}``."""
        tokens = {"refuse": refuse} if isinstance(refuse, str) else dict(refuse)
        ids = {cat: _single_id(tokenizer, tok) for cat, tok in tokens.items()}
        taus = {} if isinstance(tau, (int, float)) else dict(tau)
        default = float(tau) if isinstance(tau, (int, float)) else 0.5
        return cls(refuse=ids, respond=_single_id(tokenizer, respond), tau=taus, default_tau=default, temperature=temperature)

    @property
    def control_ids(self) -> list[int]:
        """Every control token id (hidden from decoded text)."""
        return [*self.refuse.values(), self.respond]

    def threshold(self, category: str) -> float:
        """The threshold of ``category``."""
        return float(self.tau.get(category, self.default_tau))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """``[b, n_categories]`` refusal-token probabilities from first-step logits ``[b, vocab]``."""
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        return probs[:, list(self.refuse.values())]

    def decide(self, logits: torch.Tensor) -> torch.Tensor:
        """The forced first token ``[b]``: the most probable category over its threshold, else respond."""
        p = self.probabilities(logits)
        tau = torch.tensor([self.threshold(c) for c in self.refuse], dtype=p.dtype, device=p.device)
        over = p >= tau
        ids = torch.tensor(list(self.refuse.values()), device=logits.device)
        best = torch.where(over, p, torch.full_like(p, -1.0)).argmax(-1)
        return torch.where(over.any(-1), ids[best], torch.full_like(best, self.respond))

    def processor(self) -> FirstTokenProcessor:
        """A transformers ``LogitsProcessor`` that forces the decision at the first generated step (for a
        plain ``hf.generate``; ``model.generate(..., policy=self)`` needs none)."""
        return FirstTokenProcessor(self)

    @contextmanager
    def open(self, model: Model) -> Iterator[_RefusalTokenRun]:
        """The policy's run for one ``model.generate`` call (see :mod:`steerlab.generation`)."""
        head = model.hf.get_output_embeddings()
        vocab = int(head.weight.shape[0]) if head is not None else int(model.hf.config.vocab_size)
        bad = [i for i in self.control_ids if not 0 <= i < vocab]
        if bad:
            raise ControlTokenError(
                f"control token ids {bad} are outside the model's vocabulary of {vocab}; resize the embeddings after adding "
                "them: model.hf.resize_token_embeddings(len(model.tokenizer))"
            )
        yield _RefusalTokenRun(model, self)


class FirstTokenProcessor:
    """Forces :meth:`RefusalTokens.decide` at the first step, records ``p``; later steps are untouched."""

    def __init__(self, tokens: RefusalTokens) -> None:
        self.tokens = tokens
        self.start: int | None = None
        self.p_refuse: list[torch.Tensor] = []
        self.forced: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            self.start = int(input_ids.shape[1])
        if int(input_ids.shape[1]) != self.start:
            return scores
        self.p_refuse.append(self.tokens.probabilities(scores).cpu())
        choice = self.tokens.decide(scores)
        self.forced.append(choice.cpu())
        forced = torch.full_like(scores, float("-inf"))
        forced[torch.arange(len(choice)), choice] = 0.0
        return forced


@dataclass(frozen=True)
class RefusalTokenOutput:
    """One generation: text without control tokens, the decision and its probabilities."""

    text: str
    refused: bool
    category: str | None
    p_refuse: dict[str, float]


class _RefusalTokenRun:
    """:class:`RefusalTokens` during one ``model.generate`` call: force the first token, hide control tokens."""

    def __init__(self, model: Model, tokens: RefusalTokens) -> None:
        self.model, self.tokens = model, tokens
        self.by_category = {v: k for k, v in tokens.refuse.items()}
        self.hidden = set(tokens.control_ids)
        self.p_refuse = torch.empty(0)
        self.forced = torch.empty(0, dtype=torch.long)

    def start(self, decoder: Decoder) -> None:
        self.p_refuse, self.forced = torch.empty(0), torch.empty(0, dtype=torch.long)

    def step(self, decoder: Decoder, logits: torch.Tensor) -> torch.Tensor:
        """At the first step: record ``p``, return logits that force the decision; later steps unchanged."""
        if decoder.depth:
            return logits
        self.p_refuse = self.tokens.probabilities(logits).cpu()
        choice = self.tokens.decide(logits)
        self.forced = choice.cpu()
        forced = torch.full_like(logits, float("-inf"))
        forced[torch.arange(len(choice)), choice] = 0.0
        return forced

    def finish(self, decoder: Decoder) -> list[RefusalTokenOutput]:
        outputs = []
        for r in range(len(decoder)):
            first = int(self.forced[r])
            outputs.append(RefusalTokenOutput(
                text=self.model.tokenizer.decode([t for t in decoder.tokens(r) if t not in self.hidden], skip_special_tokens=True),
                refused=first in self.by_category, category=self.by_category.get(first),
                p_refuse={c: float(self.p_refuse[r, j]) for j, c in enumerate(self.tokens.refuse)},
            ))  # fmt: skip
        return outputs


def generate_with_refusal_tokens(
    model: Model, prompts: Sequence[str], tokens: RefusalTokens, *, max_new_tokens: int = 64, batch_size: int = 16
) -> list[RefusalTokenOutput]:
    """``model.generate(prompts, policy=tokens, ...)`` (kept for existing callers): the first token forced by
    ``tokens``; one output per prompt, in order."""
    return model.generate(prompts, policy=tokens, max_new_tokens=max_new_tokens, batch_size=batch_size)


def refusal_token_probs(model: Model, prompts: Sequence[str], tokens: RefusalTokens, *, batch_size: int = 16) -> torch.Tensor:
    """First-step refusal-token probabilities ``[n, n_categories]`` (one forward pass per batch, no generation)."""
    first_step = PerPrompt("last", fn=tokens.probabilities)
    return read(model, list(prompts), taps=[Tap("logits", None, first_step)], batch_size=batch_size)[0].float()


@dataclass(frozen=True)
class TauSweep:
    """Refusal rate on harmful prompts (TPR), over-refusal on harmless prompts (FPR) and F1 per threshold."""

    taus: torch.Tensor
    refusal_rate: torch.Tensor
    over_refusal: torch.Tensor
    f1: torch.Tensor
    auc: float

    def table(self) -> str:
        """Plain-text table, one row per threshold."""
        lines = ["   tau  refusal  over-refusal     F1"]
        for t, r, o, f in zip(self.taus.tolist(), self.refusal_rate.tolist(), self.over_refusal.tolist(), self.f1.tolist()):
            lines.append(f"{t:6.3f}  {r:7.3f}  {o:12.3f}  {f:5.3f}")
        return "\n".join(lines)

    def figure(self):
        """Plotly curves of refusal rate and over-refusal against tau."""
        import plotly.graph_objects as go

        x = self.taus.tolist()
        fig = go.Figure([go.Scatter(x=x, y=self.refusal_rate.tolist(), name="refusal rate (harmful)"), go.Scatter(x=x, y=self.over_refusal.tolist(), name="over-refusal (harmless)")])
        fig.update_layout(title=f"Refusal-token threshold sweep (AUC {self.auc:.3f})", xaxis_title="tau", yaxis_title="rate", yaxis_range=[0, 1])
        return fig


def tau_sweep(p_harmful: torch.Tensor, p_harmless: torch.Tensor, *, taus: Sequence[float] | torch.Tensor | None = None) -> TauSweep:
    """Sweep the threshold over first-step probabilities (one category: ``[n]``; several: their max).

    Example:
        >>> s = tau_sweep(torch.tensor([0.9, 0.6, 0.2]), torch.tensor([0.1, 0.3]), taus=[0.25, 0.5])
        >>> s.refusal_rate.tolist(), s.over_refusal.tolist()
        ([0.6666666865348816, 0.6666666865348816], [0.5, 0.0])
    """
    pos = p_harmful.max(-1).values if p_harmful.dim() == 2 else p_harmful
    neg = p_harmless.max(-1).values if p_harmless.dim() == 2 else p_harmless
    if not len(pos) or not len(neg):
        raise EmptyInputError("the sweep needs probabilities for both harmful and harmless prompts")
    t = torch.linspace(0, 1, 21) if taus is None else torch.as_tensor(taus, dtype=torch.float32)
    tpr = (pos[None] >= t[:, None]).float().mean(1)
    fpr = (neg[None] >= t[:, None]).float().mean(1)
    tp, fp = tpr * len(pos), fpr * len(neg)
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1e-12), torch.ones_like(tp))
    f1 = torch.where(precision + tpr > 0, 2 * precision * tpr / (precision + tpr).clamp(min=1e-12), torch.zeros_like(tp))
    return TauSweep(taus=t, refusal_rate=tpr, over_refusal=fpr, f1=f1, auc=roc_auc(torch.cat([pos, neg]), [1] * len(pos) + [0] * len(neg)))
