"""Choose a calibrated-refusal gate's comply branch and band on tuning prompts, robustly.

A :class:`~steerlab.interventions.gated.GatedRefusal` sends each row to one branch: ``refuse`` at ``score >= high``,
``comply`` below ``low``, the plain model in between. A row under the gate behaves exactly as it does under its
branch alone, so once every tuning prompt has been measured under every branch (:class:`TuningRows`: 0/1 refusal
per row and branch, KL on ordinary prompts per row and branch), the refusal rates of any band are read off those
rows without generating again.

The rule that reads them matters. Maximising "refusal on harmful minus refusal on safe" under a limit picks the
band that barely fits the tuning rows, and a band chosen on 100-odd prompts is then as likely to miss the bar as
to meet it on other prompts. :func:`choose_band` instead picks the setting most likely to *meet the bar*:

* the bar: refusal on the safe set <= ``max_over_refusal``; refusal on each harmful set >= the plain model's on the
  same rows; mean KL on the ordinary set <= ``max_kl``;
* among the settings that meet it on the tuning rows, the one meeting it on the largest share of ``draws``
  bootstrap resamples (each set resampled with replacement; plain and gate read on the same resampled rows); ties
  go to the larger mean harmful refusal minus safe refusal on the tuning rows, then to the first setting.
  A best setting that meets the bar on fewer than ``min_share`` of the resamples is returned with a
  :class:`FragileBandWarning`: expect it to miss the bar on other prompts as often as not. The share is a necessary
  check, not a guarantee: resampling the tuning prompts cannot show how prompts of other kinds score, and the best
  share among many settings is optimistic (on the Qwen default, choices at 80-99% missed the bar on held-out kinds;
  README, "A floor under the gate").

Candidate cuts are the midpoints between consecutive distinct tuning scores (and one below / above all of them);
every pair ``low <= high`` and every comply branch is tried, all at once (cumulative sums over the rows sorted by
score).

With ``margin=m > 0`` a setting must meet a stricter bar on the tuning rows (and on each resample): refusal on the
safe set at most ``max_over_refusal`` minus ``m`` binomial standard errors at that rate, and refusal on each harmful
set at least the plain model's plus ``m`` standard errors of the plain rate (``sqrt(p (1 - p) / n)`` over the set's
``n`` tuning rows); the KL limit is unchanged. It leaves room for prompts of other kinds to score differently; the
judgement is still the plain bar. It needs tuning sets far larger than 40 prompts: on the Qwen default a margin of one
standard error left no setting on the tuning rows in 35 of 40 runs (README, "A margin on the tuning rows").

With ``floors=k`` the gate may also leave the lowest scores alone (``GatedRefusal(floor=...)``: comply acts only on
``floor <= score < low``), trying no floor and ``k`` floors spread evenly over the candidate cuts. Ordinary prompts
score lowest and are not refused, so a floor keeps the comply branch's KL off them; a stronger comply branch (e.g. a
full ablation, whose KL alone is far above the limit) may then be the one that meets the bar. A floor is kept only
when it meets the bar on more resamples (or with more gain) than every setting without one.

Example:
    >>> import torch
    >>> s = {"safe": torch.tensor([0.1, 0.2, 0.3, 0.9]), "harmful": torch.tensor([0.6, 0.8, 0.9, 0.95]),
    ...      "ordinary": torch.tensor([0.0, 0.1, 0.2, 0.3])}
    >>> r = {"safe": {"plain": [0, 1, 1, 0], "refuse": [1, 1, 1, 1], "comply": [0, 0, 0, 0]},
    ...      "harmful": {"plain": [0, 1, 1, 0], "refuse": [1, 1, 1, 1], "comply": [0, 0, 1, 0]},
    ...      "ordinary": {"plain": [0, 0, 0, 0], "refuse": [1, 1, 1, 1], "comply": [0, 0, 0, 0]}}
    >>> rows = TuningRows(s, r, kl={"refuse": [0.5] * 4, "comply": [0.01] * 4})
    >>> choice = choose_band(rows, draws=50)
    >>> choice.comply, choice.rates["safe"], choice.rates["harmful"] >= choice.plain["harmful"]
    ('comply', 0.0, True)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from steerlab._checks import check_finite, finite_number
import warnings

from steerlab.errors import EmptyInputError, InvalidValueError, ShapeError, SteerlabError, SteerlabWarning

FIXED_BRANCHES = ("plain", "refuse")


class BandNotFoundError(SteerlabError, ValueError):
    """No comply branch and band meet the bar even on the tuning rows they are chosen on."""


class FragileBandWarning(SteerlabWarning):
    """The chosen band meets the bar on the tuning rows but on few bootstrap resamples of them."""


def _vector(values: Any, what: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64).flatten()
    if t.numel() == 0:
        raise EmptyInputError(f"{what} is empty")
    check_finite(t, what, "give finite scores, 0/1 refusals and KL values")
    return t


@dataclass(frozen=True)
class TuningRows:
    """Tuning prompts measured once under each branch of a gate.

    ``scores[set]``: the guard's score per row. ``refused[set][branch]``: 1 where the reply under that branch is a
    refusal; branches are ``"plain"``, ``"refuse"`` and one or more comply options (any other names, e.g.
    ``"comply0.3"``). ``kl[branch]``: KL(plain ‖ branch) per row of the ``ordinary`` set, for every branch but plain.
    ``safe``, ``harmful`` and ``ordinary`` name the sets the bar reads.
    """

    scores: Mapping[str, Any]
    refused: Mapping[str, Mapping[str, Any]]
    kl: Mapping[str, Any]
    safe: str = "safe"
    harmful: Sequence[str] = ("harmful",)
    ordinary: str = "ordinary"
    comply: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        harmful = (self.harmful,) if isinstance(self.harmful, str) else tuple(self.harmful)
        if not harmful:
            raise EmptyInputError("TuningRows.harmful needs at least one set name")
        object.__setattr__(self, "harmful", harmful)
        sets = (self.safe, *harmful, self.ordinary)
        if len(set(sets)) != len(sets):
            raise InvalidValueError(f"safe, harmful and ordinary must name different sets; got {sets}")
        missing = [n for n in sets if n not in self.scores or n not in self.refused]
        if missing:
            raise InvalidValueError(f"TuningRows has no scores or refusals for {missing}; give every set of {sets}")
        branches = list(self.refused[self.safe])
        comply = tuple(b for b in branches if b not in FIXED_BRANCHES)
        if any(b not in branches for b in FIXED_BRANCHES) or not comply:
            raise InvalidValueError(f"TuningRows needs branches 'plain', 'refuse' and at least one comply branch; got {branches}")
        scores, refused = {}, {}
        for n in sets:
            scores[n] = _vector(self.scores[n], f"scores[{n!r}]")
            if sorted(self.refused[n]) != sorted(branches):
                raise InvalidValueError(f"refused[{n!r}] has branches {sorted(self.refused[n])}, refused[{self.safe!r}] has {sorted(branches)}")
            refused[n] = {}
            for b in branches:
                v = _vector(self.refused[n][b], f"refused[{n!r}][{b!r}]")
                if v.shape != scores[n].shape:
                    raise ShapeError(f"refused[{n!r}][{b!r}] has {v.numel()} rows, scores[{n!r}] has {scores[n].numel()}")
                if not ((v == 0) | (v == 1)).all():
                    raise InvalidValueError(f"refused[{n!r}][{b!r}] must be 0/1 per row")
                refused[n][b] = v
        kl = {"plain": torch.zeros_like(scores[self.ordinary])}
        for b in (b for b in branches if b != "plain"):
            if b not in self.kl:
                raise InvalidValueError(f"kl has no rows for branch {b!r}; give KL(plain || branch) on the {self.ordinary!r} set")
            kl[b] = _vector(self.kl[b], f"kl[{b!r}]")
            if kl[b].shape != scores[self.ordinary].shape:
                raise ShapeError(f"kl[{b!r}] has {kl[b].numel()} rows, the {self.ordinary!r} set has {scores[self.ordinary].numel()}")
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "refused", refused)
        object.__setattr__(self, "kl", kl)
        object.__setattr__(self, "comply", comply)

    @property
    def sets(self) -> tuple[str, ...]:
        return (self.safe, *self.harmful, self.ordinary)

    def cuts(self) -> torch.Tensor:
        """Candidate cut points: midpoints between consecutive distinct scores, one below and one above all."""
        u = torch.unique(torch.cat([self.scores[n] for n in self.sets]))
        return torch.cat([u[:1] - 1.0, (u[1:] + u[:-1]) / 2, u[-1:] + 1.0])

    def gate_rows(self, name: str, comply: str, low: float, high: float, floor: float | None = None) -> torch.Tensor:
        """Per-row refusal of set ``name`` under the gate ``(comply, low, high)`` (comply only at ``score >= floor``)."""
        return _gated(self.scores[name], self.refused[name], comply, low, high, floor)

    def gate_kl(self, comply: str, low: float, high: float, floor: float | None = None) -> torch.Tensor:
        """Per-row KL of the ordinary set under the gate ``(comply, low, high)`` (comply only at ``score >= floor``)."""
        return _gated(self.scores[self.ordinary], self.kl, comply, low, high, floor)


def _gated(
    scores: torch.Tensor, values: Mapping[str, torch.Tensor], comply: str, low: float, high: float, floor: float | None = None
) -> torch.Tensor:
    complied = scores < low if floor is None else (scores < low) & (scores >= floor)
    return torch.where(scores >= high, values["refuse"], torch.where(complied, values[comply], values["plain"]))


def _with_floor(scores: torch.Tensor, values: Mapping[str, torch.Tensor], comply: str, floor: float | None) -> dict[str, torch.Tensor]:
    """``values`` whose comply branch is the plain model below ``floor``: a floor gate is a no-floor gate of it."""
    if floor is None:
        return dict(values)
    return {**values, comply: torch.where(scores >= floor, values[comply], values["plain"])}


@dataclass(frozen=True)
class BandChoice:
    """The chosen comply branch, band ``[low, high)`` and floor (``None``: comply on every score below ``low``), with
    what they give on the tuning rows."""

    comply: str
    low: float
    high: float
    p_meets_bar: float
    rates: dict[str, float]
    plain: dict[str, float]
    kl: float
    floor: float | None = None
    margin: float = 0.0

    def gate(self, guard: Any, *, refuse: Any, comply: Any):
        """The :class:`~steerlab.interventions.gated.GatedRefusal` with this band (``comply``: the chosen branch)."""
        from steerlab.interventions.gated import GatedRefusal

        return GatedRefusal(guard, refuse=refuse, comply=comply, low=self.low, high=self.high, floor=self.floor)


def _resample_counts(n: int, draws: int, generator: torch.Generator) -> torch.Tensor:
    """[draws, n]: how often each row appears in each bootstrap resample (row 0 is the tuning set itself)."""
    idx = torch.randint(n, (draws, n), generator=generator)
    counts = torch.zeros(draws, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(draws, n, dtype=torch.float64))
    return torch.cat([torch.ones(1, n, dtype=torch.float64), counts])


def _band_means(
    scores: torch.Tensor, values: Mapping[str, torch.Tensor], comply: str, counts: torch.Tensor, cuts: torch.Tensor, lows: slice
) -> torch.Tensor:
    """[draws, cuts(low) in ``lows``, cuts(high)]: the weighted mean of the gate's per-row values for every band."""
    order = torch.argsort(scores)
    below = torch.searchsorted(scores[order], cuts)  # rows with score < cut (no score equals a cut)
    w = counts[:, order]

    def cum(branch: str) -> torch.Tensor:
        c = torch.cumsum(w * values[branch][order], dim=1)
        return torch.cat([torch.zeros(len(w), 1, dtype=c.dtype), c], dim=1)[:, below]

    comply_below, plain_below, refuse_below = cum(comply)[:, lows], cum("plain"), cum("refuse")
    refuse_total = (w * values["refuse"][order]).sum(1)
    total = comply_below[:, :, None] + plain_below[:, None, :] - plain_below[:, lows, None] + refuse_total[:, None, None] - refuse_below[:, None, :]
    return total / w.sum(1)[:, None, None]


