"""Issue 19: does a guard that reads a token *and* an instruction mean make the calibrated-refusal choice transfer?

Stop 34 found that single-token guards (``t_inst`` / ``last``) generalise across sources and guards on the
instruction's mean across kinds of prompt; neither met the bar reliably (experiments/pooled_gate_seeds_qwen.py). This
combines them: ``P(harmful) = sigmoid(mean of the two guards' logits)``, the rule a multi-layer probe already uses for
its layers.

Fixed before any combined result was read:

* guards per seed 0-2 (the seed draws the prompts of sets larger than 120 and the folds): ``tokens`` (the default
  positions) and ``pooled`` (``inst_mean``, ``inst_to_last_mean`` only), each by ``probe_sweep``'s own choice of
  position and layers, fitted without the gate's kinds and sources (pooled_gate_seeds_qwen.LEAVE_OUT);
* ``combined``: the mean of the two guards' logits;
* the same choice and judgement as pooled_gate_seeds_qwen (``choose_band(floors=24)`` on the tuning rows, the bar on
  the other split's rows), both split directions, with and without the unsafe tuning set;
* the count of runs meeting the bar held out, and the held-out AUC of unsafe vs the safe prompts the plain model
  refuses (the number that decides it), per guard.

Added in the same session, before any result was read: ``+kinds`` guards, fitted the same way on a pool with six more
safe-but-scary kinds written for steerlab (steerlab/data/safe_but_scary_more.jsonl: protective, medical,
security_defense, law_and_crime, household_hazards, analysis_of_harm; 20 safe and 16 unsafe each; not XSTest's kinds,
so the gate's four held-out kinds stay unseen), each kind one family for the kind-held-out CV. (Since stop 36 the
library builds this pool: ``probe_data(scary_kinds=ALL_SCARY_KINDS)``, ``steerlab probe --more-kinds``; the same
prompts, sources and order as the experiment's own first version, so the cached guards stay valid.)

Run after the branch rows exist (``experiments/token_gate_seeds.py --strengths 0.3 0.5 1 --branches-only``):
``python -u experiments/combined_guard_seeds_qwen.py [--seeds 0 ...] [--guards pooled+kinds ...]`` (~5 min per guard
not yet cached in runs/gate_seeds, then ~2 min per guard and seed); writes runs/gate_seeds/combined[_SEEDS][_GUARDS].json.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

import steerlab
from steerlab.data.guard_sets import ALL_SCARY_KINDS
from steerlab.probes import Probe, ProbeGuard
from steerlab.probes.metrics import roc_auc
from steerlab.probes.pipeline import DEFAULT_C, probe_data, probe_sweep

sys.path.insert(0, str(Path(__file__).parent))
import pooled_gate_seeds_qwen as seeds  # noqa: E402
from calibrated_gate_qwen import prompt_splits  # noqa: E402

seeds.POSITIONS["pooled"] = ("inst_mean", "inst_to_last_mean")
GUARDS = ("tokens", "pooled", "combined", "tokens+kinds", "pooled+kinds", "combined+kinds")


def guard_more(model, name: str, seed: int) -> ProbeGuard:
    path = seeds.OUT / f"guard_{name}_more_{seed}.safetensors"
    if not path.exists():
        data = probe_data(files=None, seed=seed, limit=None, n_folds=5, leave_out=seeds.LEAVE_OUT, scary_kinds=ALL_SCARY_KINDS)
        run = probe_sweep(model, data, site="resid_pre", positions=seeds.POSITIONS[name], layers=None, n_folds=5, C=DEFAULT_C,
                          metric="auc", seed=seed, batch_size=16, log=print)  # fmt: skip
        run.probe.save(path)
    return ProbeGuard(Probe.load(path), model=model)


def unseen_guard(model, name: str, seed: int, splits: dict) -> ProbeGuard:
    """Guard ``name`` (``pooled``, ``tokens+kinds``, ...) of ``seed``; exits if it has seen a tuning or held-out prompt."""
    g = seeds.guard(model, name, seed) if "+" not in name else guard_more(model, name.split("+")[0], seed)
    if g.trained_on is None or any(g.trained_on.seen(ps).any() for split in splits.values() for ps in split.values()):
        raise SystemExit(f"guard {name} seed {seed} has seen a tuning or held-out prompt")
    return g


def held_aucs(split: str, scores: dict) -> dict:
    """Held-out AUCs of ``split`` (judged when the other split tunes): unsafe vs safe, and vs the safe prompts the plain
    model refuses."""
    refused_safe = seeds.rows_of(split, scores).refused["safe"]["plain"].bool()
    u, s = scores["unsafe"], scores["safe"]
    return {"unsafe vs safe": roc_auc(torch.cat([u, s]), [1] * len(u) + [0] * len(s)),
            "unsafe vs refused safe": roc_auc(torch.cat([u, s[refused_safe]]), [1] * len(u) + [0] * int(refused_safe.sum()))}  # fmt: skip


def options(argv: list[str]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """``--seeds 0 ...`` (default 0 1 2) and ``--guards NAME ...`` (default all; a combined guard needs its two parts)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", nargs="+", type=int, default=list(seeds.SEEDS))
    parser.add_argument("--guards", nargs="+", choices=GUARDS, default=list(GUARDS))
    args = parser.parse_args(argv)
    return tuple(args.seeds), tuple(g for g in GUARDS if g in args.guards)


