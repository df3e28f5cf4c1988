"""One reader: the batched forward engine every measurement uses.

:func:`read` renders prompts with the chat template, runs them in length-sorted, left-padded
batches, and hands what each :class:`Tap` reads to its reducer, which keeps only what it needs (a
running sum, chosen positions, per-prompt rows). The forward pass stops after the last layer any tap
(or an enclosing ``model.apply`` / ``model.hooks`` scope) needs, unless logits are read.

A tap reads

* a named site (``resid_pre``, ``head``, ``router_logits``, ...; see :mod:`steerlab.hooks`) at a layer: the
  reducer gets the activation ``[b, s, ...]``;
* a module inside the decoder layer (``module="mlp.down_proj"``): ``site="input"`` hands its first input
  ``[b, s, in]``, ``site="output"`` its output as returned (a tensor or a tuple), ``site="call"`` the
  ``(args, kwargs)`` of the call (for modules with several inputs, such as fused experts);
* the logits (``site="logits"``): ``[b, 1, vocab]`` (only the last position is unembedded) or, with
  ``all_logits=True``, ``[b, s, vocab]``.

A reducer has ``update(x, rows, layer)`` and ``result()``; :class:`Rows` says which prompts the batch
holds and where their tokens are. :class:`PerPrompt` and :class:`TokenMean` cover the common cases.

Example:
    >>> from steerlab.reader import PerPrompt, Tap, TokenMean, read
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")                     # 3 layers, d_model 64, 96 MLP neurons, vocab 400
    >>> last = PerPrompt("last")
    >>> (acts,) = read(model, ["Hi", "Say hello."], taps=[Tap("resid_post", 2, last)])
    >>> acts.shape
    torch.Size([2, 64])
    >>> taps = [Tap("input", 1, TokenMean(), module="mlp.down_proj"), Tap("logits", None, PerPrompt("last"))]
    >>> keys, logits = read(model, ["Hi", "Say hello."], taps=taps)
    >>> keys.shape, logits.shape                        # mean down_proj input over every token; last-token logits
    (torch.Size([96]), torch.Size([2, 400]))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from steerlab.arch import normalize_layer, resolve_path
from steerlab.chat import EncodedBatch, Position
from steerlab.errors import EmptyInputError, InterventionNotFiredError, InvalidValueError
from steerlab.hooks import HookContext, StopForward, check_site, open_sessions

if TYPE_CHECKING:
    from steerlab.model import Model

MODULE_SITES = ("input", "output", "call")


@dataclass(frozen=True)
class Rows:
    """The batch a reducer is shown: ``idx[i]`` is the prompt index of row ``i``; ``offset`` is the padded
    position of the tensor's first token (``S - 1`` for last-position logits, else 0)."""

    idx: list[int]
    batch: EncodedBatch
    n_prompts: int
    offset: int = 0

    def mask(self, device: torch.device) -> torch.Tensor:
        """[b, s] bool: the real (non-pad) tokens of the tensor's span."""
        return self.batch.attention_mask[:, self.offset :].bool().to(device)


class Reducer(Protocol):
    """Keeps what a measurement needs from each batch."""

    def update(self, x: Any, rows: Rows, layer: int) -> None: ...

    def result(self) -> Any: ...


@dataclass(frozen=True)
class Tap:
    """Read ``site`` at ``layer`` (a named site, or ``module``'s ``input`` / ``output`` / ``call``) into ``reducer``."""

    site: str
    layer: int | None
    reducer: Reducer
    module: str | nn.Module | None = None  # a path inside the decoder layer, or the module itself


def select_tokens(x: torch.Tensor, rows: Rows, position: Position) -> torch.Tensor:
    """x [b, s, ...] -> the per-row mean over the tokens of ``position`` -> [b, ...] (padding excluded)."""
    if position == "all":
        mask = rows.mask(x.device).to(x.dtype).reshape(*x.shape[:2], *([1] * (x.dim() - 2)))
        return (x * mask).sum(1) / mask.sum(1)
    return rows.batch.take(x, position, shift=rows.offset).mean(1)


