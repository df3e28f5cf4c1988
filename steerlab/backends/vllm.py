"""steerlab interventions inside vLLM, chosen per request (the ``engines`` extra: ``make engines``).

:class:`VLLMEngine` starts vLLM on a steerlab model's checkpoint, resolves each registered intervention on the
steerlab model once (its :class:`~steerlab.plan.Plan`), and has every vLLM worker render the plans as hooks
(:mod:`steerlab.backends.vllm_worker`). Each request names its steering: ``None`` (plain), a registered name, or
:class:`Steer` ``(name, scale)``; one batch may mix them, and every row gets what it asked for. A steered request
that some step of its plan never edited raises :class:`~steerlab.errors.InterventionNotFiredError`.

What the engine must be, and why (checked when it starts, raising otherwise):

* **eager** (``enforce_eager=True``): a compiled graph would not call hooks registered after compiling;
* **no pipeline parallelism** (every worker holds every decoder layer); tensor parallelism is the path the hooks
  take as they are: ``collective_rpc`` installs them on every rank and each rank edits its whole copy of the
  residual stream the same way (tested here with one rank only);
* **prefix caching stays on**: a steered request carries a ``cache_salt`` naming its steering, so a cached prefix is
  reused only by requests steered the same way.

Example (needs vLLM; see the README's engines section):
    >>> engine = VLLMEngine(model, interventions={"refusal": Ablate(direction)})        # doctest: +SKIP
    >>> engine.generate(["How do I pick a lock?"] * 2, steer=[None, "refusal"])          # doctest: +SKIP
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from steerlab import compat
from steerlab._checks import finite_number
from steerlab.backends import vllm_worker
from steerlab.chat import POOLED_POSITIONS
from steerlab.errors import (
    EngineError,
    InterventionNotFiredError,
    InvalidValueError,
    ModelLoadError,
    UnknownPositionError,
)
from steerlab.generation import eos_ids
from steerlab.plan import Plan, resolve_plans

if TYPE_CHECKING:
    from steerlab.activations import Activations
    from steerlab.chat import Position
    from steerlab.model import Model


GATED_NAMES = {"refuse": "steerlab.gated.refuse", "comply": "steerlab.gated.comply"}


def _until_eos(ids: list[int], eos: set[int]) -> list[int]:
    """``ids`` up to (not including) the first end token, as :meth:`steerlab.generation.Decoder.tokens` returns them."""
    for k, t in enumerate(ids):
        if t in eos:
            return ids[:k]
    return ids


@dataclass(frozen=True)
class Steer:
    """One request's steering: the registered intervention ``name``, its change scaled by ``scale``."""

    name: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InvalidValueError(f"Steer needs the name of a registered intervention, got {self.name!r}")
        object.__setattr__(self, "scale", finite_number(self.scale, "Steer scale"))

    def extra_args(self, tag: str) -> dict[str, Any]:
        """The request's ``SamplingParams.extra_args`` (what the workers read)."""
        return {vllm_worker.STEER_KEY: self.name, vllm_worker.SCALE_KEY: self.scale, vllm_worker.TAG_KEY: tag}


def checkpoint_of(model: Model) -> Path:
    """The directory vLLM loads ``model`` from: an embedded model's cached checkpoint or the directory it came from."""
    from steerlab.embedded import EMBEDDED, cached_checkpoint

    if model.name in EMBEDDED:
        return cached_checkpoint(model.name)
    path = Path(str(getattr(model.hf.config, "_name_or_path", "") or model.name)).expanduser()
    if (path / "config.json").is_file():
        return path
    raise ModelLoadError(
        f"cannot tell which checkpoint directory {model.name or 'this model'} came from; pass checkpoint=... "
        "(a directory with config.json and safetensors, e.g. from model.hf.save_pretrained)"
    )


def install_args(model: Model, plans: Mapping[str, Plan]) -> tuple:
    """The arguments of the workers' ``steerlab_install``: the plans as plain data and where the registry puts the
    attention and MLP outputs in a decoder layer."""
    spec = model.spec
    return (vllm_worker.plans_to_wire(plans), spec.vllm_module("attn_out"), spec.vllm_module("mlp_out"), model.n_layers)


