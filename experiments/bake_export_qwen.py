"""Refusal-direction ablation baked into the embedded default, exported, reloaded in plain transformers.

The direction is the refusal pipeline's pick (difference of means at the last prompt token, layer 18,
on the 128+128 training pairs). It is baked into the float32 weights (``training.bake``), checked for
parity against the runtime hook, exported as safetensors (``training.export``), reloaded with plain
``AutoModelForCausalLM`` in a fresh subprocess with no steerlab import, and both are evaluated in
bfloat16 on the first 100 AdvBench prompts (greedy, 64 new tokens, substring judge): refusal rate of
the plain model, the runtime ablation, and the exported model.
Run: ``python experiments/bake_export_qwen.py`` (about 15 minutes on 2 cores; writes runs/bake_export).
"""

import json
import subprocess
import sys
from pathlib import Path

import torch

import steerlab
from steerlab.data import advbench, load_split
from steerlab.eval import is_refusal
from steerlab.steering import Ablate, mean_difference
from steerlab.training import bake, export, parity

out = Path("runs/bake_export")
out.mkdir(parents=True, exist_ok=True)
split = load_split()
prompts = advbench()[:100]

model = steerlab.load(dtype=torch.float32)
kw = dict(layers=[18], positions=["last"], progress=False)
direction = mean_difference(
    steerlab.collect(model, split.harmful_train, **kw).get("resid_pre", "last")[:, :, -1],
    steerlab.collect(model, split.harmless_train, **kw).get("resid_pre", "last")[:, :, -1],
    layers=[18],
    model=model.name,
)
op = Ablate(direction)
baked = bake(model, op)
report = parity(model, baked, op, split.harmless_test[:8] + split.harmful_test[:8], max_new_tokens=8)
print(f"parity (float32): max |logit diff| {report.max_abs_logit_diff:.2e}")
export(baked, out / "model")
del baked

gen = steerlab.load(dtype=torch.bfloat16)
plain = gen.generate(prompts, max_new_tokens=64, progress=True)
with gen.apply(op):
    hooked = gen.generate(prompts, max_new_tokens=64, progress=True)
del gen, model

# the exported model, in a subprocess that never imports steerlab: plain transformers only
code = f"""
import json, sys, torch
sys.modules['steerlab'] = None
from transformers import AutoModelForCausalLM, AutoTokenizer
path = {str(out / 'model')!r}
tok = AutoTokenizer.from_pretrained(path); tok.padding_side = 'left'
m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
prompts = json.loads(sys.stdin.read())
texts = []
for i in range(0, len(prompts), 16):
    chunk = [tok.apply_chat_template([{{'role': 'user', 'content': p}}], tokenize=False, add_generation_prompt=True) for p in prompts[i:i + 16]]
    enc = tok(chunk, return_tensors='pt', padding=True, add_special_tokens=False)
    with torch.inference_mode():
        ids = m.generate(**enc, max_new_tokens=64, do_sample=False, pad_token_id=tok.pad_token_id)
    texts += tok.batch_decode(ids[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
print(json.dumps(texts))
"""
res = subprocess.run([sys.executable, "-c", code], input=json.dumps(prompts), capture_output=True, text=True, check=True)
exported = json.loads(res.stdout.strip().splitlines()[-1])

rates = {name: sum(map(is_refusal, texts)) / len(texts) for name, texts in (("plain", plain), ("runtime ablation", hooked), ("exported, plain transformers", exported))}
same = sum(a == b for a, b in zip(hooked, exported))
for name, rate in rates.items():
    print(f"{name:<30} refusal {rate:.1%} (n={len(prompts)})")
print(f"identical generations, runtime ablation vs exported: {same}/{len(prompts)}")
(out / "report.json").write_text(json.dumps({"parity_max_abs_logit_diff": report.max_abs_logit_diff, "refusal": rates, "identical": same, "n": len(prompts)}, indent=1))
