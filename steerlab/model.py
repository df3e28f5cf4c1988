"""Loading models: :func:`load` returns a :class:`Model` (HF model + tokenizer + ArchSpec + chat anatomy).

Example:
    >>> import steerlab
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from steerlab.testing import tiny_tokenizer
    >>> config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    >>> hf = LlamaForCausalLM(config)
    >>> model = steerlab.load(hf, tiny_tokenizer())             # a transformers model and its tokenizer
    >>> model.n_layers, model.d_model, model.n_heads
    (2, 64, 4)

    An embedded model loads by name, without network (SmolLM2: 30 layers, d_model 576; the first load
    converts its GGUF, later loads take seconds):

    >>> model = steerlab.load("smollm2-135m-instruct")           # doctest: +SKIP
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steerlab import compat, sources
from steerlab._checks import layer_list
from steerlab.arch import ArchSpec, normalize_layer, spec_for
from steerlab.backends import hf as hf_backend
from steerlab.chat import ChatFormat, EncodedBatch, check_template
from steerlab.embedded import DEFAULT_MODEL, EMBEDDED, cached_checkpoint
from steerlab.errors import HookSessionError, InvalidValueError, ModelLoadError
from steerlab.generation import GenerationPolicy
from steerlab.generation import generate as generate_loop
from steerlab.hooks import HookSession
from steerlab.plan import Plan, resolve_plans


class _OnceContext(AbstractContextManager):
    """A generator context manager that says so, with a steerlab error, when it is entered a second time."""

    def __init__(self, inner: AbstractContextManager) -> None:
        self._inner, self._entered = inner, False

    def __enter__(self):
        if self._entered:
            raise HookSessionError(
                "this model.apply(...) scope was already entered; a scope is used once: write "
                "`with model.apply(op):` again (the op value can be reused) instead of re-entering the same object"
            )
        self._entered = True
        return self._inner.__enter__()

    def __exit__(self, *exc_info):
        return self._inner.__exit__(*exc_info)


def _single_use(fn):
    """Like ``contextlib.contextmanager``, but re-entering the returned object raises :class:`HookSessionError`."""
    make = contextmanager(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> _OnceContext:
        return _OnceContext(make(*args, **kwargs))

    return wrapper


@dataclass
class Model:
    """A loaded causal LM with everything steerlab needs to look inside it.

    ``hf`` is the plain transformers model (hooks are only added inside ``model.hooks()``
    scopes), ``spec`` says where its parts live, ``chat`` analyses its chat template.
    """

    hf: nn.Module
    tokenizer: Any
    spec: ArchSpec
    name: str
    system: str | None = None
    _formats: dict[tuple, ChatFormat] = field(default_factory=dict, repr=False)

    # ----- shape facts -----
    @property
    def config(self):
        """The HF config."""
        return self.hf.config

    @property
    def n_layers(self) -> int:
        """Number of decoder layers."""
        return self.spec.count(self.hf)

    @property
    def d_model(self) -> int:
        """Residual stream width."""
        return int(self.hf.config.hidden_size)

    @property
    def n_heads(self) -> int:
        """Attention (query) heads per layer."""
        return self.spec.num_heads(self.hf.config)

    @property
    def head_dim(self) -> int:
        """Width of one head's output entering ``o_proj``."""
        return self.spec.head_dim(self.hf)

    @property
    def device(self) -> torch.device:
        """Device of the input embeddings."""
        return self.hf.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype."""
        return next(self.hf.parameters()).dtype

    def layer(self, index: int) -> nn.Module:
        """Decoder layer ``index`` (negative counts from the end)."""
        return self.spec.decoder_layers(self.hf)[normalize_layer(index, self.n_layers)]

    def layer_indices(self, layers: Sequence[int] | int | None = None) -> list[int]:
        """Normalise ``None`` (all), one index or a list of indices into sorted unique layer numbers.

        Python, numpy and torch integers are accepted; bools, floats and strings are not (``layers="3"``
        raises rather than reading the characters). Duplicates collapse into one layer.
        """
        if layers is None:
            return list(range(self.n_layers))
        return sorted({normalize_layer(i, self.n_layers) for i in layer_list(layers)})

    # ----- chat and tokens -----
    def chat(self, *, system: str | None = None, chat: bool = True, reasoning_end: str | None = None) -> ChatFormat:
        """The :class:`~steerlab.chat.ChatFormat` for these settings (cached)."""
        key = (system if system is not None else self.system, chat, reasoning_end)
        if key not in self._formats:
            self._formats[key] = ChatFormat(self.tokenizer, system=key[0], chat=chat, reasoning_end=reasoning_end)
        return self._formats[key]

    def encode(
        self,
        prompts: Sequence[str],
        *,
        responses: Sequence[str] | None = None,
        chat: bool = True,
        system: str | None = None,
        reasoning_end: str | None = None,
    ) -> EncodedBatch:
        """Render prompts through the chat template and return a left-padded batch on the model's device."""
        fmt = self.chat(system=system, chat=chat, reasoning_end=reasoning_end)
        return fmt.encode(prompts, responses=responses).to(self.device)

    # ----- hooks -----
    def hooks(self, *, check_fired: bool = True) -> HookSession:
        """A scoped :class:`~steerlab.hooks.HookSession`: ``with model.hooks() as hooks: ...``."""
        return HookSession(self, check_fired=check_fired)

    def plan(self, *interventions: Any) -> Plan:
        """The :class:`~steerlab.plan.Plan` of ``interventions`` on this model (each resolved, checked, once).

        Example:
            >>> from steerlab.testing import tiny_model, tiny_direction
            >>> model = tiny_model("llama")
            >>> [s.where for s in model.plan(steerlab.AddVector(tiny_direction(model, layer=1), coeff=2.0)).steps]
            ['resid_pre @ 1']
        """
        plans = resolve_plans(self, interventions)
        return functools.reduce(lambda a, b: a + b, plans)

    def render(self, plan: Plan, session: HookSession, *, rows: Any = None) -> list[Any]:
        """Render ``plan`` as hooks on an open ``session`` (what :meth:`apply` does); ``rows`` gates them per batch
        row (a callable returning a bool mask, see :func:`steerlab.backends.hf.gated_by_rows`): generation
        policies such as ``GatedRefusal`` use it."""
        return hf_backend.render(plan, session, rows=rows)

    @_single_use
    def apply(self, *interventions: Any, check_fired: bool = True) -> Iterator[HookSession]:
        """Apply interventions (or plans) as hooks for the duration of a ``with`` block.

        Each intervention is resolved to a :class:`~steerlab.plan.Plan` (:meth:`plan`) and rendered by
        :mod:`steerlab.backends.hf`; every hook is removed on exit, and one that never acted raises. A generation
        policy (``GatedRefusal``, ``ADAGuard``, ``RefusalTokens``; at most one) makes every ``generate`` in the scope
        decode with it and return texts; its per-row outputs collect in ``session.policy_outputs``
        (:mod:`steerlab.policy_scope`).

        Example:
            >>> from steerlab.testing import tiny_model, tiny_direction
            >>> model = tiny_model("llama")
            >>> with model.apply(steerlab.Ablate(tiny_direction(model, layer=1))):
            ...     _ = model.generate(["Hi"], max_new_tokens=2)
        """
        from steerlab.policy_scope import applied_policy

        policies = [iv for iv in interventions if isinstance(iv, GenerationPolicy) and not callable(getattr(iv, "resolve", None))]
        edits = [iv for iv in interventions if not any(iv is p for p in policies)]
        if len(policies) > 1:
            raise InvalidValueError(f"one generation policy per scope, got {[type(p).__name__ for p in policies]}")
        plan = self.plan(*edits) if edits or not policies else None
        with self.hooks(check_fired=check_fired) as session:
            if plan is not None:
                hf_backend.render(plan, session)
            if not policies:
                yield session
                return
            with applied_policy(self, policies[0], session):
                yield session

    def generate(
        self,
        prompts: Sequence[str],
        *,
        policy: GenerationPolicy | None = None,
        max_new_tokens: int = 64,
        batch_size: int = 16,
        chat: bool = True,
        system: str | None = None,
        responses: Sequence[str] | None = None,
        progress: bool = False,
        **kwargs,
    ) -> list[Any]:
        """Generation in length-sorted batches (:func:`steerlab.generation.generate`); one result per prompt,
        in prompt order. Active ``model.apply`` scopes apply, and see which tokens are the prompt's.
        ``responses`` prefills the start of each assistant turn (a prefill attack); the continuation follows it.

        ``policy=None``: greedy transformers ``generate`` (``kwargs`` may change that, e.g. ``do_sample=True``);
        returns the decoded continuations, ``list[str]``. With a generation policy (``ADAGuard``,
        ``RefusalTokens``): greedy decoding that consults it; returns its per-row outputs
        (``ADAOutput``, ``RefusalTokenOutput``), no ``kwargs``.

        Example:
            >>> from steerlab.testing import tiny_model
            >>> model = tiny_model("llama")
            >>> texts = model.generate(["Write a haiku."], max_new_tokens=4)
            >>> isinstance(texts[0], str)
            True
        """
        return generate_loop(
            self, prompts, policy=policy, max_new_tokens=max_new_tokens, batch_size=batch_size, chat=chat,
            system=system, responses=responses, progress=progress, **kwargs,
        )  # fmt: skip


