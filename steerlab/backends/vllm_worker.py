"""The worker half of the vLLM backend: plans rendered as hooks on vLLM's decoder layers, steering per request.

Runs inside each vLLM worker (``LLM.collective_rpc`` hands :func:`install` the worker; with tensor parallelism
every rank runs it, and since vLLM keeps the residual stream whole on every rank, each applies the same edit).
vLLM flattens a batch into one ``[tokens, d]`` tensor; the rows of each request come from the model runner
(:func:`steerlab.compat.vllm_scheduled`), and a request chooses its steering through its sampling parameters'
``extra_args``: ``{"steerlab": name, "steerlab_scale": s}`` (``s`` multiplies the change every step makes:
``x + s (edit(x) - x)``, so for an addition it is the coefficient's multiplier). Requests without the key run plain.

vLLM's decoder layers take and return ``(hidden_states, residual)`` and add the two inside the next norm, so the
residual stream is their sum: a ``resid_pre`` / ``resid_post`` edit computes ``x = hidden_states + residual``, edits
it, and passes ``(x', 0)`` on (the fused add then reproduces ``x'`` exactly). ``attn_out`` / ``mlp_out`` edit the
output of the module the registry names (:attr:`ArchSpec.attn_out`, :attr:`ArchSpec.mlp_out`).

Example (no engine needed: a stand-in layer with vLLM's calling convention):
    >>> import torch
    >>> from steerlab.plan import Add, Plan, Step
    >>> hooks = LayerSteering({"up": Plan("up", (Step(0, "resid_pre", Add(torch.ones(2))),))})
    >>> batch = Batch.of([("r0", 0, 2, 2, {"steerlab": "up", "steerlab_scale": 3.0})], torch.arange(2))
    >>> hooks.edit_residual(0, "resid_pre", torch.zeros(2, 2), batch).tolist()
    [[3.0, 3.0], [3.0, 3.0]]
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from steerlab import compat
from steerlab.arch import resolve_path
from steerlab.backends.hf import residual_edit
from steerlab.errors import EngineError, UnknownSiteError
from steerlab.plan import Add, Plan, Project, RankOne, Step

STEER_KEY, SCALE_KEY, TAG_KEY = "steerlab", "steerlab_scale", "steerlab_tag"
READ_KEY = "steerlab_read"  # token indices of the prompt whose resid_pre to record
ENGINE_SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out")


def cache_salt(name: str, scale: float, version: str, client_salt: str = "") -> str:
    """The prefix-cache salt of a steering (``version``: a fresh id per registration of ``name``): requests share
    cached blocks only when steered the same way (the offline engine and the server both use it).

    Example:
        >>> cache_salt("up", 1.0, "v1") == cache_salt("up", 1, "v1") != cache_salt("up", 2.0, "v1")
        True
    """
    key = f"{name}|{float(scale)!r}|{version}|{client_salt}"
    return "steerlab-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _scale(extra: Mapping[str, Any], req_id: str) -> float:
    raw = extra.get(SCALE_KEY, 1.0)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise EngineError(f"request {req_id}: {SCALE_KEY}={raw!r} is not a finite number")
    return value


@dataclass(frozen=True)
class Group:
    """The rows of one forward pass that one registered plan steers."""

    rows: torch.Tensor  # [n] long
    scale: torch.Tensor  # [n, 1] float32
    generated: torch.Tensor  # [n] bool: the row is a generated token (position >= its prompt length)
    request: torch.Tensor  # [n] long: index into tags
    tags: tuple[str, ...]  # one per request of the group


@dataclass(frozen=True)
class Batch:
    """Which rows of the current forward pass each registered plan steers, and which rows to record
    (``reads``: ``(tag, row, token index)``)."""

    groups: Mapping[str, Group]
    reads: tuple[tuple[str, int, int], ...] = ()

    @classmethod
    def of(cls, scheduled: Sequence[Any], positions: torch.Tensor | None, known: Collection[str] | None = None) -> Batch:
        """From the runner's scheduled requests (:class:`steerlab.compat.ScheduledRequest` or plain
        ``(req_id, start, end, num_prompt_tokens, extra_args)`` tuples) and the pass's token positions; a request
        naming a steering not in ``known`` raises (it would otherwise run plain)."""
        parts: dict[str, list[tuple[int, int, float, int, str]]] = {}
        reads: list[tuple[str, int, int]] = []
        for item in scheduled:
            req_id, start, end, n_prompt, extra = (
                (item.req_id, item.start, item.end, item.num_prompt_tokens, item.extra_args)
                if isinstance(item, compat.ScheduledRequest) else item
            )  # fmt: skip
            if READ_KEY in extra and end > start:
                if positions is None:
                    raise EngineError("the vLLM forward pass carried no token positions; steerlab cannot tell which rows to read")
                wanted = {int(i) for i in extra[READ_KEY]}
                tag = str(extra.get(TAG_KEY, req_id))
                here = positions.reshape(-1)[start:end].tolist()
                reads += [(tag, start + j, int(p)) for j, p in enumerate(here) if int(p) in wanted]
            name = extra.get(STEER_KEY)
            if name is None or end <= start:
                continue
            if known is not None and name not in known:
                raise EngineError(f"request {req_id} asks for steering {name!r}, which is not registered: {sorted(known)}")
            tag = str(extra.get(TAG_KEY, ""))  # "": nobody asks what fired (a served request), so nothing is kept
            parts.setdefault(str(name), []).append((start, end, _scale(extra, req_id), n_prompt, tag))
        groups = {}
        for name, items in parts.items():
            rows = torch.cat([torch.arange(s, e) for s, e, *_ in items])
            scale = torch.cat([torch.full((e - s,), sc) for s, e, sc, *_ in items]).unsqueeze(-1)
            prompt = torch.cat([torch.full((e - s,), n) for s, e, _, n, _ in items])
            request = torch.cat([torch.full((e - s,), i) for i, (s, e, *_) in enumerate(items)])
            if positions is None:
                raise EngineError("the vLLM forward pass carried no token positions; steerlab cannot tell prompt from generated tokens")
            generated = positions.reshape(-1)[rows].cpu() >= prompt
            groups[name] = Group(rows, scale, generated, request, tuple(t for *_, t in items))
        return cls(groups, tuple(reads))


@dataclass(frozen=True)
class _Edit:
    step_index: int
    tokens: str
    fn: Callable[[torch.Tensor], torch.Tensor]


class LayerSteering:
    """Every registered plan's steps, by ``(layer, site)``, applied to the rows that ask for them.

    ``fired[tag]`` collects the indices of the steps that edited at least one row of that request.
    """

    def __init__(self, plans: Mapping[str, Plan]):
        self.plans = dict(plans)
        self.edits: dict[tuple[int, str], list[tuple[str, _Edit]]] = {}
        for name, plan in self.plans.items():
            for i, step in enumerate(plan.steps):
                if step.site not in ENGINE_SITES or not isinstance(step.op, Add | Project | RankOne):
                    what = step.module if step.site == "module" else step.site
                    raise UnknownSiteError(
                        f"{plan.source} ({name!r}): {type(step.op).__name__} on {what} has no vLLM rendering; the vLLM "
                        f"backend renders Add, Project and RankOne on {', '.join(ENGINE_SITES)} (AddVector, Ablate, "
                        "Clamp, RankOneRedirect...). Bake the rest into the weights (steerlab.training.bake) and serve those"
                    )
                self.edits.setdefault((step.layer, step.site), []).append((name, _Edit(i, step.tokens, residual_edit(step.op))))
        self.fired: dict[str, set[int]] = {}

    @property
    def places(self) -> list[tuple[int, str]]:
        """The ``(layer, site)`` pairs that need a hook."""
        return sorted(self.edits)

    def edit_residual(self, layer: int, site: str, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``x`` [tokens, d] with every asking row edited (a new tensor when anything changed)."""
        out = x
        for name, edit in self.edits.get((layer, site), ()):
            group = batch.groups.get(name)
            if group is None:
                continue
            keep = slice(None)
            if edit.tokens != "all":
                mask = group.generated if edit.tokens == "generated" else ~group.generated
                if not bool(mask.any()):
                    continue
                keep = mask
            rows = group.rows[keep].to(x.device)
            before = out[rows]
            after = edit.fn(before)
            scale = group.scale[keep].to(device=x.device)
            if not bool((scale == 1.0).all()):
                after = before + scale.to(before.dtype) * (after - before)
            out = out.index_copy(0, rows, after)
            for r in group.request[keep].unique().tolist():
                if group.tags[r]:
                    self.fired.setdefault(group.tags[r], set()).add(edit.step_index)
        return out


