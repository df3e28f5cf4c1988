"""ULD — unlearning from the logit difference (Ji et al. 2024): the target model stays as it is; a small
assistant learns the *reversed* objectives (remember the forget set, know nothing on the retain set) and at
inference ``logits = logits_target - alpha · logits_assistant``.

* :func:`build_assistant` — the assistant: a copy of the target's embeddings, first ``layers`` decoder
  layers, final norm and unembedding (the paper's construction: same tokenizer, a fraction of the cost).
* :func:`train_uld` — builds it, trains it with :class:`~steerlab.training.unlearn.objectives.Reversed`
  through the ordinary :func:`~steerlab.training.unlearn.unlearn` trainer (any target: ``Layers``, ``LoRA``)
  and returns a :class:`ULD` value.
* :meth:`ULD.applied` — a scope in which the target's forward output carries the difference: scoring
  (:func:`~steerlab.eval.answers.answer_probability`), ``model.generate`` with or without a policy, and the
  forgetting report all see the unlearned distribution. It is a hook on the model's logits rather than a
  transformers ``LogitsProcessor`` because a processor sees neither the attention mask (left padding would
  leak into the assistant) nor scoring passes. The assistant keeps its own KV cache in step with the target's;
  a cache it cannot match (another cache object mid-sequence, a longer one) raises instead of guessing.

Not mergeable: the difference of two networks' logits is not the output of one network of the target's
architecture (it would need both residual streams), so there is no merged safetensors/GGUF model and no
vLLM / llama.cpp rendering. :meth:`ULD.save` exports the assistant (with ``alpha`` and the target's name in
the manifest); :meth:`ULD.load` reads it back.

Example:
    >>> from steerlab.testing import tiny_model
    >>> from steerlab.eval.answers import QA
    >>> from steerlab.training.unlearn.evaluate import answer_logprob
    >>> model = tiny_model("llama")
    >>> forget, retain = [QA("Who made Python?", ("Guido",))], [QA("Capital of France?", ("Paris",))]
    >>> uld = train_uld(model, forget, retain, layers=1, alpha=1.0, config=UnlearnConfig(steps=10, lr=1e-2))
    >>> before = answer_logprob(model, forget + retain)
    >>> with uld.applied(model):
    ...     after = answer_logprob(model, forget + retain)
    >>> bool(after[0] < before[0] - 5)                     # the forget reply: much less likely
    True
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import steerlab
from steerlab import compat
from steerlab.arch import resolve_path
from steerlab.errors import InvalidValueError
from steerlab.eval.answers import QA
from steerlab.training.data import SFTExample
from steerlab.training.unlearn.objectives import Reversed
from steerlab.training.unlearn.targets import Layers, Target
from steerlab.training.unlearn.trainer import UnlearnConfig, UnlearnError, unlearn

if TYPE_CHECKING:
    from steerlab.model import Model

Examples = Sequence[SFTExample | QA | tuple[str, str]]
_PASS_THROUGH = ("attention_mask", "position_ids", "cache_position", "logits_to_keep")


def build_assistant(model: Model, *, layers: int) -> Model:
    """A copy of ``model`` cut after its first ``layers`` decoder layers (embeddings, final norm and unembedding
    kept), sharing its tokenizer. The caller's model is not changed.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> build_assistant(tiny_model("qwen2"), layers=1).n_layers
        1
    """
    total = model.n_layers
    if not (isinstance(layers, int) and 1 <= layers <= total):
        raise InvalidValueError(f"layers must be an int in 1..{total} (the target's decoder layers), got {layers!r}")
    owner_path, _, attr = model.spec.layers.rpartition(".")
    owner = resolve_path(model.hf, owner_path) if owner_path else model.hf
    full = getattr(owner, attr)
    setattr(owner, attr, torch.nn.ModuleList(list(full)[:layers]))
    try:  # copy only what the assistant keeps
        hf = copy.deepcopy(model.hf)
    finally:
        setattr(owner, attr, full)
    compat.truncate_config(hf.config, layers)
    assistant = steerlab.load(hf, model.tokenizer, system=model.system)
    assistant.name = f"{model.name}[:{layers}]"
    return assistant


@dataclass(frozen=True)
class ULD:
    """A trained ULD assistant and its weight: inside :meth:`applied`, ``logits - alpha · assistant logits``."""

    assistant: Model
    alpha: float = 1.0

    def __post_init__(self) -> None:
        _check_alpha(self.alpha)

    def check(self, model: Model) -> None:
        """Raise unless the assistant scores the same vocabulary with the same tokenizer as ``model``."""
        ours = self.assistant.hf.get_output_embeddings().weight.shape[0]
        theirs = model.hf.get_output_embeddings().weight.shape[0]
        if ours != theirs or self.assistant.tokenizer.get_vocab() != model.tokenizer.get_vocab():
            raise InvalidValueError(
                f"the ULD assistant ({self.assistant.name}, {ours} logits) does not share {model.name}'s vocabulary "
                f"({theirs} logits) and tokenizer; build it from that model with build_assistant / train_uld"
            )

    @contextmanager
    def applied(self, model: Model) -> Iterator[None]:
        """Within the block every forward pass of ``model`` returns ``logits - alpha · assistant logits``.

        The hooks are removed on exit (also on an exception); a block in which the model never ran raises
        :class:`~steerlab.training.unlearn.UnlearnError` (the difference acted nowhere).
        """
        self.check(model)
        state = _AssistantState(self.assistant, self.alpha)
        handles = [
            model.hf.register_forward_pre_hook(state.before, with_kwargs=True),
            model.hf.register_forward_hook(state.after, with_kwargs=True),
        ]
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            for handle in handles:
                handle.remove()
            if not failed and not state.calls:
                raise UnlearnError(f"ULD.applied({model.name}): the model ran no forward pass inside the block")

    def save(self, path: str | Path) -> Path:
        """Export the assistant (safetensors) with ``alpha`` in the manifest; the target is not written."""
        from steerlab.training.export import export

        return export(self.assistant, path, manifest={"uld": {"alpha": self.alpha, "assistant": self.assistant.name}})

    @classmethod
    def load(cls, path: str | Path, *, alpha: float | None = None) -> ULD:
        """A :class:`ULD` from :meth:`save`'s directory (``alpha`` overrides the saved one)."""
        from steerlab.training.export import read_manifest

        saved = read_manifest(path).get("extra", {}).get("uld")
        if saved is None:
            raise InvalidValueError(f"{path} is a steerlab export but not a ULD assistant (no 'uld' in its manifest)")
        return cls(steerlab.load(str(path)), alpha=float(saved["alpha"]) if alpha is None else alpha)


