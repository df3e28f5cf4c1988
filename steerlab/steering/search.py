"""Search a calibrated refusal's parameters on three objectives at once, instead of hand-picking them.

A trial is a :class:`GatedParams`: the refusal direction's layer (fractional: the vectors of the two neighbouring
layers are interpolated), the coefficient added where the guard says harmful, the share of the direction removed
where it says safe (``Ablate(strength=…)``), and the leave-alone band around the guard's threshold ``t``: from
``t - below`` to ``t + above`` (the two sides are searched separately: strengthening refusal on a false positive
costs more than leaving a true positive alone).
:func:`evaluate` measures a :class:`~steerlab.interventions.gated.GatedRefusal` on three prompt sets:

* ``refusal`` (higher is better): mean probability that the reply opens with a refusal, on harmful prompts;
* ``over_refusal`` (lower is better): the same on safe prompts that only sound dangerous;
* ``kl`` (lower is better): mean KL(plain ‖ gated) of the next-token distribution at the end of ordinary prompts.

Each row is measured under the branch the gate gives it (which is exactly what the policy generates with:
``tests/test_gated.py``), from one forward pass per branch; the guard scores every prompt once. :func:`search`
runs Optuna's multi-objective sampler (NSGA-II) over a :class:`SearchSpace` and returns every trial with the
Pareto front (:func:`pareto_front`); :func:`pareto_html` plots it.

Example:
    >>> from steerlab.data import DEMO_HARMFUL, DEMO_HARMLESS
    >>> from steerlab.probes import LatentGuard
    >>> from steerlab.steering import mean_difference
    >>> from steerlab.testing import tiny_model
    >>> import steerlab
    >>> model = tiny_model("llama")
    >>> guard = LatentGuard.fit(model, DEMO_HARMFUL, DEMO_HARMLESS, layers=[1])
    >>> acts = [steerlab.collect(model, p, positions=["last"], progress=False) for p in (DEMO_HARMFUL, DEMO_HARMLESS)]
    >>> r = mean_difference(*acts, model=model)                      # one vector per layer
    >>> params = GatedParams(layer=1.5, refuse_coeff=2.0, ablate_strength=0.5, below=0.0, above=0.1)
    >>> sets = PromptSets(harmful=DEMO_HARMFUL[:3], safe=DEMO_HARMLESS[:3], ordinary=DEMO_HARMLESS[3:6])
    >>> objectives = evaluate(model, params.build(guard, r), sets)
    >>> 0.0 <= objectives.refusal <= 1.0 and objectives.kl >= 0.0
    True
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from steerlab._checks import finite_number
from steerlab.errors import EmptyInputError, InvalidValueError, SteerlabError
from steerlab.steering.direction import Direction
from steerlab.steering.ops import Ablate, AddVector

if TYPE_CHECKING:
    from steerlab.interventions.gated import GatedRefusal
    from steerlab.model import Model
    from steerlab.probes.guard import LatentGuard, ProbeGuard


class SearchNotInstalledError(SteerlabError):
    """The parameter search needs Optuna, which is not installed."""


@dataclass(frozen=True)
class PromptSets:
    """What a trial is measured on: harmful prompts (refuse), safe-but-scary ones (answer), ordinary ones (KL)."""

    harmful: Sequence[str]
    safe: Sequence[str]
    ordinary: Sequence[str]

    def __post_init__(self) -> None:
        for name in ("harmful", "safe", "ordinary"):
            prompts = getattr(self, name)
            if isinstance(prompts, str) or not prompts:
                raise EmptyInputError(f"PromptSets.{name} needs a non-empty list of prompts")
            object.__setattr__(self, name, tuple(prompts))


@dataclass(frozen=True)
class Objectives:
    """One trial's measurements (see the module docs); ``refusal`` up, the other two down."""

    refusal: float
    over_refusal: float
    kl: float

    def dominates(self, other: Objectives) -> bool:
        """At least as good on all three and better on one.

        Example:
            >>> Objectives(0.9, 0.1, 0.01).dominates(Objectives(0.8, 0.1, 0.02)), Objectives(0.9, 0.2, 0.0).dominates(Objectives(0.8, 0.1, 0.0))
            (True, False)
        """
        mine, theirs = (self.refusal, -self.over_refusal, -self.kl), (other.refusal, -other.over_refusal, -other.kl)
        return all(a >= b for a, b in zip(mine, theirs)) and any(a > b for a, b in zip(mine, theirs))


