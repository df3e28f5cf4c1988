"""The registry's value types: where one family's modules live (:class:`ArchSpec`), its MoE block and router
(:class:`MoESpec`), how it gets a loadable bias it lacks (:class:`BiasRoute`) and how it is written as GGUF
(:class:`GGUFArch`). All frozen; the families themselves are in :mod:`steerlab.arch.families`.

Example:
    >>> spec = ArchSpec("my_llama_clone", bias_routes=(BiasRoute("o_proj", (("attention_bias", True),)),))
    >>> spec.bias_route("o_proj").flags
    (('attention_bias', True),)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from steerlab.arch.paths import normalize_layer, resolve_path
from steerlab.errors import UnknownArchitectureError

Routing = Literal["softmax_topk", "topk_softmax", "sigmoid_grouped"]
ExpertLayout = Literal["gate_up_rows", "gate_up_interleaved_cols"]
BiasRole = Literal["o_proj", "down_proj"]
BIAS_ROLES: tuple[BiasRole, ...] = ("o_proj", "down_proj")
ConfigCheck = Callable[[Any], str | None]  # a model config -> why it cannot be carried, or None


@dataclass(frozen=True)
class ExpertGroups:
    """Group-limited routing (DeepSeek-V3): the router attributes holding the number of expert groups (``count``)
    and how many of the best-scoring groups the top-k may pick experts from (``kept``)."""

    count: str
    kept: str


@dataclass(frozen=True)
class MoESpec:
    """Where an MoE block keeps its router and experts, and how it routes.

    Paths are relative to the decoder layer (``block``) or to the block (the others).

    * ``routing``: ``softmax_topk`` (softmax over all experts, then top-k, optionally
      renormalised), ``topk_softmax`` (top-k logits, softmax over those), or
      ``sigmoid_grouped`` (DeepSeek-V3: sigmoid scores, group-limited top-k, bias-corrected).
    * ``renormalize``: ``True``/``False``, or the config attribute that decides it.
    * ``expert_layout``: ``gate_up_rows`` = ``gate_up_proj`` [E, 2I, d] (gate rows then up rows),
      ``down_proj`` [E, d, I]; ``gate_up_interleaved_cols`` = gpt-oss, ``gate_up_proj`` [E, d, 2I]
      with gate/up interleaved in the columns, ``down_proj`` [E, I, d], plus biases.
    * ``router_bias``: the router's per-expert [E] tensor added to every token's selection score for that expert
      (a linear router's logit bias; DeepSeek's ``e_score_correction_bias``), or ``None`` when the router has none.
      A very negative entry keeps that expert out of every top-k.
    * ``groups``: the router attributes of group-limited routing (required by, and only valid with,
      ``sigmoid_grouped``).
    """

    block: str = "mlp"
    router: str = "gate"
    experts: str = "experts"
    routing: Routing = "softmax_topk"
    renormalize: bool | str = True
    expert_layout: ExpertLayout = "gate_up_rows"
    shared_experts: str | None = None
    shared_expert_gate: str | None = None
    cast_weights: bool = True  # top-k weights cast back to the logits' dtype (Mixtral keeps float32)
    router_bias: str | None = None
    groups: ExpertGroups | None = None

    def __post_init__(self) -> None:
        grouped = self.routing == "sigmoid_grouped"
        if grouped and (self.groups is None or self.router_bias is None):
            raise UnknownArchitectureError(
                "routing='sigmoid_grouped' ranks sigmoid scores plus a correction bias within expert groups: name the "
                "router's attributes with router_bias='...' and groups=ExpertGroups(count='...', kept='...')"
            )
        if not grouped and self.groups is not None:
            raise UnknownArchitectureError(f"groups=... describes sigmoid_grouped routing, not {self.routing!r}")

    def limited_groups(self, router: nn.Module) -> tuple[int, int] | None:
        """``(kept, count)`` when ``router`` picks its top-k only within its best ``kept`` of ``count`` expert groups
        (so which experts can win depends on the other experts' scores), else ``None``.

        Example:
            >>> from steerlab.testing import tiny_model
            >>> model = tiny_model("deepseek_v3")
            >>> router = model.spec.moe_block(model.hf, model.n_layers - 1).gate
            >>> model.spec.moe.limited_groups(router) is None   # the tiny model keeps every group
            True
        """
        if self.groups is None:
            return None
        kept, count = int(getattr(router, self.groups.kept)), int(getattr(router, self.groups.count))
        return (kept, count) if kept < count else None


@dataclass(frozen=True)
class BiasRoute:
    """How a family gets a loadable bias on ``role`` that it does not have: the model is rebuilt from its config with
    ``flags`` set (every parameter they create starts at zero, so the model computes the same), under ``model_type``
    when that is another family with the same module names (``None``: the same family), provided ``check`` (given
    the config) names no reason against it."""

    role: BiasRole
    flags: tuple[tuple[str, Any], ...]
    model_type: str | None = None
    check: ConfigCheck | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.role not in BIAS_ROLES:
            raise UnknownArchitectureError(f"a bias route's role must be one of {BIAS_ROLES}, got {self.role!r}")


@dataclass(frozen=True)
class GGUFArch:
    """How a family is written as a GGUF file that transformers' GGUF loader reads back exactly: llama.cpp's
    architecture name (which also names the tensors, through gguf's tensor-name map), whether q/k rows are permuted
    the way llama.cpp's converter does (transformers undoes it on load), config flags that must be off (the loader
    builds the model without those tensors), and ``check`` (given the config) naming anything else it would lose."""

    arch: str
    permute_qk: bool
    flags_off: tuple[str, ...] = ()
    check: ConfigCheck | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ArchSpec:
    """Where things live in one model family. Paths are dotted attribute paths.

    ``layers``, ``embed``, ``final_norm`` and ``unembed`` are relative to the ``*ForCausalLM``
    model; all other paths are relative to one decoder layer. ``attn_out`` and ``mlp_out`` name
    the module whose output the layer adds to the residual stream (Gemma adds the *post-norm*
    outputs, so its sites sit on those norms). ``residual_scale`` names a config attribute that
    multiplies those outputs before the add (Granite). ``bias_routes`` say how the family gets a
    loadable ``o_proj`` / ``down_proj`` bias (none listed: baking such a bias is refused); ``gguf``
    says how it is written as GGUF (``None``: GGUF export is refused); ``vllm_modules`` maps a site to its module
    in vLLM's decoder layer where vLLM's name differs from transformers'.
    """

    model_type: str
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    unembed: str = "lm_head"
    attn: str = "self_attn"
    o_proj: str = "self_attn.o_proj"
    mlp: str = "mlp"
    down_proj: str | None = "mlp.down_proj"
    attn_out: str = "self_attn"
    mlp_out: str = "mlp"
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    n_heads: str = "num_attention_heads"
    n_kv_heads: str | None = "num_key_value_heads"
    residual_scale: str | None = None
    moe: MoESpec | None = None
    bias_routes: tuple[BiasRoute, ...] = ()
    gguf: GGUFArch | None = None
    vllm_modules: tuple[tuple[str, str], ...] = ()
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        roles = [r.role for r in self.bias_routes]
        if len(set(roles)) != len(roles):
            raise UnknownArchitectureError(f"{self.model_type}: one bias route per role, got roles {roles}")

    def vllm_module(self, site: str) -> str:
        """The path, inside vLLM's decoder layer, of the module whose output is ``site`` (``"attn_out"`` /
        ``"mlp_out"``): ``vllm_modules`` where vLLM names it differently from transformers, else the same path.

        Example:
            >>> from steerlab.arch.registry import get_spec
            >>> get_spec("mixtral").vllm_module("mlp_out"), get_spec("llama").vllm_module("mlp_out")
            ('block_sparse_moe', 'mlp')
        """
        own = {"attn_out": self.attn_out, "mlp_out": self.mlp_out}[site]
        return dict(self.vllm_modules).get(site, own)

    def bias_route(self, role: BiasRole) -> BiasRoute | None:
        """The route that gives this family a loadable ``role`` bias, or ``None`` where it has none."""
        return next((r for r in self.bias_routes if r.role == role), None)

    # ----- resolution helpers (pure lookups, no family knowledge) -----
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The model's decoder layers, in order."""
        return resolve_path(model, self.layers)

    def layer_module(self, model: nn.Module, layer: int, path: str) -> nn.Module:
        """The module at ``path`` inside decoder layer ``layer`` (negative indices allowed)."""
        layers = self.decoder_layers(model)
        return resolve_path(layers[normalize_layer(layer, len(layers))], path)

    def num_heads(self, config) -> int:
        """Number of attention (query) heads."""
        return int(getattr(config, self.n_heads))

    def head_dim(self, model: nn.Module, layer: int = 0) -> int:
        """Width of one head's output as it enters ``o_proj`` (read off the weights)."""
        o_proj = self.layer_module(model, layer, self.o_proj)
        return int(o_proj.in_features) // self.num_heads(model.config)

    def moe_block(self, model: nn.Module, layer: int) -> nn.Module | None:
        """The layer's MoE block, or ``None`` where this layer is dense (e.g. DeepSeek's first layers)."""
        if self.moe is None:
            return None
        layers = self.decoder_layers(model)
        block = resolve_path(layers[normalize_layer(layer, len(layers))], self.moe.block, missing_ok=True)
        if block is None or resolve_path(block, self.moe.router, missing_ok=True) is None:
            return None
        return block

    def count(self, model: nn.Module) -> int:
        """Number of decoder layers."""
        return len(self.decoder_layers(model))

    def renormalizes(self, config) -> bool:
        """Whether the router renormalises its top-k weights (MoE only)."""
        if self.moe is None:
            return False
        flag = self.moe.renormalize
        return bool(getattr(config, flag, False)) if isinstance(flag, str) else bool(flag)