def _check_alpha(alpha: object) -> None:
    if isinstance(alpha, bool) or not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise InvalidValueError(f"ULD alpha must be a finite number > 0, got {alpha!r}")


class _AssistantState:
    """The assistant's side of one :meth:`ULD.applied` scope: its KV cache, kept in step with the target's."""

    def __init__(self, assistant: Model, alpha: float) -> None:
        self.assistant, self.alpha = assistant, alpha
        self.cache: Any = None  # the assistant's KV cache
        self.target_cache: Any = None  # the target cache it mirrors
        self.length = 0  # tokens in self.cache
        self.past = 0  # the target cache's length before the running call
        self.calls = 0

    def before(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        cache = compat.find_cache(args, kwargs)
        self.past = int(cache.get_seq_length()) if cache is not None else 0

    def after(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise UnlearnError("ULD needs input_ids (the assistant re-reads the tokens); inputs_embeds is not supported")
        if kwargs.get("labels") is not None:
            raise UnlearnError("ULD changes the logits after the model computed its loss; score the returned logits "
                               "instead of passing labels")  # fmt: skip
        target_cache = compat.output_cache(output)
        cache = self._assistant_cache(target_cache)
        inputs = {k: kwargs[k] for k in _PASS_THROUGH if kwargs.get(k) is not None}
        hf = self.assistant.hf
        with torch.no_grad():
            out = hf(input_ids=ids, **(compat.with_cache(hf, cache, **inputs) if target_cache is not None
                                       else {**inputs, "use_cache": False}))  # fmt: skip
        if out.logits.shape != output.logits.shape:
            raise UnlearnError(f"ULD: assistant logits {tuple(out.logits.shape)} do not match the model's "
                               f"{tuple(output.logits.shape)}")  # fmt: skip
        if target_cache is not None:
            self.cache, self.target_cache = compat.output_cache(out), target_cache
            self.length = self.past + ids.shape[1]
        output.logits = output.logits - self.alpha * out.logits.to(output.logits.dtype)
        self.calls += 1
        return output

    def _assistant_cache(self, target_cache: Any) -> Any:
        """The assistant cache that matches the target's state before this call (``None``: start a new one)."""
        if target_cache is None or self.past == 0:
            return None
        if target_cache is not self.target_cache or self.past > self.length:
            raise UnlearnError(
                f"ULD cannot follow this KV cache: the target had {self.past} cached tokens the assistant never saw "
                "(a cache filled outside this ULD.applied block); start generation inside the block"
            )
        if self.past < self.length:  # the caller cropped its cache (a look-ahead branch): crop ours the same way
            compat.crop_cache(self.cache, self.past)
        return self.cache


def train_uld(
    model: Model,
    forget: Examples,
    retain: Examples = (),
    *,
    layers: int = 4,
    alpha: float = 1.0,
    retain_weight: float = 1.0,
    target: Target | None = None,
    config: UnlearnConfig = UnlearnConfig(),
) -> ULD:
    """Build an assistant from ``model``'s first ``layers`` layers and train it on the reversed objectives.

    ``target`` chooses what of the assistant trains (default: all its decoder layers; a
    :class:`~steerlab.training.unlearn.LoRA` as in the paper). The returned value's assistant carries the
    training record for :meth:`ULD.save`'s manifest.
    """
    _check_alpha(alpha)  # before the training, not after it
    assistant = build_assistant(model, layers=layers)
    target = target if target is not None else Layers(tuple(range(layers)))
    result = unlearn(assistant, forget, retain, objective=Reversed(retain_weight=retain_weight), target=target,
                     config=config)  # fmt: skip
    result.model.name = f"{model.name}:uld-assistant[:{layers}]"
    return ULD(result.model, alpha=alpha)
