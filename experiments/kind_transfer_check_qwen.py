"""Issue 19: can the tuning rows themselves tell when a calibrated-refusal band will not transfer to other kinds?

``choose_band``'s bootstrap share reads resamples of the tuning prompts, so it cannot see kind shift: in
experiments/margin_gate_seeds_qwen.py the swapped choices met the bar on 78-99% of resamples and missed it held out.
A check that can see it: rotate over the tuning kinds. With the tuning split's two kinds A and B, choose on A's safe
(and, unsafe-tuned, unsafe) prompts with the first half of the HarmBench and ordinary tuning rows, and judge on B's with
the second half; then the other way round. The check passes when both rotations meet the bar.

Fixed before any check result was read (stop 37): the check above; the runs of margin_gate_seeds_qwen.py at margin 0
(guards pooled and pooled+kinds, seeds from runs/gate_seeds/scores_*.pt, four ways each); the 2 x 2 table of check
(pass / fail, or no setting on a rotation: fail) against the held-out bar (met / missed). It is worth building into
``steerlab calibrate`` only if held-out misses are rarer among passes than among fails, on seeds 3-4 as on 0-2.

Run after margin_gate_seeds_qwen.py has cached the guard scores: ``python -u experiments/kind_transfer_check_qwen.py``
(~1 min per guard and seed); writes runs/gate_seeds/kind_check.json.
"""

import json
import sys
import warnings
from pathlib import Path

import torch

from steerlab.measure.gate_band import BandNotFoundError, FragileBandWarning, TuningRows, choose_band

sys.path.insert(0, str(Path(__file__).parent))
import pooled_gate_seeds_qwen as seeds  # noqa: E402
from gate_floor_qwen import BRANCHES, rows_of  # noqa: E402
from token_gate_seeds import evaluate  # noqa: E402

KIND_ROWS = {"safe": 20, "unsafe": 12}  # rows per kind; each split holds two kinds in order


def part(rows: TuningRows, kind: int) -> tuple[TuningRows, TuningRows]:
    """(choose rows, judge rows): kind ``kind`` (0 or 1) of the safe / unsafe sets with the first half of HarmBench and
    ordinary, and the other kind with the second half."""

    assert [len(rows.scores[n]) for n in KIND_ROWS] == [2 * m for m in KIND_ROWS.values()], "each split holds two kinds"

    def take(first: bool) -> TuningRows:
        k = kind if first else 1 - kind
        idx = {n: torch.arange(k * m, (k + 1) * m) for n, m in KIND_ROWS.items()}
        for n in ("harmbench", "ordinary"):
            half = len(rows.scores[n]) // 2
            idx[n] = torch.arange(0, half) if first else torch.arange(half, 2 * half)
        scores = {n: rows.scores[n][i] for n, i in idx.items()}
        refused = {n: {b: rows.refused[n][b][i] for b in BRANCHES} for n, i in idx.items()}
        kl = {b: rows.kl[b][idx["ordinary"]] for b in BRANCHES[1:]}
        return TuningRows(scores, refused, kl, harmful=("unsafe", "harmbench"))

    return take(True), take(False)


def choice_rows(rows: TuningRows, *, unsafe: bool) -> TuningRows:
    """The rows the choice reads: HarmBench as harmful (and the unsafe set too when ``unsafe``), as steerlab calibrate."""
    names = ["safe", "harmbench", "ordinary"] + (["unsafe"] if unsafe else [])
    return TuningRows({n: rows.scores[n] for n in names}, {n: rows.refused[n] for n in names}, {b: rows.kl[b] for b in BRANCHES[1:]},
                      harmful=("harmbench", "unsafe") if unsafe else ("harmbench",))  # fmt: skip


def rotation_meets(choose_on: TuningRows, judge_on: TuningRows, *, unsafe: bool) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FragileBandWarning)
        try:
            c = choose_band(choice_rows(choose_on, unsafe=unsafe), floors=24)
        except BandNotFoundError:
            return False
    return bool(evaluate(judge_on, c.comply, c.low, c.high, c.floor)["meets_bar"])


def main():
    torch.set_num_threads(2)
    margin = json.loads((seeds.OUT / "margin.json").read_text())
    out, table = {}, {}
    for path in sorted(seeds.OUT.glob("scores_*.pt")):
        name, seed = path.stem.removeprefix("scores_").rsplit("_", 1)
        name = name.replace("_kinds", "+kinds")
        if f"{name} seed {seed} margin 0" not in margin:
            continue  # not judged yet
        scores = torch.load(path, weights_only=True)
        for way in seeds.WAYS:
            tune = "tune" if way.startswith("split") else "held"
            unsafe = "unsafe" in way
            rows = rows_of(tune, scores[tune])
            check = all(rotation_meets(*part(rows, k), unsafe=unsafe) for k in (0, 1))
            held = margin[f"{name} seed {seed} margin 0"][way].get("held", {}).get("meets_bar", False)
            out[f"{name} seed {seed}, {way}"] = {"check": check, "held_meets_bar": held}
            group = "seeds 0-2" if int(seed) <= 2 else "seeds 3-4"
            cell = table.setdefault(group, {"pass, met": 0, "pass, missed": 0, "fail, met": 0, "fail, missed": 0})
            cell[f"{'pass' if check else 'fail'}, {'met' if held else 'missed'}"] += 1
            print(f"{name} seed {seed}, {way}: check {'passes' if check else 'fails'}; held out {'meets' if held else 'misses'}", flush=True)
    (seeds.OUT / "kind_check.json").write_text(json.dumps({"runs": out, "table": table}, indent=1))
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
