"""choose_band: the vectorised band rates equal a per-band loop; the choice equals a brute-force search of the same
bootstrap resamples; tuning rows read off the branches equal a real gated generation."""

import warnings

import pytest
import torch

from steerlab import Ablate, AddVector
from steerlab.data import DEMO_HARMFUL, DEMO_HARMLESS
from steerlab.errors import EmptyInputError, InvalidValueError, NonFiniteError, ShapeError
from steerlab.measure.gate_rows import measure_tuning_rows
from steerlab.interventions.gated import GatedRefusal
from steerlab.measure.gate_band import BandNotFoundError, FragileBandWarning, TuningRows, _band_means, _resample_counts, choose_band
from steerlab.probes import LatentGuard
from steerlab.testing import tiny_direction, tiny_model

SIZES = {"safe": 12, "unsafe": 9, "harmbench": 10, "ordinary": 11}
BRANCHES = ("plain", "refuse", "comply_a", "comply_b")


def _rows(seed: int, *, refuse_p=0.9, comply_p=0.1, plain_p=0.4) -> TuningRows:
    g = torch.Generator().manual_seed(seed)
    # an informative but imperfect guard: harmful rows score high, safe and ordinary ones low, with overlap
    scores = {n: torch.rand(k, generator=g).double() ** 2 for n, k in SIZES.items()}
    scores |= {n: 1 - scores[n] for n in ("unsafe", "harmbench")}
    p = {"plain": plain_p, "refuse": refuse_p, "comply_a": comply_p, "comply_b": comply_p * 2}
    refused = {n: {b: (torch.rand(k, generator=g) < p[b]).double() for b in BRANCHES} for n, k in SIZES.items()}
    kl = {"refuse": torch.rand(11, generator=g).double() * 0.3, "comply_a": torch.rand(11, generator=g).double() * 0.1,
          "comply_b": torch.rand(11, generator=g).double() * 0.02}  # fmt: skip
    return TuningRows(scores, refused, kl, harmful=("unsafe", "harmbench"))


def _brute_force(rows: TuningRows, *, draws, seed, max_over_refusal=0.15, max_kl=0.05, floors=False, safe_limit=None, above_plain=None):
    """Every (comply, low, high[, floor]) scored with an explicit loop over the same resamples:
    {setting: (meets, successes, gain)}; ``floors``: also every cut as a floor (<= low). ``safe_limit`` /
    ``above_plain[set]``: a stricter bar (default: ``max_over_refusal`` and the plain rate itself)."""
    safe_limit = max_over_refusal if safe_limit is None else safe_limit
    above_plain = above_plain or {}
    gen = torch.Generator().manual_seed(seed)
    counts = {n: _resample_counts(len(rows.scores[n]), draws, gen) for n in rows.sets}
    mean = lambda n, v: (counts[n] @ v) / counts[n].sum(1)  # noqa: E731
    cuts = rows.cuts().tolist()
    out = {}
    for comply in rows.comply:
        for i, low in enumerate(cuts):
            for high in cuts[i:]:
                for floor in [None, *(cuts[1 : i + 1] if floors else [])]:
                    rate = {n: mean(n, rows.gate_rows(n, comply, low, high, floor)) for n in rows.sets}
                    kl = mean(rows.ordinary, rows.gate_kl(comply, low, high, floor))
                    ok = (rate[rows.safe] <= safe_limit + 1e-12) & (kl <= max_kl + 1e-12)
                    for n in rows.harmful:
                        ok &= rate[n] >= mean(n, rows.refused[n]["plain"]) + above_plain.get(n, 0.0) - 1e-12
                    gain = sum(float(rate[n][0]) for n in rows.harmful) / len(rows.harmful) - float(rate[rows.safe][0])
                    out[(comply, low, high) + ((floor,) if floors else ())] = (bool(ok[0]), int(ok[1:].sum()), gain)
    return out


