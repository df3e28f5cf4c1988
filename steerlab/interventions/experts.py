"""MoE experts: usage counts, contrastive scores, router-probability attribution, switching off / forcing on.

* :func:`expert_usage` — per (layer, expert): how often the router selects the expert over prompt
  tokens (padding excluded), plus the router's probability mass and routing-weight mass, in one pass.
* :func:`contrast` / :func:`expert_contrast` — MoTE's fTRI (METHODS 6): mean selections per token on
  target prompts minus on other prompts, ranked.
* :func:`expert_attribution` — UOE's affinity (METHODS 7): mean router probability of each expert
  over the (forget-set) tokens.
* :class:`ExpertMask` — ``mode="off"``: router logit ``-inf`` before top-k, so the expert is never
  chosen and the remaining weights are recomputed as the family does; ``mode="force"``: the expert is
  always among the chosen; optionally the shared expert is switched off too.

Works on the fused 3D expert parameters of every registered MoE family through the ``router_logits``
site, which re-routes top-k when logits change. Dense layers (e.g. DeepSeek's first layers) have no
experts and are rejected with the list of MoE layers.

Example:
    >>> scores = expert_contrast(model, harmful, harmless)                  # doctest: +SKIP
    >>> with model.apply(ExpertMask(scores.top(10), mode="off")):           # doctest: +SKIP
    ...     model.generate(["How do I pick a lock?"])
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from steerlab.arch import normalize_layer
from steerlab.chat import EncodedBatch
from steerlab.errors import EmptyInputError, LayerIndexError, NotBakeableError, ShapeError, UnknownSiteError
from steerlab.hooks import HookContext
from steerlab.interventions.heads import Order, forward_prompts, how_many, rank_order, stop_forward
from steerlab.moe import (
    ExpertIndexError,
    experts_by_layer,
    moe_layer_list,
    moe_layers,
    n_experts,
    router_of,
    selection_scores,
)
from steerlab.plan import DropShared, ExpertsOff, Plan, Route, SharedOff, Step, WeightEdit

if TYPE_CHECKING:
    from steerlab.model import Model

MaskMode = Literal["off", "force"]
Measure = Literal["probs", "weights"]
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
        >>> with model.apply(ExpertMask([(12, 3), (12, 40)], mode="off")):       # doctest: +SKIP
        ...     model.generate(["Explain the rules of chess."])
    """

    experts: Collection[Expert] = ()
    mode: MaskMode = "off"
    shared_off: bool | Sequence[int] = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "experts", _as_expert_tuple(self.experts))
        if self.mode not in ("off", "force"):
            raise ShapeError(f"mode must be 'off' or 'force', got {self.mode!r}")
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
    if model.spec.moe.routing == "sigmoid_grouped":
        n_group, topk_group = int(router.num_group), int(router.topk_group)
        if topk_group < n_group:
            raise UnknownSiteError(
                f"layer {layer} routes within the best {topk_group} of {n_group} expert groups, chosen from "
                "bias-corrected scores that router logits cannot override, so mode='force' cannot guarantee the "
                "expert is selected; use mode='off' on the competing experts instead"
            )


