"""Why `steerlab refusal` adds the direction with coefficient 2: bypass, KL and induce scores on a grid.

Fits the refusal candidates as the command does (judge-filtered training prompts, float32), then for
positions -1, -2, -5 and every second layer prints the bypass score, the KL under ablation and the
mean harmless refusal score with the candidate added at coefficients 1, 2 and 4 (16 + 16 validation
prompts, bfloat16). Run: ``python experiments/refusal_candidate_grid.py`` (about 8 minutes).
"""

import torch

import steerlab
from steerlab.data import load_split
from steerlab.eval import kl_divergence, refusal_score
from steerlab.eval.logits import last_token_logprobs
from steerlab.steering import Ablate, AddVector, Direction
from steerlab.steering.refusal import filter_prompts, fit_candidates

split = load_split()
model = steerlab.load(dtype=torch.bfloat16)
harmful = filter_prompts(model, split.harmful_train, refuse=True, how="judge")
harmless = filter_prompts(model, split.harmless_train, refuse=False, how="judge")
candidates, offsets = fit_candidates(steerlab.load(dtype=torch.float32), harmful, harmless, progress=False)
val_h, val_s = split.harmful_val[:16], split.harmless_val[:16]
base = last_token_logprobs(model, val_s)
print(f"baseline refusal score: harmful {refusal_score(model, val_h).mean():+.2f}, harmless {refusal_score(model, val_s).mean():+.2f}")
print(f"{'pos':>4} {'layer':>5} {'|r|':>6} {'bypass':>7} {'KL':>6}  induce at c = 1, 2, 4")
for pos in (-1, -2, -5):
    for layer in range(2, 20, 2):
        d = Direction(vectors=candidates[offsets.index(pos), layer][None], layers=(layer,))
        with model.apply(Ablate(d)):
            bypass = refusal_score(model, val_h).mean().item()
            kl = kl_divergence(base, last_token_logprobs(model, val_s)).mean().item()
        induce = []
        for coeff in (1.0, 2.0, 4.0):
            with model.apply(AddVector(d, coeff=coeff, layers=[layer])):
                induce.append(refusal_score(model, val_s).mean().item())
        print(f"{pos:>4} {layer:>5} {d.vectors.norm():6.2f} {bypass:+7.2f} {kl:6.3f}  " + "  ".join(f"{v:+.2f}" for v in induce))
