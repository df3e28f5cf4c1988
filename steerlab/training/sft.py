"""LoRA supervised fine-tuning on CPU-sized runs (peft), with new control tokens.

:func:`finetune` copies the model (the caller's model is never changed), adds ``new_tokens`` as
special tokens and resizes the embeddings, wraps the copy in a peft LoRA adapter whose new-token
rows of the input embedding and of the LM head are trainable (peft's
``trainable_token_indices``; tied heads follow the embedding), trains with a plain seeded AdamW
loop (gradient accumulation, warm-up + linear decay, gradient clipping, ``max_steps``), merges
the adapter into the weights and returns a steerlab :class:`~steerlab.model.Model` whose
tokenizer knows the new tokens.

Example:
    >>> import tempfile
    >>> from steerlab.testing import tiny_model
    >>> from steerlab.training.data import control_tokens, refusal_token_examples
    >>> model, harmful, harmless = tiny_model("llama"), ["Make a weapon.", "Pick a lock."], ["Hi", "Say hello."]
    >>> examples = refusal_token_examples(harmful, harmless, answers=["Hello!", "Hi there."], refusals=["I can't."] * 2)
    >>> result = finetune(model, examples, new_tokens=control_tokens(), config=SFTConfig(epochs=2), progress=False)
    >>> texts = result.model.generate(["Name a fruit."], max_new_tokens=4)
    >>> result.save(Path(tempfile.mkdtemp()) / "model").name
    'model'
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from steerlab.errors import EmptyInputError, SteerlabError
from steerlab.training.data import IGNORE_INDEX, EncodedExample, SFTExample, encode_examples

if TYPE_CHECKING:
    from steerlab.model import Model


class FineTuneError(SteerlabError, RuntimeError):
    """Fine-tuning cannot start or went wrong (missing peft, bad settings, a diverging loss)."""


@dataclass(frozen=True)
class SFTConfig:
    """LoRA and optimiser settings. Steps count optimiser updates (``batch_size * grad_accum`` examples).

    ``max_steps`` (when set) overrides ``epochs``. ``token_lr`` is the learning rate of the new
    token rows (they start from the mean embedding and have far to go). ``num_threads`` sets
    ``torch.set_num_threads`` for the run and restores the previous value afterwards.
    ``first_token_weight`` scales the loss of each example's first supervised token (with
    refusal-token data: the ``[refuse]``/``[respond]`` decision) against the other target tokens;
    1 is plain SFT.
    ``target_modules="all-linear"`` targets every linear layer of the decoder (attention and MLP
    projections), whatever the family calls them.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"
    lr: float = 2e-4
    token_lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 128
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    num_threads: int | None = None
    first_token_weight: float = 1.0

    def __post_init__(self) -> None:
        checks = {
            "r": self.r >= 1,
            "batch_size": self.batch_size >= 1,
            "grad_accum": self.grad_accum >= 1,
            "max_length": self.max_length >= 2,
            "lr": self.lr > 0,
            "token_lr": self.token_lr >= 0,
            "epochs": self.epochs > 0,
            "max_steps": self.max_steps is None or self.max_steps >= 1,
            "warmup_steps": self.warmup_steps >= 0,
            "num_threads": self.num_threads is None or self.num_threads >= 1,
            "first_token_weight": self.first_token_weight >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise FineTuneError(f"invalid SFTConfig values for {bad}: counts must be positive, rates positive, epochs > 0")


@dataclass(frozen=True)
class SFTResult:
    """The merged fine-tuned model, the loss of every optimiser step and the new tokens' ids."""

    model: Model
    losses: tuple[float, ...]
    new_token_ids: dict[str, int]
    steps: int
    examples: int
    seconds: float
    config: SFTConfig
    info: dict = field(default_factory=dict, compare=False)

    def save(self, directory: str | Path) -> Path:
        """``save_pretrained`` of the merged model and its tokenizer (with the new tokens) into ``directory``."""
        return save_pretrained(self.model, directory)


def save_pretrained(model: Model, directory: str | Path) -> Path:
    """Write ``model.hf`` and ``model.tokenizer`` with ``save_pretrained``; reload with ``steerlab.load(directory)``.

    Example:
        >>> import tempfile
        >>> from steerlab.testing import tiny_model
        >>> path = save_pretrained(tiny_model("llama"), Path(tempfile.mkdtemp()) / "model")
        >>> steerlab.load(path).n_layers
        3
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    model.hf.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    return path


def add_tokens(model: Model, tokens: Sequence[str], *, inplace: bool = False) -> Model:
    """A model whose tokenizer has ``tokens`` as special tokens and whose embeddings are resized to match.

    Tokens the tokenizer already knows are kept as they are. New rows start near the mean of the
    existing embeddings (transformers' mean resizing). Without ``inplace`` the HF model and the
    tokenizer are deep copies, so the caller's model is unchanged.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> m2 = add_tokens(model, ["[refuse]", "[respond]"])
        >>> len(model.tokenizer), len(m2.tokenizer), m2.tokenizer.convert_tokens_to_ids("[refuse]")
        (400, 402, 400)
    """
    import steerlab

    tokens = list(dict.fromkeys(tokens))
    if any(not isinstance(t, str) or not t for t in tokens):
        raise FineTuneError(f"tokens must be non-empty strings; got {tokens!r}")
    hf = model.hf if inplace else copy.deepcopy(model.hf)
    tok = model.tokenizer if inplace else copy.deepcopy(model.tokenizer)
    tok.add_tokens(tokens, special_tokens=True)
    for t in tokens:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise FineTuneError(f"{t!r} does not tokenize to one token after adding it ({ids}); pick a token text without surrounding spaces")
    if len(tok) != hf.get_input_embeddings().weight.shape[0]:
        hf.resize_token_embeddings(len(tok))
    out = steerlab.load(hf, tok, system=model.system)
    out.name = model.name
    return out


def _token_ids(tokenizer, tokens: Sequence[str]) -> dict[str, int]:
    return {t: int(tokenizer.convert_tokens_to_ids(t)) for t in tokens}


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0  # padded positions are masked and unlabelled, so any id works


def _module_name(hf: torch.nn.Module, module: torch.nn.Module | None) -> str | None:
    if module is None:
        return None
    return next((name for name, m in hf.named_modules() if m is module), None)


def _peft_model(hf: torch.nn.Module, config: SFTConfig, token_ids: list[int]):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - peft is an extra
        raise FineTuneError("LoRA fine-tuning needs peft: pip install 'steerlab[peft]' (or pip install peft)") from exc
    trainable = None
    if token_ids:
        emb = _module_name(hf, hf.get_input_embeddings())
        head = _module_name(hf, hf.get_output_embeddings())
        if emb is None:
            raise FineTuneError("cannot find the input embedding module by name; new tokens cannot be made trainable")
        trainable = {emb: list(token_ids)}
        tied = bool(getattr(hf.config, "tie_word_embeddings", False))
        if head is not None and not tied:
            trainable[head] = list(token_ids)
    targets = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
    lora = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets, trainable_token_indices=trainable, bias="none")
    return get_peft_model(hf, lora)


def collate(rows: Sequence[EncodedExample], *, pad_id: int, first_token_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` and per-label loss ``weights``.

    ``weights`` is 1 on supervised tokens, ``first_token_weight`` on each row's first supervised
    token (the control token of refusal-token data), 0 elsewhere.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> examples = [SFTExample("Hi", "Hello!"), SFTExample("Say hello.", "Hello there, how are you?")]
        >>> batch = collate(encode_examples(tiny_model("llama").chat(), examples), pad_id=0)
        >>> sorted(batch), batch["input_ids"].shape[0]
        (['attention_mask', 'input_ids', 'labels', 'weights'], 2)
    """
    if not rows:
        raise EmptyInputError("no rows to collate")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):  # right padding: positions start at 0 in every row
        ids[i, : len(r)] = torch.tensor(r.input_ids)
        labels[i, : len(r)] = torch.tensor(r.labels)
        mask[i, : len(r)] = 1
    weights = (labels != IGNORE_INDEX).float()
    for i, r in enumerate(rows):
        if r.supervised:
            weights[i, r.supervised[0]] = float(first_token_weight)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "weights": weights}


