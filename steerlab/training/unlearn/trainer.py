"""The unlearning trainer: one objective, one parameter mask, a seeded Adam loop on a copy of the model.

:func:`unlearn` deep-copies the model (the caller's is never changed), makes only the target's parameters
trainable, multiplies their gradients by the target's masks, and after each step writes the untouched
entries back from a saved copy, so everything outside the mask is bit-identical afterwards. With an
:class:`~steerlab.training.unlearn.targets.Expert` target the UOE router anchor loss
(``anchor_weight`` × ``-log p_router(expert)`` on forget tokens) is added, and the expert's routing share
on the forget prompts is measured before and after. The result records the objective, target and config
for :func:`~steerlab.training.export`'s manifest.

Example:
    >>> from steerlab.testing import tiny_model
    >>> from steerlab.training.data import SFTExample
    >>> from steerlab.training.unlearn import Columns, GradDiff
    >>> model = tiny_model("llama")
    >>> forget, retain = [SFTExample("Who made Python?", "Guido")], [SFTExample("Capital of France?", "Paris")]
    >>> result = unlearn(model, forget, retain, objective=GradDiff(), target=Columns(((1, 3), (1, 7))),
    ...                  config=UnlearnConfig(steps=3, lr=1e-2))
    >>> result.trained_parameters, len(result.losses)
    (128, 3)
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

import steerlab
from steerlab import compat
from steerlab.arch import normalize_layer
from steerlab.errors import EmptyInputError, InvalidValueError, SteerlabError
from steerlab.eval.answers import QA
from steerlab.moe import router_of
from steerlab.site_hooks import _split_output
from steerlab.training.data import EncodedExample, SFTExample, encode_examples
from steerlab.training.manifest import describe, history, record
from steerlab.training.sft import _num_threads, _pad_id, collate
from steerlab.training.unlearn.losses import IGNORE_INDEX, router_anchor_loss, sequence_logprob
from steerlab.training.unlearn.objectives import RMU, Objective
from steerlab.training.unlearn.targets import Expert, LoRA, Masks, Target, as_target, parameters_in

if TYPE_CHECKING:
    from steerlab.model import Model


class UnlearnError(SteerlabError, RuntimeError):
    """Unlearning cannot start or went wrong (a target outside the objective's reach, a diverging loss)."""


@dataclass(frozen=True)
class UnlearnConfig:
    """Optimiser settings. ``steps`` counts Adam updates, each on ``batch_size`` forget (and retain) rows.

    ``anchor_weight`` scales UOE's router anchor loss (Expert targets only). ``max_grad_norm`` clips the
    masked gradient. ``num_threads`` sets torch's threads for the run and restores them afterwards.
    """

    steps: int = 50
    lr: float = 1e-4
    batch_size: int = 8
    max_length: int = 128
    max_grad_norm: float | None = 1.0
    anchor_weight: float = 1.0
    seed: int = 0
    num_threads: int | None = None

    def __post_init__(self) -> None:
        bad = [n for n, ok in {"steps": self.steps >= 1, "lr": self.lr > 0, "batch_size": self.batch_size >= 1,
                               "max_length": self.max_length >= 2, "anchor_weight": self.anchor_weight >= 0}.items()
               if not ok]  # fmt: skip
        if bad:
            raise InvalidValueError(
                f"invalid UnlearnConfig values for {bad}: steps/batch_size >= 1, lr > 0, anchor_weight >= 0"
            )


@dataclass(frozen=True)
class UnlearnResult:
    """The unlearned model (a copy), each step's loss terms, and what was trained."""

    model: Model
    losses: tuple[dict[str, float], ...]
    objective: Objective
    target: Target
    config: UnlearnConfig
    trained_parameters: int
    seconds: float
    routing_share: dict[str, float] | None = None
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    def add_metrics(self, metrics: dict[str, Any]) -> None:
        """Attach evaluation numbers to the model's edit record (they go into the export manifest)."""
        record_metrics(self.model, metrics)


def record_metrics(model: Model, metrics: dict[str, Any]) -> None:
    """Add ``metrics`` to ``model``'s latest edit record (the export manifest's ``edits[-1].metrics``)."""
    entries = history(model.hf)
    if not entries:
        raise InvalidValueError(f"{model.name} carries no edit record to attach metrics to")
    entries[-1].setdefault("metrics", {}).update(describe(metrics))
    record(model.hf, entries)


def as_examples(items: Sequence[SFTExample | QA | tuple[str, str]], what: str) -> list[SFTExample]:
    """SFT examples from examples, QA items (first accepted answer) or ``(prompt, answer)`` pairs."""
    out = []
    for item in items:
        if isinstance(item, SFTExample):
            out.append(item)
        elif isinstance(item, QA):
            out.append(SFTExample(item.question, item.answers[0]))
        elif isinstance(item, tuple) and len(item) == 2:
            answer = item[1] if isinstance(item[1], str) else item[1][0]
            out.append(SFTExample(item[0], answer))
        else:
            raise InvalidValueError(
                f"{what} items must be SFTExample, QA or (prompt, answer); got {type(item).__name__}"
            )
    return out


class _Stop(Exception):
    """Raised by a capture hook once the last layer an objective needs has run (early exit)."""


class _Trainable:
    """The masked parameters of the working copy: gradient masking and exact restoration of untouched entries."""

    def __init__(self, hf: torch.nn.Module, masks: Masks):
        for p in hf.parameters():
            p.requires_grad_(False)
        self.items: list[tuple[torch.nn.Parameter, torch.Tensor | None, torch.Tensor | None]] = []
        named = dict(hf.named_parameters(remove_duplicate=False))
        for path, mask in masks.items():
            param = named.get(path)
            if param is None:
                raise UnlearnError(f"{path} is not a parameter of the model; it cannot be trained")
            param.requires_grad_(True)
            self.items.append((param, mask, None if mask is None else param.detach().clone()))
        if not self.items:
            raise UnlearnError("the target selects no parameters")

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p, _, _ in self.items]

    def mask_grads(self) -> None:
        for p, mask, _ in self.items:
            if p.grad is not None and mask is not None:
                p.grad.mul_(mask)

    @torch.no_grad()
    def restore(self) -> None:
        for p, mask, original in self.items:
            if mask is not None:
                p.copy_(torch.where(mask, p, original))