def load(
    source: Any = None,
    tokenizer: Any = None,
    *,
    dtype: torch.dtype | str | None = torch.float32,
    device_map: Any = None,
    trust_remote_code: bool = False,
    chat_template: str | None = None,
    system: str | None = None,
) -> Model:
    """Load a model from any supported source and wrap it.

    ``source`` may be ``None`` (the embedded default, ``qwen2.5-coder-0.5b-instruct``), an embedded
    name (``"smollm2-135m-instruct"``), a local directory, a ``.gguf`` file, a HF model id that is in
    the local Hugging Face cache (steerlab never downloads), an already-loaded ``PreTrainedModel``
    (pass its ``tokenizer``), a TransformerLens ``TransformerBridge`` or an nnsight ``LanguageModel``
    (both unwrapped to the HF model). A string that exists, starts with ``.``, ``~`` or ``/``, or
    cannot be a hub id is a path (see :mod:`steerlab.sources`). ``dtype`` and ``device_map`` pass
    through to ``from_pretrained``; ``trust_remote_code`` stays off unless you turn it on.
    ``chat_template`` sets a template on a tokenizer that lacks one (or replaces a broken one); a
    template that is not valid Jinja raises :class:`~steerlab.errors.ChatTemplateError` here.

    Example:
        >>> from steerlab.testing import tiny_model, tiny_tokenizer
        >>> hf = tiny_model("llama").hf                         # a transformers model already in memory
        >>> model = steerlab.load(hf, tiny_tokenizer("llama3"), system="Be brief.")
        >>> model.spec.model_type, "Be brief." in model.tokenizer.decode(model.encode(["Hi"]).input_ids[0])
        ('llama', True)

        An embedded model by name (its GGUF is converted on first use, then cached):

        >>> model = steerlab.load("smollm2-135m-instruct", dtype=torch.bfloat16)   # doctest: +SKIP
    """
    hf, tok, name = _resolve(source, tokenizer, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code)
    if tok is None:
        raise ModelLoadError(f"no tokenizer for {name}: pass it as steerlab.load(model, tokenizer)")
    if chat_template is not None:
        check_template(chat_template, where="the chat_template passed to steerlab.load")
        tok.chat_template = chat_template
    elif getattr(tok, "chat_template", None):
        check_template(tok.chat_template, where=f"the chat template of {name}'s tokenizer")
    hf.eval()
    spec = spec_for(hf)
    spec.decoder_layers(hf)  # fails early, with the registry's message, if the layout does not match
    return Model(hf=hf, tokenizer=tok, spec=spec, name=name, system=system)