@dataclass(frozen=True)
class GatedParams:
    """One point of the search: fractional direction ``layer``, ``refuse_coeff``, ``ablate_strength``, and the band
    ``[threshold - below, threshold + above)`` left alone."""

    layer: float
    refuse_coeff: float
    ablate_strength: float
    below: float = 0.0
    above: float = 0.0

    def __post_init__(self) -> None:
        for name in ("layer", "refuse_coeff", "ablate_strength", "below", "above"):
            object.__setattr__(self, name, finite_number(getattr(self, name), f"GatedParams.{name}"))
        if not 0.0 < self.ablate_strength <= 1.0 or min(self.below, self.above, self.refuse_coeff) < 0.0:
            raise InvalidValueError(f"need 0 < ablate_strength <= 1 and below, above, refuse_coeff >= 0; got {self}")

    def vector(self, directions: Direction) -> tuple[int, torch.Tensor]:
        """The layer the vector is added at (``round(layer)``) and the vector: the two neighbouring layers' vectors
        of ``directions`` interpolated linearly at ``layer``."""
        layers = list(directions.layers)
        if not layers[0] <= self.layer <= layers[-1]:
            raise InvalidValueError(f"layer {self.layer} is outside the direction's layers {layers[0]}..{layers[-1]}")
        below = max(la for la in layers if la <= self.layer)
        above = min(la for la in layers if la >= self.layer)
        t = 0.0 if above == below else (self.layer - below) / (above - below)
        vec = (1 - t) * directions.at(below).double() + t * directions.at(above).double()
        return int(round(self.layer)), vec.float()

    def build(self, guard: ProbeGuard | LatentGuard, directions: Direction) -> GatedRefusal:
        """The :class:`~steerlab.interventions.gated.GatedRefusal` these parameters describe."""
        from steerlab.interventions.gated import GatedRefusal

        layer, vec = self.vector(directions)
        r = Direction(vectors=vec[None], layers=(layer,), site=directions.site, model=directions.model, info=directions.info)
        refuse = AddVector(r, coeff=self.refuse_coeff) if self.refuse_coeff > 0 else None
        return GatedRefusal(guard, refuse=refuse, comply=Ablate(r, strength=self.ablate_strength),
                            low=guard.threshold - self.below, high=guard.threshold + self.above)  # fmt: skip


@dataclass(frozen=True)
class SearchSpace:
    """Ranges of the search: direction layers (inclusive), refusal coefficient, ablation strength, and each side of
    the band (score units: probabilities for a probe guard)."""

    layers: tuple[float, float]
    refuse_coeff: tuple[float, float] = (0.0, 2.0)
    ablate_strength: tuple[float, float] = (0.2, 1.0)
    below: tuple[float, float] = (0.0, 0.3)
    above: tuple[float, float] = (0.0, 0.6)

    def __post_init__(self) -> None:
        for name in ("layers", "refuse_coeff", "ablate_strength", "below", "above"):
            lo, hi = (finite_number(v, f"SearchSpace.{name}") for v in getattr(self, name))
            if lo > hi:
                raise InvalidValueError(f"SearchSpace.{name} must be (low, high) with low <= high; got ({lo}, {hi})")
            object.__setattr__(self, name, (lo, hi))
        if self.ablate_strength[0] <= 0.0 or self.ablate_strength[1] > 1.0 or min(self.below[0], self.above[0], self.refuse_coeff[0]) < 0.0:
            raise InvalidValueError(f"need 0 < ablate_strength <= 1 and non-negative coefficients and band sides; got {self}")

    def suggest(self, trial: Any) -> GatedParams:
        """An Optuna trial's point."""
        return GatedParams(
            layer=trial.suggest_float("layer", *self.layers),
            refuse_coeff=trial.suggest_float("refuse_coeff", *self.refuse_coeff),
            ablate_strength=trial.suggest_float("ablate_strength", *self.ablate_strength),
            below=trial.suggest_float("below", *self.below),
            above=trial.suggest_float("above", *self.above),
        )


