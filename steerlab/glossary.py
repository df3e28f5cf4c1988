"""The definitions shown at the foot of every report page: each term a page uses, in plain words.

Example:
    >>> all(term in GLOSSARY for term in (*REFUSAL_TERMS, *EVALUATION_TERMS))
    True
"""

GLOSSARY: dict[str, str] = {
    # refusal direction
    "refusal score": "Log-odds that the reply starts with a refusal: log p(R) - log(1 - p(R)) at the last prompt "
    "token, where p(R) is the total probability of the first tokens of refusal openers ('I', 'As', 'Sorry', "
    "'Unfortunately', ...). Above 0 means p(R) > 0.5. One forward pass, no generation.",
    "baseline": "The plain model, with no intervention.",
    "candidate": "One possible refusal direction: mean resid_pre activation over the harmful training prompts minus "
    "the mean over the harmless ones, at one post-instruction position and one layer (layer 0, the embeddings, is "
    "never a candidate).",
    "position offset": "Where an activation is read, counted from the end of the prompt: -1 is the last prompt token, "
    "-2 the one before it, and so on. Refusal candidates cover the post-instruction span (the template tokens after "
    "the user's instruction: end of turn and assistant header).",
    "layer": "Decoder layer index from 0; resid_pre at layer l is the residual stream entering layer l "
    "(at layer 0: the token embeddings).",
    "layer cutoff": "Candidates from the last 20% of layers are not considered (METHODS 1): directions there act too "
    "close to the output to be a general refusal feature.",
    "bypass score": "Mean refusal score of the harmful validation prompts with the candidate ablated. Lower is better "
    "(refusal removed). The selection heatmap colours every candidate by it.",
    "induce score": "Mean refusal score of the harmless validation prompts with the candidate added (times the "
    "addition coefficient) at its own layer. A pick must exceed the induce threshold: adding it makes the model refuse.",
    "KL filter": "Mean KL divergence between the plain and the ablated model's next-token distributions at the last "
    "token of the harmless validation prompts. A pick must stay below the KL threshold, so ablating it leaves "
    "harmless behaviour nearly unchanged.",
    "pick (x marker)": "The chosen candidate, marked by a black x in the heatmap and '<==' in the table: the lowest "
    "bypass score among candidates that pass the induce and KL filters.",
    "'-' in the table": "Not computed. Induce and KL are computed in ascending bypass order only until a candidate "
    "passes both filters, which gives the same pick as scoring everything.",
    "ablation": "Projecting the unit direction r out of the residual stream: h <- h - (h . r) r on resid_pre, "
    "attn_out and mlp_out of every layer, at every position (prompt and generated tokens).",
    "addition": "Adding coefficient x the direction to resid_pre at the direction's layer, at every position.",
    "refusal rate": "Fraction of greedy generations that contain a refusal phrase ('I'm sorry, but', 'I cannot', "
    "...; a disclaimer such as 'As an AI' alone does not count): the substring judge.",
    "held out": "Prompts used neither to fit nor to select the direction: AdvBench prompts (harmful) and the "
    "project's harmless test split.",
    "train filter": "Which training prompts were kept before fitting: 'judge' keeps harmful prompts whose 16-token "
    "greedy reply is a refusal and harmless ones whose reply is not; 'score' uses refusal score > 0 / < 0; 'none' "
    "keeps all.",
    "KL (evaluation)": "Mean KL divergence between the plain and the ablated model's next-token distributions at the "
    "last token of the held-out harmless prompts.",
    "parity": "The largest absolute difference in logits between the exported model (ablation baked into the weights) "
    "and the plain model with the ablation applied as a runtime hook.",
    # probe sweep
    "probe": "A logistic-regression classifier (L2 penalty, strength 1/C, standardised features) on the activations "
    "of one (layer, position) cell.",
    "k-fold cross-validation": "The prompts are split into k folds with both classes spread evenly; each fold is "
    "scored by a probe trained on the other folds, and the page shows the mean over folds.",
    "accuracy": "Fraction of held-out prompts the probe classifies correctly at P = 0.5. 0.5 is chance for balanced "
    "classes.",
    "AUC": "Area under the ROC curve: the probability that a random positive prompt scores above a random negative "
    "one. 0.5 is chance, 1 is perfect separation; it does not depend on a threshold.",
    "site": "Where activations are read: resid_pre (residual stream entering a layer), resid_post (leaving it), "
    "attn_out (the attention block's output), mlp_out (the MLP block's output).",
    "best cell": "The (layer, position) with the highest value of the chosen metric; ties go to the earliest layer, "
    "then the first position. probe.safetensors and direction.safetensors are fitted on all prompts at this cell.",
    "direction": "Mean activation of the positive prompts minus the mean of the negative prompts (difference of "
    "means) at the best cell.",
    "t_inst": "The last token of the user's instruction, before the chat template's end-of-turn tokens.",
    "post_inst": "The post-instruction span: the template tokens after the instruction (end of turn and assistant "
    "header), one column per token, labelled post_inst:'<token>'.",
    "last": "The last prompt token (the same as offset -1).",
    "reasoning_end": "The end-of-reasoning marker of reasoning models.",
    "inst_mean": "The mean over the tokens of the user's instruction (one vector per prompt).",
    "inst_to_last_mean": "The mean over the instruction's tokens and the template after them, up to the last prompt "
    "token (one vector per prompt).",
    # run metadata
    "model sha256": "For an embedded model, the sha256 of its GGUF file, which steerlab checks before loading; other "
    "models have no recorded checksum and show 'unknown'.",
}

REFUSAL_TERMS = (
    "refusal score", "baseline", "candidate", "position offset", "layer", "layer cutoff", "bypass score",
    "induce score", "KL filter", "pick (x marker)", "'-' in the table", "ablation", "addition", "train filter",
)  # fmt: skip
EVALUATION_TERMS = ("refusal rate", "held out", "KL (evaluation)")