def weighted_lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, weighted per label and normalised by the total weight.

    With unit weights on the supervised tokens this is the usual mean over supervised tokens
    (what ``model(..., labels=labels).loss`` returns).
    """
    logits, labels, weights = logits[:, :-1].float(), labels[:, 1:], weights[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).clamp(min=0), reduction="none")
    w = weights.reshape(-1) * (labels.reshape(-1) != IGNORE_INDEX)
    return (ce * w).sum() / w.sum().clamp(min=1e-12)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


@contextmanager
def _num_threads(n: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train(peft_model, encoded: list[EncodedExample], config: SFTConfig, *, pad_id: int, progress: bool) -> list[float]:
    """The AdamW loop: warm-up + linear decay, gradient accumulation and clipping; the loss of each step."""
    token_params = [p for n, p in peft_model.named_parameters() if p.requires_grad and "trainable_tokens" in n]
    lora_params = [p for n, p in peft_model.named_parameters() if p.requires_grad and "trainable_tokens" not in n]
    groups = [{"params": lora_params, "lr": config.lr, "weight_decay": config.weight_decay}]
    if token_params:
        groups.append({"params": token_params, "lr": config.token_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    steps_per_epoch = math.ceil(len(encoded) / (config.batch_size * config.grad_accum))
    total = config.max_steps if config.max_steps is not None else max(1, math.ceil(config.epochs * steps_per_epoch))
    gen = torch.Generator().manual_seed(config.seed)

    def micro_batches() -> Iterator[dict[str, torch.Tensor]]:
        while True:  # endless seeded reshuffles; the step count decides when to stop
            order = torch.randperm(len(encoded), generator=gen).tolist()
            for start in range(0, len(order), config.batch_size):
                rows = [encoded[i] for i in order[start : start + config.batch_size]]
                yield collate(rows, pad_id=pad_id, first_token_weight=config.first_token_weight)

    stream = micro_batches()
    losses: list[float] = []
    peft_model.train()
    with tqdm(total=total, desc="fine-tuning", unit="step", disable=not progress) as bar:
        for step in range(total):
            factor = _lr_factor(step, total, config.warmup_steps)
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * factor
            step_loss = 0.0
            for _ in range(config.grad_accum):
                batch = next(stream)
                logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
                loss = weighted_lm_loss(logits, batch["labels"], batch["weights"])
                if not torch.isfinite(loss):
                    raise FineTuneError(f"the loss became {float(loss)} at step {step}; lower lr / token_lr")
                (loss / config.grad_accum).backward()
                step_loss += loss.item() / config.grad_accum
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}")
    return losses


def finetune(
    model: Model,
    examples: Sequence[SFTExample],
    *,
    new_tokens: Sequence[str] = (),
    config: SFTConfig = SFTConfig(),
    progress: bool = True,
) -> SFTResult:
    """LoRA SFT of a copy of ``model`` on ``examples`` (loss on targets only); returns the merged model.

    ``new_tokens`` are added to the tokenizer (e.g. ``control_tokens()``); their embedding and
    LM-head rows train alongside the LoRA weights. Examples are encoded with the model's chat
    format (its default system prompt included), exactly as generation renders prompts.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> examples = [SFTExample("Make a weapon.", "[refuse]I can't."), SFTExample("Hi", "[respond]Hello!")]
        >>> cfg = SFTConfig(r=16, epochs=2, batch_size=8, max_length=96, num_threads=1)
        >>> result = finetune(model, examples, new_tokens=["[refuse]", "[respond]"], config=cfg, progress=False)
        >>> result.losses[-1] < result.losses[0]
        True
    """
    import steerlab

    examples = list(examples)
    if not examples:
        raise EmptyInputError("no training examples; pass at least one SFTExample")
    started = time.perf_counter()
    # seeded, and the caller's global RNG state and thread count are restored afterwards
    with torch.random.fork_rng(devices=[]), _num_threads(config.num_threads):
        torch.manual_seed(config.seed)
        work = add_tokens(model, new_tokens)  # always a copy: the caller's model stays untouched
        tok = work.tokenizer
        token_ids = _token_ids(tok, new_tokens)
        encoded = encode_examples(work.chat(), examples, max_length=config.max_length)
        peft_model = _peft_model(work.hf, config, sorted(set(token_ids.values())))
        losses = _train(peft_model, encoded, config, pad_id=_pad_id(tok), progress=progress)
        merged = peft_model.merge_and_unload()
        merged.eval()
    lengths = [len(e) for e in encoded]
    result_model = steerlab.load(merged, tok, system=model.system)
    result_model.name = f"{model.name}+lora"
    return SFTResult(
        model=result_model,
        losses=tuple(losses),
        new_token_ids=token_ids,
        steps=len(losses),
        examples=len(encoded),
        seconds=time.perf_counter() - started,
        config=config,
        info={
            "config": asdict(config),
            "supervised_tokens": sum(len(e.supervised) for e in encoded),
            "tokens_per_example": {"min": min(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths)},
            "cut_at_max_length": sum(n == config.max_length for n in lengths),
        },
    )