def _refusal_prob(logprobs: torch.Tensor, ids: list[int]) -> torch.Tensor:
    return torch.logsumexp(logprobs[:, ids], dim=-1).exp()


class _Cache:
    """What every trial shares: the guard's scores and the plain next-token log-probabilities of each set."""

    def __init__(self, model: Model, guard: Any, sets: PromptSets, batch_size: int) -> None:
        from steerlab.eval.logits import last_token_logprobs
        from steerlab.eval.refusal import refusal_token_ids

        self.ids = refusal_token_ids(model.tokenizer)
        self.prompts = {name: list(getattr(sets, name)) for name in ("harmful", "safe", "ordinary")}
        self.scores = {name: guard.score(p, batch_size=batch_size) for name, p in self.prompts.items()}
        self.plain = {name: last_token_logprobs(model, p, batch_size=batch_size) for name, p in self.prompts.items()}


def evaluate(model: Model, gated: GatedRefusal, sets: PromptSets, *, batch_size: int = 16, _cache: _Cache | None = None) -> Objectives:
    """Refusal on ``sets.harmful``, over-refusal on ``sets.safe``, KL on ``sets.ordinary`` under ``gated``."""
    from steerlab.eval.logits import kl_divergence, last_token_logprobs

    cache = _cache or _Cache(model, gated.guard, sets, batch_size)
    out = {}
    for name, prompts in cache.prompts.items():
        logprobs = cache.plain[name].clone()
        actions = gated.actions(cache.scores[name])
        for action, iv in (("refuse", gated.refuse), ("comply", gated.comply)):
            rows = [i for i, a in enumerate(actions) if a == action]
            if rows and iv is not None:
                with model.apply(iv):
                    logprobs[rows] = last_token_logprobs(model, [prompts[i] for i in rows], batch_size=batch_size)
        out[name] = logprobs
    return Objectives(
        refusal=float(_refusal_prob(out["harmful"], cache.ids).mean()),
        over_refusal=float(_refusal_prob(out["safe"], cache.ids).mean()),
        kl=float(kl_divergence(cache.plain["ordinary"], out["ordinary"]).clamp_min(0).mean()),
    )


@dataclass(frozen=True)
class SearchResult:
    """Every trial (parameters and objectives, in order), the indices of the Pareto front, and a baseline if given."""

    params: tuple[GatedParams, ...]
    objectives: tuple[Objectives, ...]
    pareto: tuple[int, ...]
    baseline: Objectives | None = None

    def dominating(self) -> list[int]:
        """Front trials that dominate the baseline (empty without one)."""
        if self.baseline is None:
            return []
        return [i for i in self.pareto if self.objectives[i].dominates(self.baseline)]

    def to_dict(self) -> dict:
        return {"trials": [{"params": asdict(p), "objectives": asdict(o)} for p, o in zip(self.params, self.objectives)],
                "pareto": list(self.pareto), "baseline": None if self.baseline is None else asdict(self.baseline),
                "dominating": self.dominating()}  # fmt: skip


def pareto_front(objectives: Sequence[Objectives]) -> list[int]:
    """Indices of the trials no other trial dominates.

    Example:
        >>> pareto_front([Objectives(0.9, 0.1, 0.0), Objectives(0.8, 0.2, 0.1), Objectives(0.5, 0.0, 0.0)])
        [0, 2]
    """
    return [i for i, o in enumerate(objectives) if not any(p.dominates(o) for j, p in enumerate(objectives) if j != i)]


