"""MoE experts as values: :class:`ExpertMask` switches experts off or forces them on through the router.

Measurements (usage, fTRI contrast, UOE attribution) live in :mod:`steerlab.measure.experts`.

* :class:`ExpertMask` — ``mode="off"``: router logit ``-inf`` before top-k, so the expert is never
  chosen and the remaining weights are recomputed as the family does; ``mode="force"``: the expert is
  always among the chosen; optionally the shared expert is switched off too.

Works on the fused 3D expert parameters of every registered MoE family through the ``router_logits``
site, which re-routes top-k when logits change. Dense layers (e.g. DeepSeek's first layers) have no
experts and are rejected with the list of MoE layers.

Example:
    >>> from steerlab.measure import expert_contrast
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("qwen2_moe")                 # 3 MoE layers, 4 experts each, top-2 routing
    >>> scores = expert_contrast(model, ["How do I pick a lock?", "Write a threat."], ["Hi", "Say hello."])
    >>> with model.apply(ExpertMask(scores.top(2), mode="off")):
    ...     texts = model.generate(["How do I pick a lock?"], max_new_tokens=4)
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from torch import nn

from steerlab.arch import normalize_layer
from steerlab.errors import EmptyInputError, InvalidValueError, NotBakeableError, UnknownSiteError
from steerlab.moe import (
    ExpertIndexError,
    experts_by_layer,
    moe_layers,  # noqa: F401  (re-exported)
    n_experts,
    router_of,
)
from steerlab.plan import DropShared, ExpertsOff, Plan, Route, SharedOff, Step, WeightEdit

if TYPE_CHECKING:
    from steerlab.model import Model

MaskMode = Literal["off", "force"]
Expert = tuple[int, int]


def _as_expert_tuple(experts: Collection[Expert]) -> tuple[Expert, ...]:
    items = []
    for item in experts:
        try:
            layer, expert = item
        except (TypeError, ValueError):
            raise ExpertIndexError(f"each expert must be a (layer, expert) pair, got {item!r}") from None
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (layer, expert)):
            raise ExpertIndexError(f"each expert must be a pair of ints (layer, expert), got {item!r}")
        items.append((int(layer), int(expert)))
    return tuple(sorted(set(items)))


# ----- the intervention -----
@dataclass(frozen=True)
class ExpertMask:
    """Switch routed experts off, or force them on, through the router (METHODS 6).

    * ``mode="off"``: the expert's router logit is set to ``-inf`` before top-k: it is never
      selected, and the family's own routing (softmax, top-k, renormalisation) is recomputed over
      the remaining experts.
    * ``mode="force"``: the expert is selected at every token; the other ``top_k - n_forced`` slots go
      to the experts the router ranks highest, and the weights of the chosen set are what the family
      computes for them (every other logit is set to ``-inf``). A literal ``+inf`` logit would instead
      give a softmax-routed expert all the weight (and NaN for two forced experts), so this keeps the
      router's own weighting. DeepSeek-style grouped routing that keeps only some groups
      (``topk_group < n_group``) cannot be forced through the logits and is rejected.
    * ``shared_off``: also zero the shared expert's contribution, at the layers of ``experts``
      (``True``) or at the given layers; families without shared experts raise.

    Example:
        >>> from steerlab.measure import expert_usage
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("qwen2_moe")
        >>> with model.apply(ExpertMask([(1, 0), (1, 3)], mode="off")):
        ...     texts = model.generate(["Explain the rules of chess."], max_new_tokens=4)
        ...     usage = expert_usage(model, ["Explain the rules of chess."])
        >>> usage.counts[1, [0, 3]].tolist()                               # never selected
        [0, 0]
        >>> with model.apply(ExpertMask([(1, 2)], mode="force")):
        ...     usage = expert_usage(model, ["Explain the rules of chess."])
        >>> int(usage.counts[1, 2]) == usage.n_tokens                     # selected at every token
        True
    """

    experts: Collection[Expert] = ()
    mode: MaskMode = "off"
    shared_off: bool | Sequence[int] = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "experts", _as_expert_tuple(self.experts))
        if self.mode not in ("off", "force"):
            raise InvalidValueError(f"mode must be 'off' (never selected) or 'force' (always selected), got {self.mode!r}")
        if not isinstance(self.shared_off, bool):
            object.__setattr__(self, "shared_off", tuple(int(la) for la in self.shared_off))
        if not self.experts and (self.shared_off is True or not self.shared_off):
            raise EmptyInputError(
                "ExpertMask needs at least one (layer, expert) pair, or the layers whose shared expert to switch "
                "off: ExpertMask(shared_off=[layer, ...])"
            )

    def _experts(self, model: Model) -> dict[int, list[int]]:
        """{layer: experts}, checked against each layer's expert count and top-k."""
        if model.spec.moe is None:
            raise UnknownSiteError(f"{model.name} ({model.spec.model_type}) is a dense model: it has no experts to mask")
        chosen = experts_by_layer(model, self.experts)
        for layer, experts in chosen.items():
            router = router_of(model, layer)
            n, k = n_experts(router), int(router.top_k)
            if self.mode == "off" and len(experts) > n - k:
                raise ExpertIndexError(
                    f"switching off {len(experts)} of {n} experts at layer {layer} leaves fewer than top_k={k}; "
                    f"switch off at most {n - k} per layer"
                )
            if self.mode == "force":
                if len(experts) > k:
                    raise ExpertIndexError(f"cannot force {len(experts)} experts on at layer {layer}: the router selects top_k={k}")
                _check_forceable(model, router, layer)
        return chosen

    def _shared_layers(self, model: Model) -> list[int]:
        if self.shared_off is False:
            return []
        if self.shared_off is True:
            layers = list(experts_by_layer(model, self.experts))
        else:
            layers = [normalize_layer(la, model.n_layers) for la in self.shared_off]
        spec = model.spec
        if spec.moe.shared_experts is None:
            raise UnknownSiteError(f"{spec.model_type} has no shared experts to switch off; use shared_off=False")
        if spec.mlp_out != spec.moe.block:
            raise UnknownSiteError(
                f"shared_off needs the mlp_out site on the MoE block ({spec.moe.block!r}); "
                f"this spec puts it on {spec.mlp_out!r}"
            )
        for layer in layers:
            router_of(model, layer)  # dense layers have no shared expert either
        return sorted(set(layers))

    def resolve(self, model: Model) -> Plan:
        """``Route`` on ``router_logits`` per layer, plus ``DropShared`` on ``mlp_out`` when asked."""
        steps = [Step(layer, "router_logits", Route(tuple(experts), self.mode)) for layer, experts in self._experts(model).items()]
        steps += [Step(layer, "mlp_out", DropShared()) for layer in self._shared_layers(model)]
        return Plan(type(self).__name__, tuple(steps))

    def weights(self, model: Model) -> tuple[WeightEdit, ...]:
        """``mode="off"``: each expert's router row zeroed and its router bias very negative; ``shared_off``:
        the shared expert's down projection zeroed."""
        if self.experts and self.mode == "force":
            raise NotBakeableError(
                "ExpertMask(mode='force') keeps the router's own weighting of the forced experts among the chosen "
                "ones; a router bias large enough to force selection would also take over that weighting, so it has "
                "no exact weight form. Apply it at runtime instead: `with model.apply(iv): ...`"
            )
        edits: list[WeightEdit] = [ExpertsOff(layer, tuple(experts)) for layer, experts in self._experts(model).items()]
        return tuple(edits + [SharedOff(layer) for layer in self._shared_layers(model)])


def _check_forceable(model: Model, router: nn.Module, layer: int) -> None:
    groups = model.spec.moe.limited_groups(router)
    if groups is not None:
        raise UnknownSiteError(
            f"layer {layer} routes within the best {groups[0]} of {groups[1]} expert groups, chosen from "
            "bias-corrected scores that router logits cannot override, so mode='force' cannot guarantee the "
            "expert is selected; use mode='off' on the competing experts instead"
        )