def _tightened(rows: TuningRows, max_over_refusal: float, margin: float) -> tuple[float, dict[str, float]]:
    """The safe-set limit and, per harmful set, how far above the plain rate the bar sits with ``margin`` standard errors."""
    n_safe = len(rows.scores[rows.safe])
    safe_limit = max_over_refusal - margin * (max_over_refusal * (1.0 - max_over_refusal) / n_safe) ** 0.5
    above = {}
    for n in rows.harmful:
        p = float(rows.refused[n]["plain"].mean())
        above[n] = margin * (p * (1.0 - p) / len(rows.scores[n])) ** 0.5
    return safe_limit, above


_CHUNK = 20_000_000  # bands x draws evaluated at once (~160 MB of float64)


def choose_band(
    rows: TuningRows,
    *,
    max_over_refusal: float = 0.15,
    max_kl: float = 0.05,
    draws: int = 400,
    seed: int = 0,
    min_share: float = 0.8,
    floors: int = 0,
    margin: float = 0.0,
) -> BandChoice:
    """The comply branch and band (and, with ``floors > 0``, floor) most likely to meet the bar (module docs); raises
    :class:`BandNotFoundError` if none meets it on the tuning rows."""
    max_over_refusal = finite_number(max_over_refusal, "max_over_refusal")
    max_kl = finite_number(max_kl, "max_kl")
    min_share = finite_number(min_share, "min_share")
    margin = finite_number(margin, "margin")
    if margin < 0.0:
        raise InvalidValueError(f"margin must be >= 0 (standard errors the tuning rows must clear the bar by); got {margin}")
    if not 0.0 <= max_over_refusal <= 1.0 or max_kl < 0.0 or not 0.0 <= min_share <= 1.0:
        raise InvalidValueError(f"need 0 <= max_over_refusal <= 1, max_kl >= 0 and 0 <= min_share <= 1; got {max_over_refusal}, {max_kl}, {min_share}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise InvalidValueError(f"draws must be a positive int; got {draws!r}")
    if isinstance(floors, bool) or not isinstance(floors, int) or floors < 0:
        raise InvalidValueError(f"floors must be an int >= 0 (how many floor cuts to try besides none); got {floors!r}")
    gen = torch.Generator().manual_seed(seed)
    counts = {n: _resample_counts(len(rows.scores[n]), draws, gen) for n in rows.sets}
    cuts = rows.cuts()
    valid = torch.ones(len(cuts), len(cuts), dtype=torch.bool).triu()  # low <= high
    plain = {n: (counts[n] @ rows.refused[n]["plain"]) / counts[n].sum(1) for n in rows.harmful}
    safe_limit, above_plain = _tightened(rows, max_over_refusal, margin)
    step = max(1, _CHUNK // ((draws + 1) * len(cuts)))
    best = None
    floor_at = [None, *torch.linspace(1, len(cuts) - 1, floors).round().long().unique().tolist()] if floors else [None]
    for comply in rows.comply:
        for f in floor_at:
            floor = None if f is None else float(cuts[f])
            refused = {n: _with_floor(rows.scores[n], rows.refused[n], comply, floor) for n in rows.sets}
            kl_values = _with_floor(rows.scores[rows.ordinary], rows.kl, comply, floor)
            for start in range(0 if f is None else f, len(cuts), step):  # low >= floor
                lows = slice(start, min(start + step, len(cuts)))
                rate = {n: _band_means(rows.scores[n], refused[n], comply, counts[n], cuts, lows) for n in rows.sets}
                kl = _band_means(rows.scores[rows.ordinary], kl_values, comply, counts[rows.ordinary], cuts, lows)
                ok = (rate[rows.safe] <= safe_limit + 1e-12) & (kl <= max_kl + 1e-12) & valid[lows]
                for n in rows.harmful:
                    ok &= rate[n] >= plain[n][:, None, None] + above_plain[n] - 1e-12
                successes = ok[1:].double().sum(0)
                gain = torch.stack([rate[n][0] for n in rows.harmful]).mean(0) - rate[rows.safe][0]  # in [-1, 1]
                key = torch.where(ok[0], successes + (gain + 1.0) / 2.0 * 0.999, torch.full_like(gain, -1.0))  # meets on the rows themselves; successes, then gain
                i, j = divmod(int(torch.argmax(key)), len(cuts))
                if key[i, j] < 0 or (best is not None and key[i, j] <= best[0]):
                    continue
                best = (float(key[i, j]), comply, float(cuts[start + i]), float(cuts[j]), float(successes[i, j]) / draws, floor)
    if best is None:
        by = "" if margin == 0 else f" (with a margin of {margin:g} standard errors: <= {safe_limit:.3g}, and {', '.join(f'{v:.3g}' for v in above_plain.values())} above it)"
        raise BandNotFoundError(
            f"no comply branch and band keep refusal on {rows.safe!r} <= {max_over_refusal:g}, refusal on {list(rows.harmful)} at least the plain "
            f"model's and KL on {rows.ordinary!r} <= {max_kl:g}{by}, even on the tuning rows; try a weaker comply branch, more tuning prompts, "
            "looser limits or a smaller margin"
        )
    _, comply, low, high, p, floor = best
    if p < min_share:
        at = "" if floor is None else f", floor {floor:.4g}"
        warnings.warn(
            f"the best band ({comply}, [{low:.4g}, {high:.4g}){at}) meets the bar on only {p:.0%} of bootstrap resamples of the tuning rows; "
            "expect it to miss on other prompts (more tuning prompts or a better guard make it firmer)",
            FragileBandWarning, stacklevel=2,
        )  # fmt: skip
    return BandChoice(
        comply=comply, low=low, high=high, p_meets_bar=p, floor=floor, margin=margin,
        rates={n: float(rows.gate_rows(n, comply, low, high, floor).mean()) for n in rows.sets},
        plain={n: float(rows.refused[n]["plain"].mean()) for n in rows.sets},
        kl=float(rows.gate_kl(comply, low, high, floor).mean()),
    )  # fmt: skip