class PerPrompt:
    """One row per prompt: the mean over ``position``'s tokens (in float64 without ``fn``), through ``fn`` if
    given; ``result()`` stacks them in prompt order (on CPU, in the dtype they have)."""

    def __init__(self, position: Position = "last", fn: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.position, self.fn = position, fn
        self.out: dict[int, torch.Tensor] = {}

    def update(self, x: torch.Tensor, rows: Rows, layer: int) -> None:
        picked = select_tokens(x.double() if self.fn is None else x, rows, self.position)
        values = (picked if self.fn is None else self.fn(picked)).cpu()
        for i, row in enumerate(rows.idx):
            self.out[row] = values[i]

    def result(self) -> torch.Tensor:
        return torch.stack([self.out[i] for i in range(len(self.out))])


class TokenMean:
    """The mean over every selected token of every prompt (float64 sums): ``position="all"`` takes the
    non-pad tokens, a named or negative position its tokens in each row. ``result()`` is float32 on CPU."""

    def __init__(self, position: Position = "all"):
        self.position = position
        self.sum: torch.Tensor | float = 0.0
        self.count = 0

    def update(self, x: torch.Tensor, rows: Rows, layer: int) -> None:
        if self.position == "all":
            picked = x[rows.mask(x.device)]
        else:
            picked = rows.batch.take(x, self.position, shift=rows.offset).reshape(-1, *x.shape[2:])
        self.sum = self.sum + picked.double().sum(0).cpu()
        self.count += picked.shape[0]

    def result(self) -> torch.Tensor:
        return (self.sum / self.count).float()


def stop_layer(model: Model, last: int) -> int | None:
    """The layer after whose ``resid_post`` a read may stop: ``last``, or the deepest layer an open hook session
    hooks (so its hooks still fire). ``None``: run the whole forward (a session hooks a module at an unknown depth)."""
    deepest = last
    for session in open_sessions(model):
        for handle in session.handles:
            if handle.layer < 0:
                return None
            deepest = max(deepest, handle.layer)
    return deepest


def _module_hook(tap: Tap, state: dict, n_layer: int):
    def hook(module, args, kwargs, output=None):
        rows: Rows = state["rows"]
        if tap.site == "call":
            tap.reducer.update((args, kwargs), rows, n_layer)
        elif tap.site == "input":
            x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            x = x.detach()
            tap.reducer.update(x.view(len(rows.idx), -1, x.shape[-1]) if x.dim() == 2 else x, rows, n_layer)
        else:
            tap.reducer.update(output, rows, n_layer)

    return hook


def read(
    model: Model,
    prompts: Sequence[str],
    *,
    taps: Sequence[Tap],
    batch_size: int = 16,
    chat: bool = True,
    system: str | None = None,
    responses: Sequence[str] | None = None,
    all_logits: bool = False,
    progress: bool = False,
    desc: str = "reading",
) -> list[Any]:
    """Run ``prompts`` through ``model`` once, feeding every tap's reducer; returns ``[tap.reducer.result(), ...]``
    in tap order. Runs inside whatever ``model.apply`` scope is active (see module docs)."""
    if isinstance(prompts, str) or len(prompts) == 0:
        raise EmptyInputError("pass a non-empty list of prompts (wrap a single string: [prompt])")
    if not taps:
        raise EmptyInputError("pass at least one Tap to read")
    logits = [t for t in taps if t.site == "logits"]
    layered = [t for t in taps if t.site != "logits"]
    state: dict[str, Any] = {}

    def stop(x: torch.Tensor, ctx: HookContext) -> None:
        raise StopForward

    fmt = model.chat(chat=chat, system=system)
    rows = fmt.tokenize(list(prompts), responses=responses)
    bar = tqdm(total=len(rows), desc=desc, unit="prompt", disable=not progress)
    try:
        with model.hooks() as session:
            for n, tap in enumerate(layered):
                layer = normalize_layer(tap.layer, model.n_layers)
                if tap.module is None:
                    session.add(check_site(tap.site), layer, _site_hook(tap, state), name=f"read.{tap.site}.{layer}.{n}")
                    continue
                if tap.site not in MODULE_SITES:
                    raise InvalidValueError(f"a module tap reads 'input', 'output' or 'call', got {tap.site!r}")
                module = tap.module
                if isinstance(module, str):
                    module = resolve_path(model.layer(layer), module, missing_ok=True)
                if module is None:
                    raise InterventionNotFiredError(f"layer {layer} has no module {tap.module!r}; pick a module on its path")
                session.add_module(module, _module_hook(tap, state, layer), name=f"read.{tap.site}.{layer}.{n}",
                                   layer=layer, pre=tap.site != "output", with_kwargs=True)  # fmt: skip
            last = stop_layer(model, max(normalize_layer(t.layer, model.n_layers) for t in layered)) if layered else None
            if not logits and last is not None:
                session.add("resid_post", last, stop, name="read.stop")
            keep = {} if all_logits and logits else {"logits_to_keep": 1}  # unembed one position at most
            for idx, batch in fmt.batches(rows, batch_size):
                batch = batch.to(model.device)
                state["rows"] = Rows(idx, batch, len(rows))
                with torch.inference_mode():
                    try:
                        out = model.hf(**batch.model_inputs(), use_cache=False, **keep)
                    except StopForward:
                        out = None
                if logits:
                    x = out.logits
                    at = Rows(idx, batch, len(rows), offset=batch.input_ids.shape[1] - x.shape[1])
                    for tap in logits:
                        tap.reducer.update(x, at, -1)
                bar.update(len(idx))
    finally:
        bar.close()
    return [tap.reducer.result() for tap in taps]


def _site_hook(tap: Tap, state: dict):
    def hook(x: torch.Tensor, ctx: HookContext) -> None:
        tap.reducer.update(x, state["rows"], ctx.layer)

    return hook