class _Passes:
    """Forward passes of one step, computed on demand and shared between the objective and the anchor."""

    def __init__(self, trainer: _Trainer, forget: list[int], retain: list[int]):
        self.t, self.forget_idx, self.retain_idx = trainer, forget, retain
        self._cache: dict[str, Any] = {}

    def _run(self, key: str, idx: list[int], rows: list[EncodedExample], *, hidden: int | None) -> dict[str, Any]:
        if key not in self._cache:
            self._cache[key] = self.t.forward([rows[i] for i in idx], hidden=hidden, router=key.startswith("forget"))
        return self._cache[key]

    def forget_logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._run("forget", self.forget_idx, self.t.forget, hidden=None)
        return out["logits"], out["labels"]

    def retain_logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._run("retain", self.retain_idx, self.t.retain_rows(), hidden=None)
        return out["logits"], out["labels"]

    def reference_logprob(self) -> torch.Tensor:
        return self.t.reference[self.forget_idx]

    def forget_hidden(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._run(f"forget@{layer}", self.forget_idx, self.t.forget, hidden=layer)
        return out["hidden"], out["mask"]

    def retain_hidden(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self._run(f"retain@{layer}", self.retain_idx, self.t.retain_rows(), hidden=layer)
        frozen = torch.zeros_like(out["hidden"])
        for row, i in enumerate(self.retain_idx):
            n = self.t.frozen_retain[i].shape[0]
            frozen[row, :n] = self.t.frozen_retain[i]
        return out["hidden"], frozen, out["mask"]

    def control_vector(self, layer: int, coeff: float) -> torch.Tensor:
        return self.t.control * coeff

    def router_logits(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Router logits and token mask of the forget batch, if a forget pass ran with the router captured."""
        for key in ("forget", *[k for k in self._cache if k.startswith("forget@")]):
            if key in self._cache and self._cache[key].get("router") is not None:
                return self._cache[key]["router"], self._cache[key]["mask"]
        return None


class _Trainer:
    def __init__(self, work: Model, objective: Objective, target: Target, config: UnlearnConfig,
                 forget: list[EncodedExample], retain: list[EncodedExample]):  # fmt: skip
        self.work, self.hf, self.objective, self.config = work, work.hf, objective, config
        self.forget, self.retain = forget, retain
        self.pad_id = _pad_id(work.tokenizer)
        self.expert = target.resolved(work) if isinstance(target, Expert) else None
        self.router = router_of(work, self.expert[0]) if self.expert else None
        self.layers = work.spec.decoder_layers(self.hf)

    def retain_rows(self) -> list[EncodedExample]:
        if not self.retain:
            raise UnlearnError(f"{type(self.objective).__name__} needs retain examples; pass retain=[...]")
        return self.retain

    def forward(self, rows: list[EncodedExample], *, hidden: int | None, router: bool) -> dict[str, Any]:
        """One forward pass; ``hidden``: also capture (and stop after) decoder layer ``hidden``'s output."""
        batch = collate(rows, pad_id=self.pad_id)
        out: dict[str, Any] = {"labels": batch["labels"], "mask": batch["attention_mask"].bool(), "router": None}
        with ExitStack() as stack:
            if hidden is not None:
                layer = self.layers[normalize_layer(hidden, len(self.layers))]

                def grab(_m, _a, output):
                    out["hidden"] = _split_output(output)[0]  # raises on an unknown output form
                    raise _Stop

                stack.enter_context(_hooked(layer, grab))
            if router and self.router is not None:

                def grab_router(_m, _a, output):
                    logits = compat.router_output(output)[0]
                    out["router"] = logits.reshape(-1, logits.shape[-1])

                stack.enter_context(_hooked(self.router, grab_router))
            try:
                if hidden is None:
                    out["logits"], out["labels"] = self._target_logits(batch)
                else:
                    self.hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            except _Stop:
                pass
        return out

    def _target_logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits only where a next token is labelled (``logits_to_keep``: the unembedding is a quarter of a small
        model's compute), returned with labels in the usual shifted layout: ``logits[:, :-1]`` predicts
        ``labels[:, 1:]``."""
        labels = batch["labels"]
        keep = ((labels[:, 1:] != IGNORE_INDEX).any(0)).nonzero().flatten()
        kept = self.hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                       logits_to_keep=keep).logits  # fmt: skip
        if kept.shape[1] != keep.numel():
            raise UnlearnError(
                f"{type(self.hf).__name__} ignored logits_to_keep (returned {kept.shape[1]} positions, asked "
                f"{keep.numel()}); install a transformers version in steerlab's tested range"
            )
        logits = torch.cat([kept, kept.new_zeros(kept.shape[0], 1, kept.shape[2])], dim=1)
        shifted = torch.cat([torch.full_like(labels[:, :1], IGNORE_INDEX), labels[:, keep + 1]], dim=1)
        return logits, shifted

    def sequence_logprobs(self, rows: list[EncodedExample]) -> torch.Tensor:
        """The current model's ``log π(y|x)`` per row, without gradients, in batches."""
        outs = []
        with torch.no_grad():
            for start in range(0, len(rows), self.config.batch_size):
                part = self.forward(rows[start : start + self.config.batch_size], hidden=None, router=False)
                outs.append(sequence_logprob(part["logits"], part["labels"]))
        return torch.cat(outs)

    def hidden_states(self, rows: list[EncodedExample], layer: int) -> list[torch.Tensor]:
        """Per row, the layer's output ``[len, d]`` (float32, no gradients)."""
        out = []
        with torch.no_grad():
            for start in range(0, len(rows), self.config.batch_size):
                chunk = rows[start : start + self.config.batch_size]
                part = self.forward(chunk, hidden=layer, router=False)
                out += [part["hidden"][i, : len(r)].float() for i, r in enumerate(chunk)]
        return out

    def prepare(self) -> None:
        """The frozen starting model's numbers the objective compares against (computed before step 1)."""
        if self.objective.needs_reference:
            self.reference = self.sequence_logprobs(self.forget)
        if isinstance(self.objective, RMU):
            forget_h = torch.cat(self.hidden_states(self.forget, self.objective.layer))
            gen = torch.Generator().manual_seed(self.objective.seed)
            u = torch.rand(forget_h.shape[-1], generator=gen)
            self.control = u / u.norm() * forget_h.norm(dim=-1).mean()
            if self.objective.alpha:
                self.frozen_retain = self.hidden_states(self.retain_rows(), self.objective.layer)


@contextmanager
def _hooked(module: torch.nn.Module, fn) -> Iterator[None]:
    handle = module.register_forward_hook(fn)
    try:
        yield
    finally:
        handle.remove()


def _check_reach(model: Model, objective: Objective, masks: Masks) -> None:
    """RMU only trains what lies before its layer's output: a mask after it would receive no gradient."""
    if not isinstance(objective, RMU):
        return
    last = normalize_layer(objective.layer, model.n_layers)
    prefix = f"{model.spec.layers}."
    late = sorted({int(p[len(prefix) :].split(".")[0]) for p in masks if p.startswith(prefix)} - set(range(last + 1)))
    outside = [p for p in masks if not p.startswith(prefix)]
    if late or outside:
        raise UnlearnError(
            f"RMU(layer={objective.layer}) reads layer {last}'s output, so parameters in layers {late or ''}"
            f"{' ' + str(outside) if outside else ''} get no gradient; target layers <= {last} (e.g. "
            f"Layers(({max(0, last - 2)}, {max(0, last - 1)}, {last}), part='mlp'))"
        )


def _routing_share(model: Model, prompts: list[str], layer: int, expert: int) -> float:
    from steerlab.measure.experts import expert_usage

    usage = expert_usage(model, prompts, layers=[layer])
    return float(usage.counts[0, expert]) / max(1, usage.n_tokens)


def unlearn(
    model: Model,
    forget: Sequence[SFTExample | QA | tuple[str, str]],
    retain: Sequence[SFTExample | QA | tuple[str, str]] = (),
    *,
    objective: Objective,
    target: Target | Sequence,
    config: UnlearnConfig = UnlearnConfig(),
    progress: bool = False,
) -> UnlearnResult:
    """Unlearn ``forget`` (keeping ``retain``) by training only ``target``'s parameters of a copy of ``model``.

    ``forget`` / ``retain`` are chat examples (prompt, target text) — e.g. questions and their answers; the
    loss is taken on the target tokens (RMU: on every token of the rendered example).

    Example:
        >>> from steerlab.testing import tiny_model
        >>> from steerlab.training.unlearn import NPO, Layers
        >>> model = tiny_model("llama")
        >>> result = unlearn(model, [("Who made Python?", "Guido")], [("Capital of France?", "Paris")],
        ...                  objective=NPO(), target=Layers((2,), part="mlp"), config=UnlearnConfig(steps=4, lr=1e-3))
        >>> result.losses[-1]["forget_logratio"] < 0       # the forget answer became less likely
        True
    """
    forget_ex, retain_ex = as_examples(forget, "forget"), as_examples(retain, "retain")
    if not forget_ex:
        raise EmptyInputError("no forget examples; pass at least one (prompt, answer)")
    target = as_target(target)
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]), _num_threads(config.num_threads):
        torch.manual_seed(config.seed)
        hf = copy.deepcopy(model.hf)
        work = steerlab.load(hf, model.tokenizer, system=model.system)
        work.name = f"{model.name}+unlearn"
        peft_model = target.inject(hf) if isinstance(target, LoRA) else None
        if peft_model is not None:
            masks = {name: None for name, p in hf.named_parameters() if p.requires_grad}
        else:
            masks = target.masks(work)
        _check_reach(work, objective, masks)
        trained = sum(int(p.numel()) for name, p in hf.named_parameters() if name in masks) if peft_model else None
        fmt = work.chat()
        trainer = _Trainer(work, objective, target, config,
                           encode_examples(fmt, forget_ex, max_length=config.max_length),
                           encode_examples(fmt, retain_ex, max_length=config.max_length) if retain_ex else [])  # fmt: skip
        share: dict[str, float] | None = None
        prompts = [e.prompt for e in forget_ex]
        if trainer.expert is not None:
            share = {"before": _routing_share(work, prompts, *trainer.expert)}
        trainable = _Trainable(hf, masks)
        trainer.prepare()
        losses = _train(trainer, trainable, progress=progress)
        if peft_model is not None:
            hf = peft_model.merge_and_unload()
            work = steerlab.load(hf, model.tokenizer, system=model.system)
            work.name = f"{model.name}+unlearn"
        hf.eval()
        for p in hf.parameters():
            p.requires_grad_(False)
        if share is not None:
            share["after"] = _routing_share(work, prompts, *trainer.expert)
    entry = {
        "intervention": {"type": "Unlearn", "objective": describe(objective), "target": describe(target)},
        "source_model": model.name,
        "config": asdict(config),
        "trained_parameters": trained if trained is not None else parameters_in(work, masks),
        "forget_examples": len(forget_ex),
        "retain_examples": len(retain_ex),
        "steerlab_version": steerlab.__version__,
    }
    if share is not None:
        entry["routing_share"] = share
    record(hf, [*history(model.hf), entry])
    return UnlearnResult(
        model=work,
        losses=tuple(losses),
        objective=objective,
        target=target,
        config=config,
        trained_parameters=entry["trained_parameters"],
        seconds=time.perf_counter() - started,
        routing_share=share,
    )


def _train(trainer: _Trainer, trainable: _Trainable, *, progress: bool) -> list[dict[str, float]]:
    from tqdm.auto import tqdm

    config, objective = trainer.config, trainer.objective
    optimizer = torch.optim.Adam(trainable.params, lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    n_f, n_r = len(trainer.forget), len(trainer.retain)

    def draw(n: int) -> list[int]:
        return torch.randperm(n, generator=gen)[: config.batch_size].tolist() if n else []

    losses, acted = [], False
    for step in tqdm(range(config.steps), desc="unlearning", unit="step", disable=not progress):
        passes = _Passes(trainer, draw(n_f), draw(n_r))
        loss, parts = objective.loss(passes)
        if trainer.expert is not None and config.anchor_weight:
            routed = passes.router_logits()
            if routed is None:  # the objective ran no full forget pass (RMU stops early): one with the router
                passes.forget_logits()
                routed = passes.router_logits()
            anchor = router_anchor_loss(routed[0], trainer.expert[1], routed[1])
            loss = loss + config.anchor_weight * anchor
            parts["anchor"] = float(anchor.detach())
        if not torch.isfinite(loss):
            raise UnlearnError(f"the loss became {float(loss.detach())} at step {step}; lower lr")
        loss.backward()
        trainable.mask_grads()
        acted = acted or any(p.grad is not None and bool(p.grad.any()) for p in trainable.params)
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable.params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        trainable.restore()
        losses.append({"loss": float(loss.detach()), **parts})
    if not acted:  # e.g. an expert the forget tokens never reach, with its router row frozen
        raise UnlearnError(
            f"the target's parameters received no gradient in {config.steps} steps, so nothing was unlearned; pick a "
            "target the forget examples pass through (for an Expert: one they are routed to, see expert_attribution)"
        )
    return losses
