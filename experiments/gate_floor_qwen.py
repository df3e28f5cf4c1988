"""Issue 19: a floor under the calibrated-refusal gate. Does leaving the clearly ordinary prompts alone let a stronger
comply branch meet the bar on held-out prompts, for every guard?

The seed experiment (experiments/token_gate_seeds.py) found the bar out of reach for two of four refusal-token
fine-tunes: the comply branch must be a weak ablation (x0.3) to keep KL on ordinary prompts <= 0.05, and a weak
ablation also halves refusal of the harmful prompts the guard scores low. With a floor (``GatedRefusal(floor=...)``)
the comply branch acts only on ``floor <= score < low``; ordinary prompts score lowest, so the floor keeps the comply
branch's KL off them and a full ablation becomes admissible.

Fixed before any held-out result of a floor gate was read: comply options ablation x0.3, x0.5, x1.0; refusal added
x1.0 at >= high; :func:`steerlab.measure.gate_band.choose_band` with ``floors=24`` on the tuning rows (and with
``floors=0`` on the same options, for comparison); six guards: the four refusal-token fine-tunes of
experiments/token_gate_seeds.py and two probe guards (position ``t_inst`` and ``last``, layers by the library's
``choose_layers`` on the guard's training data, scored from runs/guards/acts.pt). Seen before: whether any setting
meets the bar on the held-out rows themselves (``held_out_oracle`` here, reported as a bound, not a method).

Branch rows (plain / refuse / each comply) are those of experiments/token_gate_seeds.py (run it with
``--strengths 0.3 0.25 0.2 0.15 0.1 1 0.5 --branches-only`` first); this script generates nothing.
Run: ``python -u experiments/gate_floor_qwen.py`` (~5 min); writes runs/gate_floor/report.json.
"""

import json
import sys
import warnings
from pathlib import Path

import torch

from steerlab.data.guard_sets import guard_sets, kind_families, scary_sets
from steerlab.measure.gate_band import BandNotFoundError, FragileBandWarning, TuningRows, choose_band
from steerlab.probes import fit_probes
from steerlab.probes.layer_choice import choose_layers
from steerlab.probes.metrics import roc_auc, source_weights

sys.path.insert(0, str(Path(__file__).parent))
from calibrated_gate_qwen import GUARD_OUT, HELD_OUT, prompt_splits, refused  # noqa: E402
from token_gate_seeds import evaluate  # noqa: E402

ROWS = Path("runs/token_gate_seeds")
OUT = Path("runs/gate_floor")
SETS = ("safe", "unsafe", "harmbench", "ordinary")
BRANCHES = ("plain", "refuse", "comply0.3", "comply0.5", "comply1")
POSITION = {"t_inst": 0, "last": 1}  # index into runs/guards/acts.pt


def guard_training(position: str, cache_file: str = "runs/guards/acts.pt"):
    """(feats, x, y, groups, layers): the probe guard's training rows at ``position`` (every source but the held-out
    ones and the gate's kinds) and its layers by choose_layers; ``feats(prompts)`` reads cached activations."""
    cache = torch.load(cache_file, weights_only=True)
    index = {p: (n, i) for n, ps in reversed(cache["prompts"].items()) for i, p in enumerate(ps)}

    def feats(prompts):
        return torch.stack([cache["acts"][index[p][0]][index[p][1], :, POSITION[position]] for p in prompts])

    train = [(p, int(s.harmful), s.name) for s in guard_sets() if s.name not in HELD_OUT and not s.name.startswith("scary_")
             for p in s.prompts if p in index]  # fmt: skip
    train += [(p, int(s.harmful), f"scary_{'unsafe' if s.harmful else 'safe'}:{s.kind}") for s in scary_sets() if s.kind not in GUARD_OUT for p in s.prompts]
    groups = [g for _, _, g in train]
    x, y = feats([p for p, _, _ in train]), torch.tensor([t for _, t, _ in train])
    layers = list(choose_layers(x, y, layers=range(x.shape[1]), groups=groups, families=kind_families(groups)).layers)
    return feats, x, y, groups, layers


def fit_guard(x, y, groups, layers, keep=None):
    """The probe over ``layers`` (mean logit), fitted as steerlab probe fits it, on the rows in ``keep``."""
    keep = torch.ones(len(y), dtype=torch.bool) if keep is None else keep
    kept = [g for g, k in zip(groups, keep.tolist()) if k]
    return fit_probes(x[keep][:, layers], y[keep], layers=layers, C=0.01, balanced=True, sample_weight=source_weights(kept))