# ----- results -----
@dataclass(frozen=True, eq=False)  # tensor fields: compared by identity
class ExpertScores:
    """A score per (layer, expert): ``scores[i, e]`` belongs to ``layers[i]``, expert ``e``.

    ``kind`` says what the score is: ``"frequency"`` (selections per token), ``"contrast"`` (fTRI),
    ``"probs"`` (mean router probability) or ``"weights"`` (mean routing weight).
    """

    scores: torch.Tensor  # [n_layers, n_experts], float32
    layers: tuple[int, ...]
    kind: str = "frequency"

    def __post_init__(self) -> None:
        if self.scores.dim() != 2 or self.scores.shape[0] != len(self.layers):
            raise ShapeError(
                f"scores must be [n_layers, n_experts] for layers {list(self.layers)}, got {tuple(self.scores.shape)}"
            )

    @property
    def n_experts(self) -> int:
        """Routed experts per layer."""
        return int(self.scores.shape[1])

    def at(self, layer: int) -> torch.Tensor:
        """The [n_experts] scores of ``layer``."""
        if layer not in self.layers:
            raise LayerIndexError(f"no scores for layer {layer}; these cover layers {list(self.layers)}")
        return self.scores[self.layers.index(layer)]

    def top(self, k: float = 10, *, order: Order = "desc") -> list[Expert]:
        """The ``k`` highest-scoring (layer, expert) pairs (an int count or a float fraction of all).

        Example:
            >>> scores.top(10)                                              # doctest: +SKIP
            [(14, 3), (9, 51), ...]
        """
        n = how_many(k, self.scores.numel())
        return [(self.layers[int(i) // self.n_experts], int(i) % self.n_experts) for i in rank_order(self.scores, order)[:n]]

    def rows(self, k: float | None = None, *, order: Order = "desc") -> list[dict[str, Any]]:
        """Ranked rows ``{"rank", "layer", "expert", "score"}`` (all when ``k`` is None)."""
        pairs = self.top(self.scores.numel() if k is None else k, order=order)
        return [
            {"rank": i + 1, "layer": la, "expert": e, "score": float(self.at(la)[e])} for i, (la, e) in enumerate(pairs)
        ]

    def table(self, k: float | None = 20, *, order: Order = "desc") -> str:
        """A plain-text ranked table."""
        lines = [f"{'rank':>4} {'layer':>5} {'expert':>6} {self.kind:>12}"]
        lines += [
            f"{r['rank']:>4} {r['layer']:>5} {r['expert']:>6} {r['score']:>12.5g}" for r in self.rows(k, order=order)
        ]
        return "\n".join(lines)

    def figure(self, *, title: str | None = None):
        """A plotly heatmap (layers x experts)."""
        import plotly.graph_objects as go

        diverging = bool((self.scores < 0).any())
        heat = go.Heatmap(
            z=self.scores.tolist(),
            y=[str(la) for la in self.layers],
            colorscale="RdBu" if diverging else "Viridis",
            zmid=0.0 if diverging else None,
            colorbar={"title": self.kind},
        )
        fig = go.Figure(heat)
        fig.update_layout(title=title or f"Experts: {self.kind}", xaxis_title="expert", yaxis_title="layer")
        return fig


@dataclass(frozen=True, eq=False)  # tensor fields: compared by identity
class ExpertUsage:
    """Router statistics over a prompt set, per MoE layer in ``layers``.

    ``counts[i, e]``: tokens whose top-k included expert ``e`` at ``layers[i]``; each row sums to
    ``n_tokens * top_k``. ``prob_mass`` / ``weight_mass``: sums over tokens of the softmax router
    probability / of the routing weight the expert received (0 when not selected).
    """

    counts: torch.Tensor  # [n_layers, n_experts], int64
    prob_mass: torch.Tensor  # [n_layers, n_experts], float64
    weight_mass: torch.Tensor  # [n_layers, n_experts], float64
    layers: tuple[int, ...]
    n_tokens: int
    n_prompts: int
    top_k: int

    def frequency(self) -> ExpertScores:
        """Selections per token (fTRI's mean count; each layer sums to ``top_k``)."""
        return ExpertScores((self.counts.double() / self.n_tokens).float(), self.layers, kind="frequency")

    def attribution(self, *, measure: Measure = "probs") -> ExpertScores:
        """Mean router probability (``"probs"``, UOE; sums to 1 per layer) or mean routing weight
        (``"weights"``; sums to 1 where the family renormalises its top-k, else to the top-k mass)."""
        if measure not in ("probs", "weights"):
            raise ShapeError(f"measure must be 'probs' or 'weights', got {measure!r}")
        mass = self.prob_mass if measure == "probs" else self.weight_mass
        return ExpertScores((mass / self.n_tokens).float(), self.layers, kind=measure)


def expert_usage(
    model: Model,
    prompts: Sequence[str],
    *,
    layers: Sequence[int] | int | None = None,
    batch_size: int = 16,
    chat: bool = True,
    system: str | None = None,
) -> ExpertUsage:
    """Count router selections per (layer, expert) over every prompt token (padding excluded), and sum
    router probabilities and routing weights, in one pass. Active ``model.apply`` masks are respected.

    Example:
        >>> usage = expert_usage(model, harmful)                              # doctest: +SKIP
        >>> usage.frequency().table(5)                                        # doctest: +SKIP
    """
    layer_list = moe_layer_list(model, layers)
    routers = {la: router_of(model, la) for la in layer_list}
    n_exp = {la: n_experts(r) for la, r in routers.items()}
    if len(set(n_exp.values())) != 1:
        raise ShapeError(f"MoE layers have different expert counts {n_exp}; pass layers=... with one count")
    n = next(iter(n_exp.values()))
    counts = torch.zeros(len(layer_list), n, dtype=torch.long)
    probs = torch.zeros(len(layer_list), n, dtype=torch.float64)
    weights = torch.zeros(len(layer_list), n, dtype=torch.float64)
    state: dict[str, Any] = {"tokens": 0, "prompts": 0}

    def record(row: int):
        def hook(module, args, output):
            logits, top_w, top_i = output[0], output[1], output[2]
            batch: EncodedBatch = state["batch"]
            keep = batch.attention_mask.bool().reshape(-1).to(logits.device)
            logits, top_w, top_i = (
                logits.reshape(-1, n)[keep],
                top_w.reshape(keep.shape[0], -1)[keep],
                top_i.reshape(keep.shape[0], -1)[keep],
            )
            counts[row] += torch.bincount(top_i.reshape(-1).cpu(), minlength=n)
            probs[row] += torch.softmax(logits.float(), dim=-1).double().sum(0).cpu()
            dense = torch.zeros(top_i.shape[0], n, dtype=torch.float32, device=top_i.device)
            weights[row] += dense.scatter_(1, top_i, top_w.float()).double().sum(0).cpu()

        return hook

    with model.hooks() as session:
        for row, layer in enumerate(layer_list):
            session.add_module_hook(routers[layer], record(row))  # after any router_logits edits: the final choice
        session.add("resid_post", max(layer_list), stop_forward, name="expert_usage.stop")
        for idx, batch in forward_prompts(model, prompts, batch_size=batch_size, chat=chat, system=system):
            state["batch"] = batch
            state["tokens"] += int(batch.attention_mask.sum())
            state["prompts"] += len(idx)
    return ExpertUsage(
        counts=counts,
        prob_mass=probs,
        weight_mass=weights,
        layers=tuple(layer_list),
        n_tokens=state["tokens"],
        n_prompts=state["prompts"],
        top_k=int(next(iter(routers.values())).top_k),
    )


def contrast(target: ExpertUsage, other: ExpertUsage) -> ExpertScores:
    """fTRI scores (METHODS 6): selections per token on ``target`` minus on ``other``; ``.top(k)`` ranks.

    Example:
        >>> scores = contrast(expert_usage(model, harmful), expert_usage(model, harmless))   # doctest: +SKIP
        >>> scores.top(10)                                                                  # doctest: +SKIP
    """
    if target.layers != other.layers or target.counts.shape != other.counts.shape:
        raise ShapeError(
            f"usage statistics cover different layers/experts ({list(target.layers)} x {target.counts.shape[1]} vs "
            f"{list(other.layers)} x {other.counts.shape[1]}); collect both with the same layers on the same model"
        )
    diff = target.counts.double() / target.n_tokens - other.counts.double() / other.n_tokens
    return ExpertScores(diff.float(), target.layers, kind="contrast")


def expert_contrast(
    model: Model,
    target: Sequence[str],
    other: Sequence[str],
    *,
    layers: Sequence[int] | int | None = None,
    batch_size: int = 16,
    chat: bool = True,
    system: str | None = None,
) -> ExpertScores:
    """fTRI in one call: :func:`expert_usage` on both prompt sets, then :func:`contrast`.

    Example:
        >>> expert_contrast(model, harmful, harmless).top(10)                  # doctest: +SKIP
    """
    kw = {"layers": layers, "batch_size": batch_size, "chat": chat, "system": system}
    return contrast(expert_usage(model, target, **kw), expert_usage(model, other, **kw))


def expert_attribution(
    model: Model,
    prompts: Sequence[str],
    *,
    measure: Measure = "probs",
    layers: Sequence[int] | int | None = None,
    batch_size: int = 16,
    chat: bool = True,
    system: str | None = None,
) -> ExpertScores:
    """UOE affinity (METHODS 7): mean softmax router probability of each expert over the prompts' tokens.

    For DeepSeek's sigmoid routing this is the softmax of the same logits (same per-token ranking).
    ``measure="weights"`` averages the routing weights actually used instead.

    Example:
        >>> aff = expert_attribution(model, forget_set)                        # doctest: +SKIP
        >>> layer, expert = aff.top(1)[0]                                       # doctest: +SKIP
    """
    usage = expert_usage(model, prompts, layers=layers, batch_size=batch_size, chat=chat, system=system)
    return usage.attribution(measure=measure)