class WorkerHooks:
    """The torch hooks of one worker: a pre-hook on the model reading the batch, one hook per ``(layer, site)``."""

    def __init__(
        self, worker: Any, plans: Mapping[str, Plan], *, attn_out: str, mlp_out: str, n_layers: int, read_layers: Sequence[int] = ()
    ):
        self.worker = worker
        self.steering = LayerSteering(plans)
        self.batch: Batch | None = None
        self.read_layers = sorted(set(read_layers))
        self.recorded: dict[str, dict[tuple[int, int], torch.Tensor]] = {}  # tag -> {(layer, token index): [d]}
        model = compat.vllm_model(worker)
        layers = compat.vllm_decoder_layers(model)
        if len(layers) != n_layers:
            raise EngineError(f"vLLM's model has {len(layers)} decoder layers, steerlab's {n_layers}: not the same model")
        self.handles = [model.register_forward_pre_hook(self._read_batch, with_kwargs=True)]
        try:
            for layer in self.read_layers:  # registered first: they see the layer's input before any steering edit
                self.handles.append(layers[layer].register_forward_pre_hook(self._record(layer), with_kwargs=True))
            for layer, site in self.steering.places:
                block = layers[layer]
                if site == "resid_pre":
                    self.handles.append(block.register_forward_pre_hook(self._pre(layer), with_kwargs=True))
                elif site == "resid_post":
                    self.handles.append(block.register_forward_hook(self._post(layer)))
                else:
                    path = attn_out if site == "attn_out" else mlp_out
                    module = resolve_path(block, path, missing_ok=True)
                    if not isinstance(module, nn.Module):
                        raise EngineError(f"vLLM's decoder layer {layer} has no {path!r} module for the {site} site")
                    self.handles.append(module.register_forward_hook(self._out(layer, site)))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _read_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        self.batch = Batch.of(compat.vllm_scheduled(self.worker), positions, known=self.steering.plans)

    def _current(self) -> Batch:
        if self.batch is None:
            raise EngineError("a steerlab hook ran before the model's forward pass told it the batch")
        return self.batch

    def _record(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            batch = self._current()
            if not batch.reads:
                return
            _, hidden, residual = _layer_inputs(args, kwargs, layer)
            rows = torch.tensor([row for _, row, _ in batch.reads], device=hidden.device)
            x = hidden[rows] if residual is None else hidden[rows] + residual[rows]
            for (tag, _, index), vec in zip(batch.reads, x.float().cpu()):
                self.recorded.setdefault(tag, {})[(layer, index)] = vec

        return hook

    def _pre(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            batch = self._current()
            if not batch.groups:
                return None
            positions, hidden, residual = _layer_inputs(args, kwargs, layer)
            x = hidden if residual is None else hidden + residual
            new = self.steering.edit_residual(layer, "resid_pre", x, batch)
            if new is x:
                return None
            return (positions, new, None if residual is None else torch.zeros_like(residual)), {}

        return hook

    def _post(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: Any):
            batch = self._current()
            if not batch.groups:
                return None
            if not (isinstance(output, tuple) and len(output) == 2):
                raise EngineError(f"vLLM's decoder layer {layer} returned {type(output).__name__}, not (hidden_states, residual)")
            hidden, residual = output
            x = hidden + residual
            new = self.steering.edit_residual(layer, "resid_post", x, batch)
            return None if new is x else (new, torch.zeros_like(residual))

        return hook

    def _out(self, layer: int, site: str):
        def hook(module: nn.Module, args: tuple, output: Any):
            batch = self._current()
            if not batch.groups:
                return None
            if not isinstance(output, torch.Tensor):
                raise EngineError(f"vLLM's {site} module at layer {layer} returned {type(output).__name__}, not a tensor")
            new = self.steering.edit_residual(layer, site, output, batch)
            return None if new is output else new

        return hook


def _layer_inputs(args: tuple, kwargs: dict, layer: int) -> tuple[Any, torch.Tensor, torch.Tensor | None]:
    """``(positions, hidden_states, residual)`` of a vLLM decoder layer call."""
    names = ("positions", "hidden_states", "residual")
    values = dict(zip(names, args)) | {k: kwargs[k] for k in names if k in kwargs}
    if set(values) != set(names) or not isinstance(values["hidden_states"], torch.Tensor):
        raise EngineError(
            f"vLLM's decoder layer {layer} was called with {sorted(values)}, not (positions, hidden_states, residual): "
            "this model family does not pass the residual separately, and steerlab's vLLM backend does not cover it"
        )
    return values["positions"], values["hidden_states"], values["residual"]


# ----- plans as plain data (what crosses to worker processes: tensors, strings, numbers) -----
_OPS = {"Add": (Add, ("vector",)), "Project": (Project, ("unit",)), "RankOne": (RankOne, ("left", "right"))}


def _tensor_to_wire(t: torch.Tensor) -> dict[str, Any]:
    """A tensor as a list of Python numbers and its dtype: every RPC transport carries those exactly (vLLM's
    multiprocess one turns tensors inside containers into lists)."""
    return {"dtype": str(t.dtype).removeprefix("torch."), "data": t.detach().cpu().double().tolist()}


def _tensor_from_wire(item: Mapping[str, Any]) -> torch.Tensor:
    return torch.tensor(item["data"], dtype=torch.float64).to(getattr(torch, str(item["dtype"])))


def plans_to_wire(plans: Mapping[str, Plan]) -> dict[str, Any]:
    """``plans`` as nested dicts and lists of strings and numbers (residual operations only); exact round trip.

    Example:
        >>> plan = Plan("p", (Step(2, "resid_pre", Project(torch.ones(2), 0.5)),))
        >>> back = plans_from_wire(plans_to_wire({"p": plan}))["p"]
        >>> back.steps[0].op.value, back.steps[0].layer, back.steps[0].op.unit.dtype
        (0.5, 2, torch.float32)
    """
    LayerSteering(plans)  # raises for operations the engine cannot render
    wire: dict[str, Any] = {}
    for name, plan in plans.items():
        steps = []
        for step in plan.steps:
            kind = type(step.op).__name__
            tensors = {f: _tensor_to_wire(getattr(step.op, f)) for f in _OPS[kind][1]}
            value = float(step.op.value) if isinstance(step.op, Project) else 0.0
            steps.append({"layer": step.layer, "site": step.site, "tokens": step.tokens, "op": kind, "tensors": tensors, "value": value})
        wire[name] = {"source": plan.source, "steps": steps}
    return wire


def plans_from_wire(wire: Mapping[str, Any]) -> dict[str, Plan]:
    """The inverse of :func:`plans_to_wire`."""
    plans = {}
    for name, item in wire.items():
        steps = []
        for s in item["steps"]:
            cls, fields = _OPS[s["op"]]
            args = [_tensor_from_wire(s["tensors"][f]) for f in fields] + ([float(s["value"])] if cls is Project else [])
            steps.append(Step(int(s["layer"]), str(s["site"]), cls(*args), tokens=s["tokens"]))
        plans[name] = Plan(str(item["source"]), tuple(steps))
    return plans


class SteerlabWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``): methods ``LLM.collective_rpc`` / the async
    engine's ``collective_rpc`` call by name on every worker, in whichever process (and on every TP rank) it runs."""

    def steerlab_install(
        self, wire: Mapping[str, Any], attn_out: str, mlp_out: str, n_layers: int, read_layers: Sequence[int] = ()
    ) -> int:
        """Hooks for the plans in ``wire`` and recorders at ``read_layers`` (replacing any); returns the number of
        hooked steering places."""
        return install(self, plans_from_wire(wire), attn_out, mlp_out, n_layers, read_layers)

    def steerlab_take_recorded(self) -> dict[str, dict[tuple[int, int], torch.Tensor]]:
        """``{request tag: {(layer, token index): resid_pre vector}}`` recorded since the last call (then cleared).
        Tensors: for the in-process engine (a multiprocess transport would turn them into lists)."""
        hooks = getattr(self, "steerlab_hooks", None)
        if hooks is None:
            return {}
        recorded, hooks.recorded = hooks.recorded, {}
        return recorded

    def steerlab_remove(self) -> None:
        """Remove the hooks."""
        remove(self)

    def steerlab_take_fired(self) -> dict[str, list[int]]:
        """Which steps edited which request since the last call."""
        return take_fired(self)


WORKER_EXTENSION = f"{__name__}.{SteerlabWorkerExtension.__name__}"


# ----- run in the worker -----
def install(
    worker: Any, plans: Mapping[str, Plan], attn_out: str, mlp_out: str, n_layers: int, read_layers: Sequence[int] = ()
) -> int:
    """Replace this worker's steerlab hooks by hooks for ``plans`` (and recorders of ``resid_pre`` at
    ``read_layers``); returns the number of hooked steering places."""
    remove(worker)
    hooks = WorkerHooks(worker, plans, attn_out=attn_out, mlp_out=mlp_out, n_layers=n_layers, read_layers=read_layers)
    worker.steerlab_hooks = hooks
    return len(hooks.steering.places)


def remove(worker: Any) -> None:
    """Remove this worker's steerlab hooks, if any."""
    hooks = getattr(worker, "steerlab_hooks", None)
    if hooks is not None:
        hooks.remove()
        worker.steerlab_hooks = None


def take_fired(worker: Any) -> dict[str, list[int]]:
    """``{request tag: indices of the plan steps that edited it}`` since the last call (then cleared)."""
    hooks = getattr(worker, "steerlab_hooks", None)
    if hooks is None:
        return {}
    fired = {tag: sorted(steps) for tag, steps in hooks.steering.fired.items()}
    hooks.steering.fired.clear()
    return fired
