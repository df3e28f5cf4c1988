"""Issue 19: does a guard that reads the mean of the instruction's tokens separate safe-but-scary from unsafe prompts
on unseen kinds better than one reading a single token?

Every guard so far read one position (``t_inst`` or ``last``). Here each prompt's ``resid_pre`` is averaged over the
tokens of the instruction (slot 0) and over the instruction plus the template suffix up to the last prompt token
(slot 1), at every layer, and the probe recipe of experiments/framed_guard_qwen.py is fitted on those features:
leave-one-kind-out AUC per layer, and the gate's split (unsafe vs safe, unsafe vs the safe prompts the plain model
refuses). The instruction's first token is located by the instruction's own token count (its boundary token may be off
by one where the template and the instruction merge; a mean over tens of tokens barely notices).

Run: ``python -u experiments/pooled_guard_qwen.py`` (~5 min to read every guard prompt once, cached in
runs/guards/acts_pooled.pt, then ~4 min); writes runs/guards/pooled.json. Compare with runs/guards/framed.json
(``plain``: the single-token reading).
"""

import json
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).parent))
from calibrated_gate_qwen import prompt_splits  # noqa: E402
from framed_guard_qwen import OUT, gate_split_aucs, kind_aucs  # noqa: E402
from gate_floor_qwen import branch_refusals  # noqa: E402
from guards_cross_source import LAYERS, POSITIONS, read_cached  # noqa: E402

CACHE = OUT / "acts_pooled.pt"
SLOTS = {"t_inst": "mean over the instruction", "last": "mean over instruction + template suffix"}  # cache slot names


def pooled(model, prompts: list[str], batch_size: int = 16) -> torch.Tensor:
    """``[n, n_layers, 2, d]``: resid_pre averaged over each prompt's instruction tokens, and over those plus the
    template suffix."""
    chat = model.chat()
    rows = chat.tokenize(prompts)
    n_inst = [len(model.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    out = torch.empty(len(prompts), model.n_layers, 2, model.d_model)
    with torch.no_grad():
        for idx, batch in chat.batches(rows, batch_size):
            hidden = model.hf(**batch.model_inputs(), output_hidden_states=True).hidden_states[: model.n_layers]
            h = torch.stack(hidden, 1).float()  # [b, L, T, d]; hidden_states[l] enters layer l
            for j, i in enumerate(idx):
                t, last = int(batch.t_inst[j]), int(batch.last[j])
                start = max(t - n_inst[i] + 1, last + 1 - int(batch.lengths[j]))
                out[i, :, 0] = h[j, :, start : t + 1].mean(1)
                out[i, :, 1] = h[j, :, start : last + 1].mean(1)
    return out


def collect_pooled() -> None:
    read_cached(CACHE, pooled, tag="pooled")


def main():
    torch.set_num_threads(2)
    collect_pooled()
    tune, held = prompt_splits()
    refused_safe = branch_refusals("held")[0]["safe"]["plain"]
    report = {"slots": SLOTS, "layers": list(LAYERS), "kinds": kind_aucs(CACHE), "gate_split": gate_split_aucs(CACHE, tune, held, refused_safe)}
    for pos in POSITIONS:
        k, g = report["kinds"][pos], report["gate_split"][pos]
        best = int(torch.tensor(k["mean"]).argmax())
        print(f"{SLOTS[pos]}: leave-one-kind-out AUC best layer {LAYERS[best]} {k['mean'][best]:.3f} "
              f"(per kind {', '.join(f'{n} {v[best]:.2f}' for n, v in k['per_kind'].items())}); gate split layers {g['layers']}: "
              f"unsafe/safe {g['unsafe_vs_safe']:.3f}, unsafe/refused safe {g['unsafe_vs_refused_safe']:.3f}, "
              f"harmbench/ordinary {g['harmbench_vs_ordinary']:.3f}", flush=True)  # fmt: skip
    (OUT / "pooled.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
