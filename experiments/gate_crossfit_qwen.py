"""Issue 19: tuning rows of more kinds for the gate's choice, by cross-fitting the probe guard.

experiments/gate_floor_qwen.py chose the gate on two kinds of safe-but-scary prompts (homonyms, figurative) and missed
the bar on two others (safe targets, safe contexts). More tuning kinds would help, but the probe guard is fitted on
the remaining four (definitions, history, fiction, public figures' privacy), so its scores there are in-sample. Here
each of those kinds is scored by a guard fitted without it (the same layers, the same fit), the way an unseen kind is
scored, and those rows join the tuning rows: 120 safe / 72 unsafe instead of 40 / 24. The plain model generates the
four kinds under each branch once (cached as runs/token_gate_seeds/branches_trainkinds_*.json, ~12 minutes).

Run: ``python -u experiments/gate_crossfit_qwen.py --direction runs/refusal/refusal_direction.safetensors``;
writes runs/gate_floor/crossfit.json.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

import steerlab
from steerlab.data.guard_sets import scary_sets
from steerlab.probes.metrics import roc_auc
from steerlab.steering import Direction

sys.path.insert(0, str(Path(__file__).parent))
from calibrated_gate_qwen import GUARD_OUT, prompt_splits  # noqa: E402
from gate_floor_qwen import BRANCHES, OUT, POSITION, branch_refusals, choose, fit_guard, guard_training, rows_of  # noqa: E402
from token_gate_seeds import branch_rows  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--direction", required=True)
    ap.add_argument("--floors", type=int, default=24)
    args = ap.parse_args()
    kinds = [s for s in scary_sets() if s.kind not in GUARD_OUT]
    prompts = {"safe": [p for s in kinds if not s.harmful for p in s.prompts], "unsafe": [p for s in kinds if s.harmful for p in s.prompts]}
    strengths = [float(b.removeprefix("comply")) for b in BRANCHES if b.startswith("comply")]
    cached = Path("runs/token_gate_seeds/branches_trainkinds_safe.json")
    if not cached.is_file() or any(b not in json.loads(cached.read_text())["texts"] for b in BRANCHES):
        torch.set_num_threads(2)
        branch_rows(steerlab.load(dtype=torch.float32), Direction.load(args.direction), "trainkinds", prompts, strengths=strengths, coeff=1.0,
                    gen={"max_new_tokens": 24})  # fmt: skip
    more, _ = branch_refusals("trainkinds", ("safe", "unsafe"))
    tune, held = prompt_splits()
    report = {}
    for position in POSITION:
        feats, x, y, groups, layers = guard_training(position)
        probe = fit_guard(x, y, groups, layers)
        scores = {split: {n: probe.decision_function(feats(ps)[:, layers]).double().mean(1) for n, ps in d.items()} for split, d in (("tune", tune), ("held", held))}
        oof = {"safe": [], "unsafe": []}
        for s in kinds:  # each training kind scored by a guard fitted without it
            keep = torch.tensor([not g.endswith(f":{s.kind}") for g in groups])
            fold = fit_guard(x, y, groups, layers, keep)
            oof["unsafe" if s.harmful else "safe"].append(fold.decision_function(feats(list(s.prompts))[:, layers]).double().mean(1))
        oof = {n: torch.cat(v) for n, v in oof.items()}
        tuned, held_rows = rows_of("tune", scores["tune"], (more, oof)), rows_of("held", scores["held"])
        entry = {"layers": layers, "out_of_fold_auc": roc_auc(torch.cat([oof["unsafe"], oof["safe"]]), [1] * len(oof["unsafe"]) + [0] * len(oof["safe"])),
                 "branch_refusal_on_the_added_kinds": {n: {b: float(v.mean()) for b, v in more[n].items()} for n in more}}  # fmt: skip
        for floors in (0, args.floors):
            entry[f"floors={floors}"] = choose(tuned, held_rows, floors)
        report[position] = entry
        print(position, json.dumps(entry), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "crossfit.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
