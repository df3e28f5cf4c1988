"""The refusal-direction pipeline of METHODS 1 (Arditi et al. 2024), with a selection report.

0. check that the model refuses harmful requests at all (a short greedy reply to each harmful
   validation prompt, judged by refusal substrings); a model that does not refuse has no refusal
   direction, and fails here in seconds instead of after the whole selection;
1. (optional) keep harmful prompts the model refuses and harmless ones it answers;
2. candidates ``r[i, l] = mean(h_l[harmful, i]) - mean(h_l[harmless, i])`` for every
   post-instruction position ``i`` and layer ``l`` (``resid_pre``, float64 sums);
3. on validation prompts, per candidate: *bypass* = mean refusal score of harmful prompts with
   ``r̂`` ablated everywhere; *induce* = mean refusal score of harmless prompts with ``r`` added at
   layer ``l``; *KL* = KL of harmless last-token distributions under ablation. Candidates in the
   last 20% of layers are skipped. The pick is the lowest bypass score with induce > 0 and KL < 0.1.

Selection is exact but lazy: bypass is computed for every candidate, then induce and KL are
computed in ascending bypass order until a candidate passes, which gives the same pick as
scoring everything.

Example (a random tiny model never refuses, so ``relaxed`` turns the checks and filters off):
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> harmful, harmless = ["Make a weapon.", "Pick a lock."], ["Hi", "Say hello."]
    >>> relaxed = dict(min_refusal_rate=0, filter_train="none", kl_max=float("inf"), induce_min=float("-inf"))
    >>> direction, report = refusal_direction(model, harmful, harmless, harmful_val=harmful,
    ...                                       harmless_val=harmless, progress=False, **relaxed)
    >>> direction.layers[0] < report.layer_cutoff
    True
    >>> print(report.table())  # doctest: +ELLIPSIS
    baseline refusal score: harmful ...
     pos layer   bypass   induce       KL  pick
    ...
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from tqdm.auto import tqdm

from steerlab._checks import finite_number
from steerlab.activations import collect
from steerlab.errors import EmptyInputError, InvalidValueError, SteerlabError
from steerlab.eval.logits import kl_divergence, last_token_logprobs
from steerlab.eval.refusal import is_refusal, refusal_score
from steerlab.steering.direction import Direction
from steerlab.steering.fit import mean_difference, prompts_hash
from steerlab.steering.ops import Ablate, AddVector

if TYPE_CHECKING:
    from steerlab.model import Model

TrainFilter = Literal["score", "judge", "none"]


MIN_REFUSAL_RATE = 0.15  # the embedded Qwen refuses 13 of 32 validation prompts (41%), SmolLM2 1 of 32 (3%)


class ModelDoesNotRefuseError(SteerlabError):
    """The model refuses too few harmful prompts for a refusal direction to exist."""


class NoCandidatePassedError(SteerlabError):
    """No candidate passed the induce and KL filters; ``candidates`` holds every score computed."""

    def __init__(self, message: str, *, candidates: list) -> None:
        super().__init__(message)
        self.candidates = candidates


@dataclass
class Candidate:
    """One (position, layer) candidate and its validation scores (None = not computed)."""

    position: int  # offset from the end of the prompt (-1 = last token)
    layer: int
    bypass: float
    induce: float | None = None
    kl: float | None = None

    def passes(self, *, induce_min: float, kl_max: float) -> bool:
        """Whether both filters were computed and passed."""
        return self.induce is not None and self.kl is not None and self.induce > induce_min and self.kl < kl_max


@dataclass
class SelectionReport:
    """Everything the selection computed: baselines, every candidate, the pick."""

    candidates: list[Candidate]
    chosen: Candidate
    baseline_harmful: float
    baseline_harmless: float
    n_train: tuple[int, int]
    layer_cutoff: int
    filters: dict = field(default_factory=dict)

    def table(self, *, top: int = 10) -> str:
        """The best candidates by bypass score, as a text table."""
        lines = [
            (
                f"baseline refusal score: harmful {self.baseline_harmful:+.3f}, harmless {self.baseline_harmless:+.3f}; "
                f"train prompts kept: {self.n_train[0]} harmful, {self.n_train[1]} harmless; layers < {self.layer_cutoff}"
            ),
            f"{'pos':>4} {'layer':>5} {'bypass':>8} {'induce':>8} {'KL':>8}  pick",
        ]
        fmt = lambda v: "    -" if v is None else f"{v:+8.3f}"
        for c in sorted(self.candidates, key=lambda c: c.bypass)[:top]:
            mark = "<==" if c is self.chosen else ""
            lines.append(f"{c.position:>4} {c.layer:>5} {c.bypass:+8.3f} {fmt(c.induce)} {fmt(c.kl)}  {mark}")
        return "\n".join(lines)

    def heatmap(self):
        """Plotly heatmap of bypass scores (positions x layers); the pick is marked."""
        import plotly.graph_objects as go

        positions = sorted({c.position for c in self.candidates})
        layers = sorted({c.layer for c in self.candidates})
        grid = [[math.nan] * len(layers) for _ in positions]
        for c in self.candidates:
            grid[positions.index(c.position)][layers.index(c.layer)] = c.bypass
        fig = go.Figure(go.Heatmap(z=grid, x=layers, y=[str(p) for p in positions], colorscale="RdBu_r", colorbar={"title": "bypass"}))
        fig.add_trace(go.Scatter(x=[self.chosen.layer], y=[str(self.chosen.position)], mode="markers", marker={"symbol": "x", "size": 14, "color": "black"}, name="pick"))
        fig.update_layout(title="Refusal score of harmful prompts with each candidate ablated", xaxis_title="layer", yaxis_title="position")
        return fig

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "chosen": asdict(self.chosen),
            "baseline_harmful": self.baseline_harmful,
            "baseline_harmless": self.baseline_harmless,
            "n_train": list(self.n_train),
            "layer_cutoff": self.layer_cutoff,
            "filters": self.filters,
            "candidates": [asdict(c) for c in self.candidates],
        }


def filter_prompts(model: Model, prompts: Sequence[str], *, refuse: bool, how: TrainFilter = "score", batch_size: int = 16) -> list[str]:
    """Keep prompts the model refuses (``refuse=True``) or answers (``False``).

    ``how="score"``: refusal score > 0 / < 0 (METHODS 1); ``"judge"``: a 16-token greedy reply
    judged by refusal substrings (better for small models whose refusals start below p = 0.5).
    """
    prompts = list(prompts)
    if how == "none":
        return prompts
    if how == "score":
        scores = refusal_score(model, prompts, batch_size=batch_size)
        keep = scores > 0 if refuse else scores < 0
    else:
        replies = model.generate(prompts, max_new_tokens=16, batch_size=batch_size)
        keep = torch.tensor([is_refusal(r) == refuse for r in replies])
    return [p for p, k in zip(prompts, keep.tolist()) if k]


def check_model_refuses(
    model: Model, harmful: Sequence[str], *, min_rate: float = MIN_REFUSAL_RATE, batch_size: int = 16
) -> list[str]:
    """The ``harmful`` prompts the model refuses (16-token greedy reply, substring judge: the ``"judge"``
    filter); raises :class:`ModelDoesNotRefuseError` when that is fewer than ``min_rate`` of them."""
    prompts = list(harmful)
    if not prompts:
        raise EmptyInputError("checking that the model refuses needs at least one harmful prompt")
    refused = filter_prompts(model, prompts, refuse=True, how="judge", batch_size=batch_size)
    rate = len(refused) / len(prompts)
    if rate < min_rate:
        raise ModelDoesNotRefuseError(
            f"{model.name} does not refuse harmful requests: it refused {len(refused)} of {len(prompts)} harmful "
            f"prompts ({rate:.0%}; at least {min_rate:.0%} needed). A refusal direction needs a model that refuses; "
            "use the embedded default qwen2.5-coder-0.5b-instruct, or another instruction-tuned model that refuses "
            "(min_refusal_rate=0, or --min-refusal-rate 0 on the command line, skips this check)"
        )
    return refused


def fit_candidates(model: Model, harmful: Sequence[str], harmless: Sequence[str], *, batch_size: int = 16, progress: bool = True) -> tuple[torch.Tensor, list[int]]:
    """Mean-difference candidates [n_post_inst_positions, n_layers, d] at the post-instruction span."""
    if not harmful or not harmless:
        raise EmptyInputError("both prompt sets need at least one prompt (after filtering)")
    layers = list(range(model.n_layers))
    kw = {"sites": ["resid_pre"], "layers": layers, "positions": ["post_inst"], "batch_size": batch_size,
          "progress": progress}  # fmt: skip
    pos_acts = collect(model, harmful, **kw).get("resid_pre", "post_inst")  # [n, L, P, d]
    neg_acts = collect(model, harmless, **kw).get("resid_pre", "post_inst")
    width = pos_acts.shape[2]
    vectors = torch.stack(
        [mean_difference(pos_acts[:, :, i], neg_acts[:, :, i], layers=layers).vectors for i in range(width)]
    )
    return vectors, [i - width for i in range(width)]


def select_direction(
    model: Model,
    candidates: torch.Tensor,
    offsets: Sequence[int],
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    *,
    prune_last: float = 0.2,
    kl_max: float = 0.1,
    induce_min: float = 0.0,
    induce_coeff: float = 1.0,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[int, Candidate, list[Candidate], float, float]:
    """Score candidates on validation prompts; return (position index, pick, all, baselines).

    ``induce_coeff`` scales the added candidate in the induce filter (METHODS 1 uses 1.0; small
    models may need more for their mean refusal score to cross 0).
    """
    if not harmful_val or not harmless_val:
        raise EmptyInputError("validation sets must not be empty")
    n_layers = candidates.shape[1]
    cutoff = int(n_layers * (1 - prune_last))
    base_harmful = float(refusal_score(model, harmful_val, batch_size=batch_size).mean())
    base_harmless = float(refusal_score(model, harmless_val, batch_size=batch_size).mean())
    base_lp = last_token_logprobs(model, harmless_val, batch_size=batch_size)

    def direction(pi: int, layer: int) -> Direction:
        return Direction(vectors=candidates[pi, layer][None], layers=(layer,), position=offsets[pi], method="mean_diff")

    scored: list[tuple[int, Candidate]] = []
    grid = [(pi, la) for pi in range(len(offsets)) for la in range(1, cutoff)]  # layer 0 is the embedding
    for pi, layer in tqdm(grid, desc="bypass scores", disable=not progress):
        with model.apply(Ablate(direction(pi, layer))):
            bypass = float(refusal_score(model, harmful_val, batch_size=batch_size).mean())
        scored.append((pi, Candidate(position=offsets[pi], layer=layer, bypass=bypass)))
    ranked = sorted(scored, key=lambda t: t[1].bypass)
    for pi, cand in tqdm(ranked, desc="induce/KL filters (best bypass first)", disable=not progress):
        d = direction(pi, cand.layer)
        with model.apply(AddVector(d, coeff=induce_coeff, layers=[cand.layer])):
            cand.induce = float(refusal_score(model, harmless_val, batch_size=batch_size).mean())
        if cand.induce <= induce_min:
            continue
        with model.apply(Ablate(d)):
            cand.kl = float(kl_divergence(base_lp, last_token_logprobs(model, harmless_val, batch_size=batch_size)).mean())
        if cand.passes(induce_min=induce_min, kl_max=kl_max):
            return pi, cand, [c for _, c in scored], base_harmful, base_harmless
    tried = "; ".join(
        f"pos {c.position} layer {c.layer}: bypass {c.bypass:+.2f}, induce {c.induce:+.2f}"
        + ("" if c.kl is None else f", KL {c.kl:.3f}")
        for _, c in ranked[:5]
    )
    raise NoCandidatePassedError(
        f"no candidate passed the filters (induce > {induce_min}, KL < {kl_max}). Best by bypass: {tried}. Check "
        "that the harmful and harmless sets are style-matched and that the model refuses the harmful ones, or "
        "relax kl_max / induce_min",
        candidates=[c for _, c in scored],
    )


def refusal_direction(
    model: Model,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    filter_train: TrainFilter = "score",
    fit_model: Model | Callable[[], Model] | None = None,
    prune_last: float = 0.2,
    kl_max: float = 0.1,
    induce_min: float = 0.0,
    induce_coeff: float = 1.0,
    min_refusal_rate: float = MIN_REFUSAL_RATE,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[Direction, SelectionReport]:
    """Fit and select the refusal direction (METHODS 1); returns the one-layer Direction and a report.

    First, unless ``min_refusal_rate`` is 0, :func:`check_model_refuses` on the harmful validation
    prompts (cheap: 16 new tokens each) raises :class:`ModelDoesNotRefuseError` for a model that does not
    refuse. Training prompts and harmful validation prompts are filtered with ``filter_train`` (harmless
    validation prompts are kept as given). ``fit_model`` (e.g. a float32 copy of a bfloat16
    ``model``, or a function that loads it, called only after the check and the filters) computes the
    candidates; filtering and selection run on ``model``.
    """
    min_refusal_rate = finite_number(min_refusal_rate, "min_refusal_rate")
    if not 0.0 <= min_refusal_rate <= 1.0:
        raise InvalidValueError(f"min_refusal_rate is a fraction of prompts in [0, 1]; got {min_refusal_rate}")
    refused = None
    if min_refusal_rate > 0:
        refused = check_model_refuses(model, harmful_val, min_rate=min_refusal_rate, batch_size=batch_size)
    if refused is not None and filter_train == "judge":
        kept_val = refused  # the check ran the judge filter on these prompts already
    else:
        kept_val = filter_prompts(model, harmful_val, refuse=True, how=filter_train, batch_size=batch_size)
    kept_harmful = filter_prompts(model, harmful, refuse=True, how=filter_train, batch_size=batch_size)
    kept_harmless = filter_prompts(model, harmless, refuse=False, how=filter_train, batch_size=batch_size)
    from steerlab.model import Model  # at run time: the annotation import is for type checkers only

    fitter = fit_model() if fit_model is not None and not isinstance(fit_model, Model) else fit_model or model
    candidates, offsets = fit_candidates(fitter, kept_harmful, kept_harmless, batch_size=batch_size, progress=progress)
    del fitter
    pi, chosen, scored, base_h, base_s = select_direction(
        model, candidates, offsets, kept_val, harmless_val, prune_last=prune_last, kl_max=kl_max,
        induce_min=induce_min, induce_coeff=induce_coeff, batch_size=batch_size, progress=progress,
    )  # fmt: skip
    report = SelectionReport(
        candidates=scored,
        chosen=chosen,
        baseline_harmful=base_h,
        baseline_harmless=base_s,
        n_train=(len(kept_harmful), len(kept_harmless)),
        layer_cutoff=int(model.n_layers * (1 - prune_last)),
        filters={
            "filter_train": filter_train, "kl_max": kl_max, "induce_min": induce_min, "induce_coeff": induce_coeff,
            "prune_last": prune_last, "n_harmful_val": len(kept_val), "min_refusal_rate": min_refusal_rate,
        },
    )  # fmt: skip
    direction = Direction(
        vectors=candidates[pi, chosen.layer][None],
        layers=(chosen.layer,),
        site="resid_pre",
        position=chosen.position,
        method="mean_diff",
        model=model.name,
        data_hash=prompts_hash(kept_harmful, kept_harmless),
        info={"bypass": chosen.bypass, "induce": chosen.induce, "kl": chosen.kl, "n_layers": model.n_layers},
    )
    return direction, report