def main():
    seeds.SEEDS, guards = options(sys.argv[1:])
    parts = {"combined": ("tokens", "pooled"), "combined+kinds": ("tokens+kinds", "pooled+kinds")}
    fitted = [g for g in ("tokens", "pooled", "tokens+kinds", "pooled+kinds") if g in guards or any(g in parts[c] for c in parts if c in guards)]
    torch.set_num_threads(2)
    model = steerlab.load(dtype=torch.float32)
    tune, held = prompt_splits()
    splits = {"tune": tune, "held": held}
    report, met = {}, {g: 0 for g in guards}
    for seed in seeds.SEEDS:
        scores, readers = {}, {}
        for name in fitted:
            g = unseen_guard(model, name, seed, splits)
            readers[name] = f"{g.probe.position} {list(g.probe.layers)}"
            scores[name] = {k: {n: g.score(ps).double() for n, ps in split.items()} for k, split in splits.items()}
        for more in [m for m in ("", "+kinds") if f"combined{m}" in guards]:
            scores[f"combined{more}"] = {k: {n: torch.sigmoid((torch.logit(scores[f"tokens{more}"][k][n], eps=1e-12) + torch.logit(scores[f"pooled{more}"][k][n], eps=1e-12)) / 2)
                                             for n in splits[k]} for k in splits}  # fmt: skip
            readers[f"combined{more}"] = f"{readers[f'tokens{more}']} + {readers[f'pooled{more}']}"
        for name in guards:
            key = f"{name} seed {seed}"
            report[key] = {"reads": readers[name]} | {way: seeds.judged(*(("tune", "held") if way.startswith("split") else ("held", "tune")),
                                                                         scores[name], unsafe="unsafe" in way) for way in seeds.WAYS}  # fmt: skip
            report[key]["auc"] = {held: held_aucs(held, scores[name][held]) for held in ("held", "tune")}
            for way in seeds.WAYS:
                r = report[key][way]
                if r["choice"] is None:
                    print(f"{key} ({readers[name]}), {way}: no setting meets the bar on the tuning rows", flush=True)
                    continue
                h, c = r["held"], r["choice"]
                met[name] += bool(h["meets_bar"])
                print(f"{key} ({readers[name]}), {way}: {c['comply']} on [{c['floor']}, {c['low']:.3f}), refuse >= {c['high']:.3f}, "
                      f"share {c['share']:.0%}; held out safe {h['safe']:.3f}, unsafe {h['unsafe']:.3f}, HarmBench {h['harmbench']:.3f}, "
                      f"KL {h['kl']:.4f}; AUC unsafe vs refused safe {r['held_auc_unsafe_vs_refused_safe']:.3f}: "
                      f"{'MEETS' if h['meets_bar'] else 'misses'}", flush=True)  # fmt: skip
        report["met"] = met
        tag = ("" if seeds.SEEDS == (0, 1, 2) else "_" + "_".join(map(str, seeds.SEEDS))) + ("" if guards == GUARDS else "_" + "_".join(guards))
        (seeds.OUT / f"combined{tag}.json").write_text(json.dumps(report, indent=1))
    print(f"runs meeting the bar held out (of {4 * len(seeds.SEEDS)} per guard):", met)
    for name in guards:
        aucs = [report[f"{name} seed {seed}"]["auc"][held][k] for seed in seeds.SEEDS for held in ("held", "tune")
                for k in ("unsafe vs safe", "unsafe vs refused safe")]  # fmt: skip
        print(f"{name}: held-out AUC over seeds and both directions, unsafe vs safe {sum(aucs[0::2]) / len(aucs[0::2]):.3f}, "
              f"unsafe vs refused safe {sum(aucs[1::2]) / len(aucs[1::2]):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
