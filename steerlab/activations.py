"""Collect activations at sites x layers x named positions over many prompts.

Prompts are sorted by length and batched with left padding (fewer pad tokens); positions are
resolved per row, so padding never shifts them; the forward pass stops right after the last
layer it needs (no later layers, no final norm, no unembedding), or after the deepest layer an
enclosing ``model.apply`` / ``model.hooks`` scope hooks, so those hooks still fire. Results are float32 on CPU,
returned in the caller's prompt order. With ``out_dir`` each batch is written to disk as it is
produced, so memory is bounded by one batch.

Layout: for a fixed-width position (``"t_inst"``, ``"last"``, ``"post_inst"``, ``-3``; a pooled mean such as
``"inst_mean"`` is one column) the tensor is ``[n_prompts, n_layers, n_positions, d]`` (``head``: ``[..., H, dh]``); for ``"all"``
it is ``[n_tokens, n_layers, d]`` with ``offsets[i]:offsets[i+1]`` the tokens of prompt ``i``.

Example:
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("qwen2")                   # 3 layers, width 64
    >>> acts = steerlab.collect(model, ["Write a poem.", "Say hi."],
    ...                         sites=["resid_pre"], positions=["last", "all"])
    >>> acts.get("resid_pre", "last").shape
    torch.Size([2, 3, 1, 64])
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from steerlab import compat
from steerlab.chat import NAMED_POSITIONS, EncodedBatch, Position, as_index, check_batch_size
from steerlab.errors import EmptyInputError, UnknownPositionError, UnknownSiteError
from steerlab.hooks import MOE_SITES, HookContext, StopForward, check_site, open_sessions
from steerlab.model import Model
from steerlab.prefix_cache import new_cache, shared_prefix_length, suffix_inputs, take_prefix


def _key(site: str, position: Position) -> str:
    return f"{site}/{position}"


@dataclass
class Activations:
    """Collected activations, indexed by (site, position). See module docs for the layout."""

    layers: list[int]
    sites: list[str]
    positions: list[Position]
    n_prompts: int
    _shards: list[dict[str, torch.Tensor]] | None = field(default=None, repr=False)
    _dir: Path | None = field(default=None, repr=False)
    _cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def get(self, site: str, position: Position) -> torch.Tensor:
        """The tensor for one site and position, in prompt order."""
        key = _key(site, position)
        if site not in self.sites or position not in self.positions:
            raise UnknownPositionError(f"{key} was not collected; collected sites {self.sites}, positions {self.positions}")
        if key not in self._cache:
            self._cache[key] = self._assemble(key, ragged=position == "all")
        return self._cache[key]

    def __getitem__(self, key: tuple[str, Position]) -> torch.Tensor:
        """``acts["resid_pre", "last"]`` is ``acts.get("resid_pre", "last")``."""
        return self.get(*key)

    def offsets(self) -> torch.Tensor:
        """Token offsets [n_prompts + 1] into the ``"all"`` tensors."""
        lengths = self._assemble("__lengths__", ragged=False)
        return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])

    def layer_slice(self, layer: int) -> int:
        """Index of ``layer`` along the layer axis."""
        return self.layers.index(layer)

    def _iter_shards(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._shards is not None:
            yield from self._shards
        else:
            assert self._dir is not None
            for path in sorted(self._dir.glob("shard_*.safetensors")):
                yield load_file(path)

    def _assemble(self, key: str, *, ragged: bool) -> torch.Tensor:
        parts, order, lengths = [], [], []
        for shard in self._iter_shards():
            parts.append(shard[key])
            order.append(shard["__order__"])
            lengths.append(shard["__lengths__"])
        order_t = torch.cat(order)
        inverse = torch.empty_like(order_t)
        inverse[order_t] = torch.arange(len(order_t))
        if not ragged:
            return torch.cat(parts)[inverse]
        # ragged: reorder whole segments of tokens
        flat, seg_len = torch.cat(parts), torch.cat(lengths)
        starts = torch.cat([torch.zeros(1, dtype=torch.long), seg_len.cumsum(0)[:-1]])
        return torch.cat([flat[starts[j] : starts[j] + seg_len[j]] for j in inverse.tolist()])

    def save(self, path: str | Path) -> Path:
        """Write to a directory (safetensors shards + ``meta.json``)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self._dir is None or self._dir.resolve() != path.resolve():
            for i, shard in enumerate(self._iter_shards()):
                save_file(shard, path / f"shard_{i:05d}.safetensors")
        (path / "meta.json").write_text(
            json.dumps({"layers": self.layers, "sites": self.sites, "positions": self.positions, "n_prompts": self.n_prompts})
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> Activations:
        """Open a saved directory; tensors are read when first asked for."""
        path = Path(path)
        meta = json.loads((path / "meta.json").read_text())
        return cls(layers=meta["layers"], sites=meta["sites"], positions=meta["positions"], n_prompts=meta["n_prompts"], _dir=path)


def _check_sites(sites) -> list[str]:
    """Site names, de-duplicated in order; one string is one site."""
    if isinstance(sites, str):
        sites = [sites]
    try:
        items = list(sites)
    except TypeError:
        raise UnknownSiteError(f"sites must be a site name or a list of them, got {sites!r}") from None
    out = list(dict.fromkeys(check_site(s) for s in items))
    if not out:
        raise EmptyInputError("sites is empty; name at least one (e.g. 'resid_pre')")
    return out


def _check_positions(positions) -> list[Position]:
    """Positions (names or negative ints; numpy / torch integers become ints), de-duplicated in order;
    one name or one int is one position."""
    if isinstance(positions, str) or as_index(positions) is not None:
        positions = [positions]
    try:
        items = list(positions)
    except TypeError:
        raise UnknownPositionError(f"positions must be a position or a list of them, got {positions!r}") from None
    out = []
    for p in items:
        idx = None if isinstance(p, str) else as_index(p)
        if not (p in NAMED_POSITIONS if isinstance(p, str) else idx is not None and idx < 0):
            raise UnknownPositionError(
                f"unknown position {p!r}; use one of {', '.join(NAMED_POSITIONS)} or a negative int (-1 = last token)"
            )
        out.append(p if isinstance(p, str) else idx)
    if not out:
        raise EmptyInputError("positions is empty; name at least one (e.g. 'last')")
    return list(dict.fromkeys(out))


def _stop_at(model: Model, layer_list: list[int], site_list: list[str]) -> tuple[str, int] | None:
    """(site, layer) where collection may stop the forward pass: the last layer it reads, or the deepest
    layer an open hook session (an enclosing ``model.apply``) hooks, so that session's hooks fire.
    ``None``: run the whole forward (an open session hooks a module at an unknown depth)."""
    last = max(layer_list)
    deepest = -1
    for session in open_sessions(model):
        for handle in session.handles:
            if handle.layer < 0:
                return None
            deepest = max(deepest, handle.layer)
    if deepest >= last:
        return "resid_post", deepest
    return ("resid_pre" if site_list == ["resid_pre"] else "resid_post"), last


def collect(
    model: Model,
    prompts: Sequence[str],
    *,
    sites: str | Iterable[str] = ("resid_pre",),
    layers: Sequence[int] | int | None = None,
    positions: Position | Sequence[Position] = ("last",),
    responses: Sequence[str] | None = None,
    batch_size: int = 16,
    chat: bool = True,
    system: str | None = None,
    reasoning_end: str | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    share_prefix: bool = True,
) -> Activations:
    """Run ``prompts`` through ``model`` and keep the chosen activations (see module docs).

    ``sites`` and ``positions`` take a list, or one item on its own (``sites="resid_post"``,
    ``positions="last"`` or ``-1``); ``layers`` takes ``None`` (all), one index or a non-empty list.

    ``responses`` prefills an assistant response after each prompt (for traces over a
    continuation); ``chat=False`` treats prompts as raw text. ``share_prefix`` computes the tokens
    every prompt starts with (the chat template's system turn) in the first batch only and reuses
    their keys and values in later batches, when no position reads them and no other hooks are
    active (see :mod:`steerlab.prefix_cache`).
    """
    prompts = list(prompts) if not isinstance(prompts, str) else [prompts]
    if not prompts:
        raise EmptyInputError("the prompt list is empty; pass at least one prompt")
    site_list = _check_sites(sites)
    layer_list = model.layer_indices(layers)
    if not layer_list:
        raise EmptyInputError("layers is empty; pass at least one layer index, or layers=None for every layer")
    pos_list = _check_positions(positions)
    batch_size = check_batch_size(batch_size)
    for s in site_list:
        dense = [la for la in layer_list if s in MOE_SITES and model.spec.moe_block(model.hf, la) is None]
        if dense:
            raise UnknownSiteError(f"site {s!r} does not exist at dense layer(s) {dense}; pass MoE layers only")

    fmt = model.chat(chat=chat, system=system, reasoning_end=reasoning_end)
    rows = fmt.tokenize(prompts, responses=responses)
    out_path = Path(out_dir) if out_dir is not None else None
    if out_path is not None:
        out_path.mkdir(parents=True, exist_ok=True)
        for old in out_path.glob("shard_*.safetensors"):
            old.unlink()

    buffer: dict[tuple[str, int], dict[Position, torch.Tensor]] = {}
    state: dict[str, EncodedBatch] = {}
    stop_at = _stop_at(model, layer_list, site_list)

    def stop(x: torch.Tensor, ctx: HookContext) -> None:
        raise StopForward

    def run(inputs: dict) -> None:
        with torch.inference_mode():
            try:
                model.hf(**inputs)
            except StopForward:
                pass

    batches = [(idx, batch.to(model.device)) for idx, batch in fmt.batches(rows, batch_size)]
    reuse = share_prefix and not open_sessions(model)  # other hooks may read the prefix: run it every time
    shared = shared_prefix_length(rows, [b for _, b in batches], pos_list) if reuse else 0
    shards: list[dict[str, torch.Tensor]] = []
    bar = tqdm(total=len(prompts), desc="collecting", unit="prompt", disable=not progress)
    try:
        with model.hooks() as hooks:
            for site in site_list:
                for layer in layer_list:
                    hooks.add(site, layer, _selecting(buffer, state, pos_list), name=f"collect.{site}.{layer}")
            if stop_at is not None:
                hooks.add(*stop_at, stop, name="collect.stop")
            prefix = None
            for n_batch, (idx, batch) in enumerate(batches):
                state["batch"], state["shift"] = batch, shared if prefix is not None else 0
                buffer.clear()
                if prefix is not None:  # later batches: only what follows the shared prefix
                    run(suffix_inputs(batch, prefix, model))
                elif shared and n_batch == 0 and (cache := new_cache(model)) is not None:
                    run(compat.with_cache(model.hf, cache, **batch.model_inputs()))
                    prefix = take_prefix(cache, batch, shared)
                else:
                    run({**batch.model_inputs(), "use_cache": False})
                shard = _pack(buffer, site_list, layer_list, pos_list, batch)
                shard["__order__"] = torch.tensor(idx)
                shard["__lengths__"] = batch.lengths.clone()
                if out_path is not None:
                    save_file(shard, out_path / f"shard_{n_batch:05d}.safetensors")
                else:
                    shards.append(shard)
                bar.update(len(idx))
    finally:
        bar.close()
    acts = Activations(layers=layer_list, sites=site_list, positions=pos_list, n_prompts=len(prompts), _shards=None if out_path else shards, _dir=out_path)
    if out_path is not None:
        acts.save(out_path)
    return acts


def _selecting(buffer, state, pos_list):
    """A hook that keeps only the requested positions of each row (so memory is per-position, not per-token)."""

    def hook(x: torch.Tensor, ctx: HookContext) -> None:
        batch: EncodedBatch = state["batch"]
        kept = {}
        for p in pos_list:
            if p == "all":
                mask = batch.attention_mask.bool().to(x.device)
                kept[p] = x[mask].float().cpu()  # row-major: prompt by prompt
            else:
                kept[p] = batch.take(x, p, shift=state.get("shift", 0)).float().cpu()
        buffer[(ctx.site, ctx.layer)] = kept

    return hook


def _pack(buffer, site_list, layer_list, pos_list, batch) -> dict[str, torch.Tensor]:
    shard = {}
    for site in site_list:
        for p in pos_list:
            per_layer = [buffer[(site, layer)][p] for layer in layer_list]
            # fixed: [b, k, ...] -> [b, L, k, ...]; ragged: [T, ...] -> [T, L, ...]
            shard[_key(site, p)] = torch.stack(per_layer, dim=1).contiguous()
    return shard