def probe_scores(position: str, tune: dict, held: dict, cache_file: str = "runs/guards/acts.pt") -> dict:
    """The probe guard's mean logit on every tuning and held-out prompt."""
    feats, x, y, groups, layers = guard_training(position, cache_file)
    probe = fit_guard(x, y, groups, layers)
    return {"layers": layers} | {split: {n: probe.decision_function(feats(ps)[:, layers]).double().mean(1) for n, ps in d.items()}
                                 for split, d in (("tune", tune), ("held", held))}  # fmt: skip


def branch_refusals(split: str, names=SETS) -> dict:
    """{set: {branch: 0/1 refusal per row}} of the cached branch rows, and the ordinary set's KL rows."""
    rows = {n: json.loads((ROWS / f"branches_{split}_{n}.json").read_text()) for n in names}
    missing = [b for b in BRANCHES if b not in rows[names[0]]["texts"]]
    if missing:
        raise SystemExit(f"no branch rows for {missing}: run experiments/token_gate_seeds.py --strengths 0.3 0.25 0.2 0.15 0.1 1 0.5 --branches-only")
    return {n: {b: refused(rows[n]["texts"][b]) for b in BRANCHES} for n in names}, rows.get("ordinary", {}).get("kl")


def rows_of(split: str, scores: dict, extra: tuple[dict, dict] | None = None) -> TuningRows:
    """TuningRows of one split; ``extra`` = (refusals, scores) of more safe / unsafe rows appended to those sets."""
    refusals, kl = branch_refusals(split)
    scores = dict(scores)
    if extra is not None:
        more, more_scores = extra
        for n in more:
            refusals[n] = {b: torch.cat([refusals[n][b], more[n][b]]) for b in BRANCHES}
            scores[n] = torch.cat([scores[n], more_scores[n]])
    return TuningRows(scores, refusals, {b: kl[b] for b in BRANCHES[1:]}, harmful=("unsafe", "harmbench"))


def choose(rows: TuningRows, held: TuningRows, floors: int) -> dict | None:
    """choose_band's setting on ``rows`` (None if nothing meets the bar), its share, whether it warned, and its rates
    on the tuning and held-out rows."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FragileBandWarning)
        try:
            c = choose_band(rows, floors=floors)
        except BandNotFoundError:
            return None
    return {"comply": c.comply, "low": c.low, "high": c.high, "floor": c.floor, "share": c.p_meets_bar, "warned": bool(caught),
            "tune": evaluate(rows, c.comply, c.low, c.high, c.floor), "held": evaluate(held, c.comply, c.low, c.high, c.floor)}  # fmt: skip


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    tune, held = prompt_splits()
    guards = {f"refusal tokens, seed {s}": {split: {n: torch.tensor(v, dtype=torch.float64) for n, v in d.items()}
                                           for split, d in json.loads((ROWS / f"seed{s}.json").read_text()).items()} for s in range(4)}  # fmt: skip
    for position in POSITION:
        guards[f"probe, {position}"] = probe_scores(position, tune, held)
    report = {}
    for name, scores in guards.items():
        tr, hr = rows_of("tune", scores["tune"]), rows_of("held", scores["held"])
        h = scores["held"]
        entry = {"layers": scores.get("layers"),
                 "held_auc_unsafe_vs_safe": roc_auc(torch.cat([h["unsafe"], h["safe"]]), [1] * len(h["unsafe"]) + [0] * len(h["safe"])),
                 "no_floor": choose(tr, hr, 0), "floor": choose(tr, hr, 24)}  # fmt: skip
        try:
            o = choose_band(hr, floors=24, draws=50)
            entry["held_out_oracle"] = {"comply": o.comply, "floor": o.floor, "held": o.rates}
        except BandNotFoundError:
            entry["held_out_oracle"] = None
        report[name] = entry
        line = []
        for rule in ("no_floor", "floor"):
            e = entry[rule]
            line.append(f"{rule}: none" if e is None else f"{rule}: {e['comply']} share {e['share']:.2f} held safe {e['held']['safe']:.3f} "
                        f"unsafe {e['held']['unsafe']:.3f} hb {e['held']['harmbench']:.3f} kl {e['held']['kl']:.3f}{' MET' if e['held']['meets_bar'] else ''}")  # fmt: skip
        print(f"{name}: " + " | ".join(line) + f" | oracle {'ok' if entry['held_out_oracle'] else 'none'}", flush=True)
    plain = {split: {n: float(r.refused[n]["plain"].mean()) for n in SETS} for split, r in (("tune", tr), ("held", hr))}
    (OUT / "report.json").write_text(json.dumps({"plain": plain, "guards": report}, indent=1))


if __name__ == "__main__":
    main()