def _from_pretrained(path: str, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = kwargs.pop("gguf_file", None)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    extra["local_files_only"] = True  # steerlab never downloads (sources.py checked the cache already)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=kwargs["trust_remote_code"], **extra)
        hf = AutoModelForCausalLM.from_pretrained(path, **{k: v for k, v in kwargs.items() if v is not None}, **extra)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load {path!r}: {exc}. Pass an embedded name ({', '.join(sorted(EMBEDDED))}), a local "
            "directory, a .gguf file, or a Hugging Face id in the local cache (steerlab does not download)."
        ) from exc
    if gguf_file:
        compat.drop_quantizer(hf)  # dequantised weights: keep save_pretrained working
    _own_memory(hf)
    return hf, tok


@torch.no_grad()
def _own_memory(hf: nn.Module) -> None:
    """Move CPU weights out of the checkpoint's memory map into fresh, aligned memory.

    ``from_pretrained`` leaves safetensors weights memory-mapped from the file at whatever alignment
    the file gives them; on CPU the matmuls then run ~10% slower than on a fresh copy. Tied
    weights are one Parameter, so they stay tied.
    """
    for tensor in [*hf.parameters(), *hf.buffers()]:
        if tensor.device.type == "cpu" and type(tensor.data) is torch.Tensor:
            tensor.data = tensor.data.clone()


def _resolve(source, tokenizer, **kwargs):
    from transformers import PreTrainedModel

    if source is None:
        source = DEFAULT_MODEL
    if isinstance(source, PreTrainedModel):
        return source, tokenizer, getattr(source.config, "_name_or_path", type(source).__name__)
    wrapped = compat.unwrap_interop(source)
    if wrapped is not None:
        hf, tok = wrapped
        return hf, tokenizer or tok, getattr(hf.config, "_name_or_path", type(hf).__name__)
    if not isinstance(source, (str, Path)):
        raise ModelLoadError(
            f"cannot load a {type(source).__name__}; pass a name, path, PreTrainedModel, TransformerBridge "
            "or nnsight LanguageModel"
        )
    text = str(source)
    if not text.strip():
        raise ModelLoadError("the model source is an empty string; pass an embedded name, a path or a Hugging Face id")
    if text in EMBEDDED:
        hf, tok = _from_pretrained(str(cached_checkpoint(text)), **kwargs)
        return hf, tokenizer or tok, text
    if not sources.is_path_like(text):  # a hub id: decided from the local cache alone, no hub round trips
        if not sources.hub_cached(text):
            raise sources.unavailable(text, EMBEDDED)
        hf, tok = _from_pretrained(text, **kwargs)
        return hf, tokenizer or tok, text
    path = Path(text).expanduser()
    if sources.local_kind(path) == "gguf":
        hf, tok = _from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
        return hf, tokenizer or tok, path.name
    hf, tok = _from_pretrained(str(path), **kwargs)
    return hf, tokenizer or tok, text