def test_band_means_equal_a_loop_over_bands():
    rows = _rows(0)
    counts = _resample_counts(SIZES["safe"], 5, torch.Generator().manual_seed(1))
    cuts = rows.cuts()
    got = _band_means(rows.scores["safe"], rows.refused["safe"], "comply_a", counts, cuts, slice(0, len(cuts)))
    for i in range(0, len(cuts), 3):
        for j in range(i, len(cuts), 2):
            v = rows.gate_rows("safe", "comply_a", float(cuts[i]), float(cuts[j]))
            torch.testing.assert_close(got[:, i, j], (counts @ v) / counts.sum(1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_choice_is_the_brute_force_best_on_the_same_resamples(seed):
    rows = _rows(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FragileBandWarning)
        choice = choose_band(rows, draws=40, seed=seed)
    table = _brute_force(rows, draws=40, seed=seed)
    meets = {k: v for k, v in table.items() if v[0]}
    best = max((v[1], v[2]) for v in meets.values())
    mine = table[(choice.comply, choice.low, choice.high)]
    assert mine[0] and mine[1] == best[0] and mine[2] == pytest.approx(best[1])
    assert choice.p_meets_bar == mine[1] / 40
    # the reported rates are the gate's rates on the tuning rows, and they meet the bar
    assert choice.rates["safe"] <= 0.15 and choice.kl <= 0.05
    for n in ("unsafe", "harmbench"):
        assert choice.rates[n] >= choice.plain[n]
    # not every setting meets it, so the search had something to reject
    assert len(meets) < len(table)


@pytest.mark.parametrize("seed", [0, 4])
def test_a_floor_search_is_the_brute_force_best_over_every_floor(seed):
    """floors >= the number of cuts tries every cut as a floor; the choice is the best of an explicit search over
    (comply, floor <= low <= high) on the same resamples, and no worse than the best setting without a floor."""
    rows = _rows(seed, comply_p=0.0)
    # ordinary rows score lowest; comply_a removes every refusal but costs more KL than the bar allows, so only a
    # floor that spares the ordinary rows admits it
    scores = {**rows.scores, "ordinary": rows.scores["ordinary"] * 0.2, "safe": 0.2 + rows.scores["safe"] * 0.5}
    rows = TuningRows(scores, rows.refused, {**rows.kl, "comply_a": torch.full((11,), 0.2, dtype=torch.float64)}, harmful=("unsafe", "harmbench"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FragileBandWarning)
        choice = choose_band(rows, draws=20, seed=seed, floors=len(rows.cuts()))
        plain_choice = choose_band(rows, draws=20, seed=seed)
    table = _brute_force(rows, draws=20, seed=seed, floors=True)
    best = max((v[1], v[2]) for v in table.values() if v[0])
    mine = table[(choice.comply, choice.low, choice.high, choice.floor)]
    assert mine[0] and mine[1] == best[0] and mine[2] == pytest.approx(best[1])
    assert choice.p_meets_bar == mine[1] / 20 >= plain_choice.p_meets_bar
    assert choice.rates["safe"] == pytest.approx(float(rows.gate_rows("safe", choice.comply, choice.low, choice.high, choice.floor).mean()))
    # the floor mattered: some floor setting with comply_a meets the bar, and no comply_a setting without one does
    assert any(v[0] for k, v in table.items() if k[0] == "comply_a" and k[3] is not None)
    assert not any(v[0] for k, v in table.items() if k[0] == "comply_a" and k[3] is None)
    gate = choice.gate(LatentGuard(torch.ones(1, 2), -torch.ones(1, 2), layers=(0,)), refuse=object(), comply=object())
    assert gate.floor == choice.floor
    with pytest.raises(InvalidValueError, match="floors"):
        choose_band(rows, floors=-1)


@pytest.mark.parametrize("seed", [0, 3])
def test_a_margin_is_the_brute_force_best_under_the_bar_tightened_by_standard_errors(seed):
    rows = _rows(seed, refuse_p=1.0, comply_p=0.0, plain_p=0.3)
    n, p = SIZES, {h: float(rows.refused[h]["plain"].mean()) for h in rows.harmful}
    safe_limit = 0.3 - 0.5 * (0.3 * 0.7 / n["safe"]) ** 0.5
    above = {h: 0.5 * (p[h] * (1 - p[h]) / n[h]) ** 0.5 for h in rows.harmful}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FragileBandWarning)
        choice = choose_band(rows, draws=30, seed=seed, max_over_refusal=0.3, margin=0.5)
    table = _brute_force(rows, draws=30, seed=seed, max_over_refusal=0.3, safe_limit=safe_limit, above_plain=above)
    best = max((v[1], v[2]) for v in table.values() if v[0])
    mine = table[(choice.comply, choice.low, choice.high)]
    assert mine[0] and mine[1] == best[0] and mine[2] == pytest.approx(best[1]) and choice.margin == 0.5
    assert choice.rates["safe"] <= safe_limit and all(choice.rates[h] >= choice.plain[h] + above[h] for h in rows.harmful)
    # the margin excluded settings the plain bar admits
    plain_bar = _brute_force(rows, draws=30, seed=seed, max_over_refusal=0.3)
    assert sum(v[0] for v in table.values()) < sum(v[0] for v in plain_bar.values())
    with pytest.raises(BandNotFoundError, match="margin of 20 standard errors"):
        choose_band(rows, draws=5, margin=20.0)
    with pytest.raises(InvalidValueError, match="margin must be >= 0"):
        choose_band(rows, margin=-0.5)


def test_the_choice_does_not_depend_on_how_the_bands_are_chunked(monkeypatch):
    from steerlab.measure import gate_band

    rows = _rows(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FragileBandWarning)
        whole = choose_band(rows, draws=30, seed=1)
        monkeypatch.setattr(gate_band, "_CHUNK", 31 * len(rows.cuts()) * 7)  # seven low cuts at a time
        assert choose_band(rows, draws=30, seed=1) == whole


def test_a_band_that_rarely_meets_the_bar_warns():
    with pytest.warns(FragileBandWarning, match="only 20%"):
        assert choose_band(_rows(0), draws=40, seed=0).p_meets_bar == 0.2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_band(_rows(2), draws=40, seed=2).p_meets_bar == 1.0
        choose_band(_rows(0), draws=40, seed=0, min_share=0.1)


def test_a_bar_no_band_meets_raises():
    rows = _rows(0, refuse_p=0.9, comply_p=0.9, plain_p=0.9)  # every branch refuses safe prompts
    with pytest.raises(BandNotFoundError, match="weaker comply branch"):
        choose_band(rows, draws=10)


def test_bad_rows_and_options_raise():
    rows = _rows(0)
    refused = {n: dict(v) for n, v in rows.refused.items()}
    with pytest.raises(InvalidValueError, match="comply branch"):
        TuningRows(rows.scores, {n: {b: v[b] for b in ("plain", "refuse")} for n, v in refused.items()}, rows.kl, harmful=("unsafe", "harmbench"))
    bad = {n: dict(v) for n, v in refused.items()}
    bad["safe"]["refuse"] = bad["safe"]["refuse"][:-1]
    with pytest.raises(ShapeError, match="rows"):
        TuningRows(rows.scores, bad, rows.kl, harmful=("unsafe", "harmbench"))
    bad["safe"]["refuse"] = torch.full((12,), 0.5, dtype=torch.float64)
    with pytest.raises(InvalidValueError, match="0/1"):
        TuningRows(rows.scores, bad, rows.kl, harmful=("unsafe", "harmbench"))
    with pytest.raises(InvalidValueError, match="no rows for branch 'comply_b'"):
        TuningRows(rows.scores, refused, {"refuse": rows.kl["refuse"], "comply_a": rows.kl["comply_a"]}, harmful=("unsafe", "harmbench"))
    with pytest.raises(NonFiniteError, match="scores\\['safe'\\]"):
        TuningRows({**rows.scores, "safe": torch.full((12,), float("nan"))}, refused, rows.kl, harmful=("unsafe", "harmbench"))
    with pytest.raises(InvalidValueError, match="no scores"):
        TuningRows(rows.scores, refused, rows.kl)  # the default harmful set is not there
    for kwargs in ({"draws": 0}, {"max_over_refusal": 1.5}, {"max_kl": -1.0}, {"min_share": 2.0}):
        with pytest.raises(InvalidValueError):
            choose_band(rows, **kwargs)


def _length_judge(text: str) -> bool:
    """A stand-in judge that depends on every token of the reply, so a row that did not follow its branch shows."""
    return len(text) % 2 == 0


def test_rows_read_off_the_branches_equal_real_gated_generation():
    model = tiny_model("llama")
    guard = LatentGuard.fit(model, DEMO_HARMFUL[5:], DEMO_HARMLESS[9:], layers=[1, 2])  # none of the tuning prompts
    d = tiny_direction(model, layer=1)
    sets = {"safe": DEMO_HARMLESS[:5], "harmful": DEMO_HARMFUL[:5], "ordinary": DEMO_HARMLESS[5:9]}
    refuse, comply = AddVector(d, coeff=8.0), {"ablate": Ablate(d), "half": Ablate(d, strength=0.5)}
    rows = measure_tuning_rows(model, guard, sets, refuse=refuse, comply=comply, max_new_tokens=5, refused=_length_judge)
    scores = torch.cat([rows.scores[n] for n in rows.sets]).sort().values
    low, high = float(scores[4]), float(scores[-4])
    actions = set()
    for name in ("safe", "harmful", "ordinary"):
        for option in ("ablate", "half"):
            gated = GatedRefusal(guard, refuse=refuse, comply=comply[option], low=low, high=high)
            outs = model.generate(sets[name], policy=gated, max_new_tokens=5)
            real = torch.tensor([float(_length_judge(o.text)) for o in outs], dtype=torch.float64)
            torch.testing.assert_close(real, rows.gate_rows(name, option, low, high))
            actions |= {o.action for o in outs}
    assert actions == {"refuse", "comply", "leave"}
    # the branches differ on these rows, so reading the wrong branch would fail the comparison
    assert any(not torch.equal(rows.refused[n]["refuse"], rows.refused[n]["plain"]) for n in rows.sets)
    assert (rows.kl["ablate"] >= 0).all() and rows.kl["ablate"].sum() > rows.kl["half"].sum() > 0


def test_the_chosen_band_builds_its_gate_and_bad_options_raise():
    model = tiny_model("llama")
    guard = LatentGuard.fit(model, DEMO_HARMFUL[4:], DEMO_HARMLESS[8:], layers=[1])  # none of the tuning prompts
    d = tiny_direction(model, layer=1)
    sets = {"safe": DEMO_HARMLESS[:4], "harmful": DEMO_HARMFUL[:4], "ordinary": DEMO_HARMLESS[4:8]}
    comply = {"ablate": Ablate(d), "weak": Ablate(d, strength=0.1)}
    try:
        rows = measure_tuning_rows(model, guard, sets, refuse=AddVector(d, coeff=8.0), comply=comply, max_new_tokens=3)
        choice = choose_band(rows, max_kl=10.0, draws=20, min_share=0.0)
        gated = choice.gate(guard, refuse=AddVector(d, coeff=8.0), comply=comply[choice.comply])
    except BandNotFoundError:
        pytest.fail("with KL allowed up to 10 and a random model's replies, some band meets the bar")
    assert (gated.low, gated.high) == (choice.low, choice.high) and gated.comply is comply[choice.comply]
    assert choice.rates == {n: float(rows.gate_rows(n, choice.comply, choice.low, choice.high).mean()) for n in rows.sets}
    with pytest.raises(InvalidValueError, match="cannot be named"):
        measure_tuning_rows(model, guard, sets, refuse=AddVector(d), comply={"plain": Ablate(d)})
    with pytest.raises(EmptyInputError, match="comply"):
        measure_tuning_rows(model, guard, sets, refuse=AddVector(d), comply={})
    with pytest.raises(EmptyInputError, match="sets\\['ordinary'\\]"):
        measure_tuning_rows(model, guard, {"safe": sets["safe"], "harmful": sets["harmful"]}, refuse=AddVector(d), comply=comply)