class VLLMEngine:
    """A vLLM engine whose requests can each be steered by an intervention registered on it.

    ``interventions``: ``{name: value}`` (AddVector, Ablate, Clamp, RankOneRedirect... or a Plan), resolved on
    ``model`` (which must be the checkpoint vLLM loads). ``kv_cache_bytes`` sizes vLLM's KV cache explicitly (its
    ``gpu_memory_utilization`` counts the whole process, steerlab's own copy of the model included, against a share
    of RAM on CPU). ``llm_options`` pass through to ``vllm.LLM``.
    """

    def __init__(
        self,
        model: Model,
        interventions: Mapping[str, Any] | None = None,
        *,
        checkpoint: str | Path | None = None,
        kv_cache_bytes: int = 1 << 30,
        max_model_len: int = 2048,
        seed: int = 0,
        llm_options: Mapping[str, Any] | None = None,
    ) -> None:
        for what, value in (("kv_cache_bytes", kv_cache_bytes), ("max_model_len", max_model_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidValueError(f"{what} must be a positive int; got {value!r}")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process (CPU here)
        vllm = compat.import_vllm()
        self.model = model
        self.checkpoint = Path(checkpoint).expanduser() if checkpoint is not None else checkpoint_of(model)
        options = {"enforce_eager": True, **(llm_options or {}), "worker_extension_cls": vllm_worker.WORKER_EXTENSION}
        dtype = str(model.dtype).removeprefix("torch.")
        with compat.vllm_warnings_silenced():
            self.llm = vllm.LLM(
                model=str(self.checkpoint), tokenizer=str(self.checkpoint), dtype=dtype,
                kv_cache_memory_bytes=kv_cache_bytes, max_model_len=max_model_len, seed=seed, **options,
            )  # fmt: skip
        settings = compat.vllm_settings(self.llm)
        if settings["compilation_mode"] != 0 or not settings["enforce_eager"]:
            raise EngineError(
                f"vLLM runs a compiled model ({settings}): hooks registered after compiling would not run; "
                "leave enforce_eager=True"
            )
        if settings["pipeline_parallel"] != 1:
            raise EngineError("steerlab's vLLM backend needs every decoder layer on every worker: pipeline_parallel_size=1")
        self.settings = settings
        self.cached_tokens: list[int] = []  # per prompt of the last generate(): prompt tokens read from the prefix cache
        self.plans: dict[str, Plan] = {}
        self._versions: dict[str, str] = {}  # a new one each time a name is (re)registered: the prefix-cache salt
        if interventions:
            self.register(interventions)

    def _engine(self) -> Any:
        """The running ``vllm.LLM``; a closed engine raises."""
        if self.llm is None:
            raise EngineError("this VLLMEngine was closed; start a new one")
        return self.llm

    # ----- interventions -----
    def register(self, interventions: Mapping[str, Any]) -> None:
        """Add (or replace) named interventions, resolved on the model, and install their hooks on every worker."""
        if not isinstance(interventions, Mapping) or not interventions:
            raise InvalidValueError("register({name: intervention, ...}) needs at least one named intervention")
        plans, versions = dict(self.plans), dict(self._versions)
        for name, iv in interventions.items():
            if not isinstance(name, str) or not name:
                raise InvalidValueError(f"intervention names are non-empty strings, got {name!r}")
            plans[name], versions[name] = resolve_plans(self.model, [iv])[0], uuid.uuid4().hex
        self._engine().collective_rpc("steerlab_install", args=install_args(self.model, plans))
        self.plans, self._versions = plans, versions

    # ----- generation -----
    def requests(self, steer: Any, n: int) -> list[Steer | None]:
        """``steer`` (None, a name, a :class:`Steer`, or one of those per prompt) as one entry per prompt."""
        one = steer is None or isinstance(steer, str | Steer)
        items = [steer] * n if one else list(steer)
        if len(items) != n:
            raise InvalidValueError(f"steer has {len(items)} entries for {n} prompts; give one per prompt (None: plain)")
        out: list[Steer | None] = []
        for item in items:
            request = Steer(item) if isinstance(item, str) else item
            if request is not None and not isinstance(request, Steer):
                raise InvalidValueError(f"a request's steering is None, a name or Steer(name, scale), not {type(item).__name__}")
            if request is not None and request.name not in self.plans:
                raise InvalidValueError(f"no intervention named {request.name!r} is registered; registered: {sorted(self.plans)}")
            out.append(request)
        return out

    def generate(
        self,
        prompts: Sequence[str],
        *,
        steer: Any = None,
        max_new_tokens: int = 64,
        chat: bool = True,
        system: str | None = None,
        temperature: float = 0.0,
        ignore_eos: bool = False,
    ) -> list[str]:
        """Continuations of ``prompts`` (rendered through the model's chat template and decoded by its tokenizer, as
        ``model.generate`` does), each steered as ``steer`` says; greedy unless ``temperature`` > 0; ``ignore_eos``:
        always ``max_new_tokens`` tokens (benchmarks)."""
        if isinstance(prompts, str) or not prompts:
            raise InvalidValueError("generate takes a non-empty list of prompts")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InvalidValueError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}")
        ids = self._generate_ids(prompts, steer=steer, max_new_tokens=max_new_tokens, chat=chat, system=system,
                                 temperature=temperature, ignore_eos=ignore_eos)  # fmt: skip
        return self.model.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def generate_gated(
        self, prompts: Sequence[str], gated: Any, *, max_new_tokens: int = 64, chat: bool = True, system: str | None = None
    ) -> list[Any]:
        """A :class:`~steerlab.interventions.gated.GatedRefusal` inside vLLM: the guard reads each prompt in the engine
        (:meth:`collect`; a :class:`~steerlab.interventions.token_guard.RefusalTokenGuard` reads the same token ids
        with its own fine-tuned HF model), and each request is steered with ``gated.refuse`` (score >= high), ``gated.comply``
        (score < low) or nothing; greedy. One :class:`~steerlab.interventions.gated.GatedOutput` per prompt, as
        ``model.generate(prompts, policy=gated)`` returns on the HF path."""
        from steerlab.interventions.gated import GatedOutput, GatedRefusal

        if not isinstance(gated, GatedRefusal):
            raise InvalidValueError(f"generate_gated takes a GatedRefusal, not {type(gated).__name__}")
        if isinstance(prompts, str) or not prompts:
            raise InvalidValueError("generate_gated takes a non-empty list of prompts")
        rows = self.model.chat(system=system, chat=chat).tokenize(list(prompts))  # once: guard and engine get these ids
        if gated.reads_other_model:  # a refusal-token guard: its own (HF) model reads the token ids vLLM will get
            scores = gated.guard.score_rows(self.model, rows)
        else:
            position = gated.read_position
            acts = self.collect(prompts, layers=gated.read_layers, positions=[position], chat=chat, system=system)
            scores = gated.score_states(acts["resid_pre", position][:, :, -1])
        actions = gated.actions(scores)
        branches = {GATED_NAMES[a]: iv for a, iv in (("refuse", gated.refuse), ("comply", gated.comply)) if iv is not None}
        self.register(branches)
        steer = [GATED_NAMES[a] if a != "leave" else None for a in actions]
        ids = self._generate_ids(prompts, steer=steer, max_new_tokens=max_new_tokens, chat=chat, system=system, rows=rows)
        texts = self.model.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [GatedOutput(text=t, tokens=i, score=float(s), action=a) for t, i, s, a in zip(texts, ids, scores.tolist(), actions)]

    def _generate_ids(
        self, prompts: Sequence[str], *, steer: Any, max_new_tokens: int, chat: bool, system: str | None,
        temperature: float = 0.0, ignore_eos: bool = False, rows: list | None = None,
    ) -> list[list[int]]:  # fmt: skip
        """The generated ids of each prompt (see :meth:`generate`); ``rows``: the prompts already tokenized."""
        vllm = compat.import_vllm()
        requests = self.requests(steer, len(prompts))
        if rows is None:
            rows = self.model.chat(system=system, chat=chat).tokenize(list(prompts))
        inputs, params, tags = [], [], []
        for (ids, *_), request in zip(rows, requests):
            tag = uuid.uuid4().hex
            prompt = vllm.inputs.TokensPrompt(prompt_token_ids=list(ids))
            extra = None
            if request is not None:
                prompt["cache_salt"] = vllm_worker.cache_salt(request.name, request.scale, self._versions[request.name])
                extra = request.extra_args(tag)
            inputs.append(prompt)
            params.append(vllm.SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=0, extra_args=extra,
                                              detokenize=False, ignore_eos=ignore_eos))  # fmt: skip
            tags.append(tag)
        with compat.vllm_warnings_silenced():
            outputs = self._engine().generate(inputs, params, use_tqdm=False)
        self.cached_tokens = [int(out.num_cached_tokens or 0) for out in outputs]
        self._check_fired(requests, tags)
        eos = set() if ignore_eos else eos_ids(self.model)
        return [_until_eos(list(out.outputs[0].token_ids), eos) for out in outputs]

    def collect(
        self,
        prompts: Sequence[str],
        *,
        layers: Sequence[int] | int | None = None,
        positions: Position | Sequence[Position] = ("last",),
        chat: bool = True,
        system: str | None = None,
    ) -> Activations:
        """``resid_pre`` at ``layers`` and fixed-width or pooled ``positions`` for every prompt, read inside vLLM (one prefill
        per prompt, batched by vLLM's scheduler): the same :class:`~steerlab.activations.Activations` layout as
        :func:`steerlab.collect` (``[n_prompts, n_layers, n_positions, d]``, float32). Prompts run plain, and
        without the prefix cache (a token read from the cache is never computed, so it could not be recorded)."""
        from steerlab.activations import Activations, _check_positions

        vllm = compat.import_vllm()
        if isinstance(prompts, str) or not prompts:
            raise InvalidValueError("collect takes a non-empty list of prompts")
        wanted_layers = self.model.layer_indices(layers)
        names = _check_positions(positions)
        if "all" in names:
            raise UnknownPositionError("VLLMEngine.collect reads fixed-width positions; use steerlab.collect for 'all'")
        fmt = self.model.chat(system=system, chat=chat)
        rows = fmt.tokenize(list(prompts))
        reads = [[tokens[0] for tokens in map(fmt.pad([row]).tokens, names)] for row in rows]  # per prompt, per position
        widths = [1 if p in POOLED_POSITIONS else len(t) for p, t in zip(names, reads[0])]
        inputs, params, tags = [], [], []
        for (ids, *_), wanted in zip(rows, reads):
            tag = uuid.uuid4().hex
            inputs.append(vllm.inputs.TokensPrompt(prompt_token_ids=list(ids), cache_salt=f"steerlab-read-{tag}"))
            extra = {vllm_worker.READ_KEY: sorted({t for tokens in wanted for t in tokens}), vllm_worker.TAG_KEY: tag}
            params.append(vllm.SamplingParams(max_tokens=1, temperature=0.0, extra_args=extra))
            tags.append(tag)
        self._engine().collective_rpc("steerlab_install", args=(*install_args(self.model, self.plans), wanted_layers))
        try:
            with compat.vllm_warnings_silenced():
                self._engine().generate(inputs, params, use_tqdm=False)
            recorded = self._engine().collective_rpc("steerlab_take_recorded")[0]  # every rank holds the whole stream
        finally:
            self._engine().collective_rpc("steerlab_install", args=install_args(self.model, self.plans))
        shard: dict[str, torch.Tensor] = {"__order__": torch.arange(len(rows)), "__lengths__": torch.tensor([len(r[0]) for r in rows])}
        for k, (name, width) in enumerate(zip(names, widths)):
            out = torch.empty(len(rows), len(wanted_layers), width, self.model.d_model)
            for i, (tag, wanted) in enumerate(zip(tags, reads)):
                got = recorded.get(tag, {})
                for j, layer in enumerate(wanted_layers):
                    missing = [t for t in wanted[k] if (layer, t) not in got]
                    if missing:
                        raise EngineError(f"vLLM never computed token {missing[0]} of prompt {i} at layer {layer}")
                    states = torch.stack([got[(layer, t)].float() for t in wanted[k]])
                    out[i, j] = states.mean(0, keepdim=True) if name in POOLED_POSITIONS else states
            shard[f"resid_pre/{name}"] = out
        return Activations(layers=wanted_layers, sites=["resid_pre"], positions=names, n_prompts=len(rows), _shards=[shard])

    def _check_fired(self, requests: Sequence[Steer | None], tags: Sequence[str]) -> None:
        fired: dict[str, set[int]] = {}
        for worker in self._engine().collective_rpc("steerlab_take_fired"):
            for tag, steps in worker.items():
                fired.setdefault(tag, set()).update(steps)
        for i, (request, tag) in enumerate(zip(requests, tags)):
            if request is None:
                continue
            plan = self.plans[request.name]
            missing = [plan.steps[j].where for j in range(len(plan.steps)) if j not in fired.get(tag, set())]
            if missing:
                raise InterventionNotFiredError(
                    f"request {i} asked for {request.name!r} ({plan.source}) but vLLM ran without its step(s) at "
                    f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} (tokens='generated' with one new token?)"
                )

    def close(self) -> None:
        """Remove the hooks from every worker and shut the engine down (its memory is freed; idempotent)."""
        if self.llm is None:
            return
        try:
            self.llm.collective_rpc("steerlab_remove")
        finally:
            compat.vllm_shutdown(self.llm)
            self.llm, self.plans = None, {}