def _optuna():
    try:
        import optuna
    except ImportError:
        raise SearchNotInstalledError("the parameter search needs Optuna: pip install 'steerlab[search]' (optuna>=5.0)") from None
    return optuna


def search(
    model: Model,
    guard: ProbeGuard | LatentGuard,
    directions: Direction,
    sets: PromptSets,
    *,
    space: SearchSpace,
    n_trials: int = 40,
    seed: int = 0,
    baseline: GatedRefusal | None = None,
    batch_size: int = 16,
    log: Any = None,
) -> SearchResult:
    """Optuna NSGA-II over ``space`` for ``n_trials``; ``baseline`` (e.g. the hand-picked gate) is measured on the
    same sets so the front can be compared with it. An :class:`~steerlab.errors.InSampleWarning` names the prompts the
    guard records it was fitted on."""
    from steerlab.probes.guard import warn_in_sample

    optuna = _optuna()
    warn_in_sample(guard, {"harmful": sets.harmful, "safe": sets.safe, "ordinary": sets.ordinary}, doing="searching")
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise InvalidValueError(f"n_trials must be a positive int; got {n_trials!r}")
    cache = _Cache(model, guard, sets, batch_size)
    params: list[GatedParams] = []
    objectives: list[Objectives] = []

    def objective(trial):
        p = space.suggest(trial)
        o = evaluate(model, p.build(guard, directions), sets, batch_size=batch_size, _cache=cache)
        params.append(p)
        objectives.append(o)
        if log is not None:
            log(f"trial {trial.number}: {p} -> {o}")
        return o.refusal, o.over_refusal, o.kl

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"], sampler=optuna.samplers.NSGAIISampler(seed=seed))
    study.optimize(objective, n_trials=n_trials)
    base = None if baseline is None else evaluate(model, baseline, sets, batch_size=batch_size, _cache=cache)
    return SearchResult(tuple(params), tuple(objectives), tuple(pareto_front(objectives)), base)


def pareto_html(result: SearchResult, path: str | Path) -> Path:
    """A plotly scatter (over-refusal vs refusal, colour = KL) of every trial, the front outlined, the baseline a star."""
    import plotly.graph_objects as go

    from steerlab.report import paragraph, write_page

    objs = result.objectives
    front = set(result.pareto)
    text = [json.dumps(asdict(p)) for p in result.params]
    fig = go.Figure()
    for on_front in (False, True):
        idx = [i for i in range(len(objs)) if (i in front) == on_front]
        fig.add_trace(go.Scatter(
            x=[objs[i].over_refusal for i in idx], y=[objs[i].refusal for i in idx], mode="markers",
            name="Pareto front" if on_front else "trials", text=[text[i] for i in idx],
            marker={"color": [objs[i].kl for i in idx], "colorscale": "Viridis", "size": 11 if on_front else 7,
                    "line": {"width": 2 if on_front else 0, "color": "black"}, "showscale": on_front,
                    "colorbar": {"title": "KL"}},
        ))  # fmt: skip
    if result.baseline is not None:
        b = result.baseline
        fig.add_trace(go.Scatter(x=[b.over_refusal], y=[b.refusal], mode="markers", name=f"baseline (KL {b.kl:.3g})",
                                 marker={"symbol": "star", "size": 16, "color": "red"}))  # fmt: skip
    fig.update_layout(xaxis_title="over-refusal on safe-but-scary prompts (P refusal opener)",
                      yaxis_title="refusal on harmful prompts (P refusal opener)", title="calibrated refusal: trials")  # fmt: skip
    note = paragraph(f"{len(objs)} trials, {len(front)} on the Pareto front"
                     + (f"; {len(result.dominating())} of them dominate the baseline" if result.baseline else ""))  # fmt: skip
    return write_page(path, title="calibrated refusal: parameter search", blocks=[note, fig])
