"""Targeted unlearning: exact masks, losses against hand computation, UOE on every MoE family."""

from __future__ import annotations

import math

import pytest
import torch

from steerlab.errors import SteerlabError
from steerlab.testing import FAMILIES, tiny_model
from steerlab.training.unlearn import (
    NPO,
    RMU,
    Columns,
    Expert,
    GradDiff,
    GradientAscent,
    Heads,
    Layers,
    Learn,
    LoRA,
    UnlearnConfig,
    unlearn,
)
from steerlab.training.unlearn.losses import sequence_logprob
from steerlab.training.unlearn.targets import parameters_in

FORGET = [("Who created the Python language?", "Guido"), ("What is pip for?", "packages"), ("Name a snake.", "python")]
RETAIN = [
    ("What is the capital of France?", "Paris"),
    ("What colour is the sky?", "blue"),
    ("Count to three.", "one two three"),
]
MOE = [f for f in FAMILIES if tiny_model(f).spec.moe is not None]


def _changed(before: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Per parameter, the bool map of entries that differ bit-for-bit from ``before``."""
    return {name: p.detach() != before[name] for name, p in model.hf.named_parameters()}


def _assert_only_mask_changed(model, result, masks) -> None:
    before = dict(model.hf.named_parameters())
    diff = _changed({k: v.detach() for k, v in before.items()}, result.model)
    for name, changed in diff.items():
        if name in masks:
            allowed = torch.ones_like(changed) if masks[name] is None else masks[name]
            assert not (changed & ~allowed).any(), f"{name}: entries outside the mask changed"
        else:
            assert not changed.any(), f"{name} is outside the target but changed"
    assert any(diff[name].any() for name in masks), "nothing inside the mask changed: the training did not act"


@pytest.mark.parametrize(
    "family,target",
    [
        ("llama", Columns(((1, 3), (1, 50), (2, 7)))),
        ("llama", Heads(((0, 1), (2, 3)))),
        ("llama", Layers((1,), part="mlp")),
        ("qwen2_moe", Columns(((1, 2, 5), (1, "shared", 3)))),
        ("gemma2", Heads(((1, 0),))),
    ],
)
def test_only_the_mask_changes(family, target):
    model = tiny_model(family)
    masks = target.masks(model)
    result = unlearn(model, FORGET, RETAIN, objective=GradDiff(), target=target, config=UnlearnConfig(steps=3, lr=1e-2))
    _assert_only_mask_changed(model, result, masks)
    assert result.trained_parameters == parameters_in(model, masks)


def test_the_callers_model_is_untouched():
    model = tiny_model("llama")
    snapshot = {k: v.detach().clone() for k, v in model.hf.state_dict().items()}
    unlearn(model, FORGET, RETAIN, objective=NPO(), target=Layers((0, 1)), config=UnlearnConfig(steps=2, lr=1e-2))
    assert all(torch.equal(snapshot[k], v) for k, v in model.hf.state_dict().items())


def _forget_logprob(model) -> torch.Tensor:
    """Independent oracle: log p(answer | chat prompt) summed token by token with plain HF calls."""
    from steerlab.training.data import SFTExample, encode_examples

    out = []
    for prompt, answer in FORGET:
        row = encode_examples(model.chat(), [SFTExample(prompt, answer)])[0]
        input_ids = torch.tensor([row.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model.hf(input_ids=input_ids).logits[0].double(), -1)
        total = sum(float(logp[t - 1, row.input_ids[t]]) for t in range(1, len(row.input_ids)) if row.labels[t] != -100)
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def test_npo_first_step_matches_hand_computed():
    """At step 0 the policy is the reference: NPO = -(2/β) log σ(0) = (2/β) ln 2 whatever the data."""
    model = tiny_model("llama")
    beta = 0.25
    result = unlearn(model, FORGET, objective=NPO(beta=beta, retain_weight=0.0), target=Layers((2,)),
                     config=UnlearnConfig(steps=2, lr=1e-2, batch_size=3))  # fmt: skip
    assert result.losses[0]["npo"] == pytest.approx(2 / beta * math.log(2), rel=1e-5)
    assert result.losses[0]["forget_logratio"] == pytest.approx(0.0, abs=1e-5)
    # step 2's loss follows the formula with the log-ratio of the model after one update (checked by hand)
    ratio = result.losses[1]["forget_logratio"]
    assert ratio < 0
    assert result.losses[1]["npo"] >= -(2 / beta) * math.log(1 / (1 + math.exp(beta * ratio))) - 1e-4


def test_sequence_logprob_matches_token_by_token_oracle():
    from steerlab.training.data import SFTExample, encode_examples
    from steerlab.training.sft import collate

    model = tiny_model("qwen2")
    rows = encode_examples(model.chat(), [SFTExample(p, a) for p, a in FORGET])
    batch = collate(rows, pad_id=0)
    with torch.no_grad():
        logits = model.hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ours = sequence_logprob(logits, batch["labels"]).double()
    assert torch.allclose(ours, _forget_logprob(model), atol=1e-4)


def test_rmu_first_step_matches_hand_computed():
    model = tiny_model("llama")
    layer, coeff = 1, 3.0
    from steerlab.training.data import SFTExample, encode_examples
    from steerlab.training.sft import collate

    rows = encode_examples(model.chat(), [SFTExample(p, a) for p, a in FORGET])
    batch = collate(rows, pad_id=0)
    with torch.no_grad():  # decoder layer `layer`'s output is hidden_states[layer + 1]
        h = model.hf(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        ).hidden_states[layer + 1]
    mask = batch["attention_mask"].bool()
    u = torch.rand(h.shape[-1], generator=torch.Generator().manual_seed(0))
    control = u / u.norm() * h[mask].norm(dim=-1).mean() * coeff
    expected = ((h - control).pow(2).mean(-1) * mask).sum() / mask.sum()
    result = unlearn(model, FORGET, RETAIN, objective=RMU(layer=layer, coeff=coeff, alpha=10.0),
                     target=Layers((0, 1), part="mlp"), config=UnlearnConfig(steps=3, lr=1e-3, batch_size=3))  # fmt: skip
    assert result.losses[0]["forget_mse"] == pytest.approx(float(expected), rel=1e-4)
    assert result.losses[0]["retain_mse"] == pytest.approx(0.0, abs=1e-6)  # the frozen model is the start
    assert result.losses[-1]["forget_mse"] < result.losses[0]["forget_mse"]


def test_rmu_refuses_parameters_it_cannot_reach():
    model = tiny_model("llama")
    with pytest.raises(SteerlabError, match="no gradient"):
        unlearn(model, FORGET, RETAIN, objective=RMU(layer=0), target=Layers((2,)), config=UnlearnConfig(steps=1))


def test_objective_without_retain_data_says_so():
    with pytest.raises(SteerlabError, match="retain"):
        unlearn(tiny_model("llama"), FORGET, objective=GradDiff(), target=Layers((1,)), config=UnlearnConfig(steps=1))


def test_learn_then_gradient_ascent_moves_the_answer_both_ways():
    model = tiny_model("llama")
    base = _forget_logprob(model).mean()
    taught = unlearn(
        model, FORGET, objective=Learn(), target=Layers((1, 2)), config=UnlearnConfig(steps=10, lr=3e-3)
    ).model
    assert _forget_logprob(taught).mean() > base
    erased = unlearn(
        taught, FORGET, objective=GradientAscent(), target=Layers((1, 2)), config=UnlearnConfig(steps=10, lr=3e-3)
    ).model
    assert _forget_logprob(erased).mean() < _forget_logprob(taught).mean()


@pytest.mark.parametrize("family", MOE)
def test_uoe_one_expert_every_moe_family(family):
    """Only the chosen expert's slices (and its router row) change; the anchor keeps its routing share; the
    forget loss rises."""
    from steerlab.measure import expert_attribution

    model = tiny_model(family)
    prompts = [p for p, _ in FORGET]
    scores = expert_attribution(model, prompts)
    layer, expert = scores.top(1)[0]
    target = Expert(layer, expert)
    masks = target.masks(model)
    result = unlearn(model, FORGET, objective=GradientAscent(), target=target,
                     config=UnlearnConfig(steps=8, lr=1e-3, anchor_weight=1.0))  # fmt: skip
    _assert_only_mask_changed(model, result, masks)
    share = result.routing_share
    assert share["before"] > 0
    assert abs(share["after"] - share["before"]) <= 0.1 * share["before"] + 1e-9
    assert _forget_logprob(result.model).mean() < _forget_logprob(model).mean()


def test_manifest_records_the_unlearning(tmp_path):
    from steerlab.training import export, read_manifest

    model = tiny_model("llama")
    result = unlearn(
        model, FORGET, RETAIN, objective=NPO(beta=0.2), target=Columns(((1, 3),)), config=UnlearnConfig(steps=2)
    )
    result.add_metrics({"forget_p_drop": 0.5})
    manifest = read_manifest(export(result.model, tmp_path / "out"))
    edit = manifest["edits"][-1]
    assert edit["intervention"]["objective"] == {"type": "NPO", "beta": 0.2, "retain_weight": 1.0}
    assert edit["intervention"]["target"]["columns"] == [[1, 3]]
    assert edit["metrics"] == {"forget_p_drop": 0.5}


def test_lora_target_moves_each_weight_by_a_low_rank_matrix():
    model = tiny_model("qwen2")
    target = LoRA(r=2, layers=(1,), modules=("down_proj", "o_proj"))
    result = unlearn(model, FORGET, RETAIN, objective=NPO(), target=target, config=UnlearnConfig(steps=4, lr=1e-2))
    before = dict(model.hf.named_parameters())
    moved = {}
    for name, p in result.model.hf.named_parameters():
        delta = (p.detach() - before[name].detach()).double()
        if delta.any():
            moved[name] = int(torch.linalg.matrix_rank(delta, rtol=1e-3))  # float32 rounding of W + BA is noise
    assert moved == {"model.layers.1.mlp.down_proj.weight": 2, "model.layers.1.self_attn.o_proj.weight": 2}
    assert not any("lora" in n for n, _ in result.model.hf.named_parameters())  # merged back: a plain model
    assert result.trained_parameters == (2 * 96 + 64 * 2) + (2 * 64 + 64 * 2)  # lora_A [r, in] + lora_B [out, r]


def test_a_target_that_gets_no_gradient_raises():
    """A dead neuron (its up-projection row zeroed) never writes its column: training that column cannot act."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.hf.model.layers[1].mlp.up_proj.weight[5].zero_()
    with pytest.raises(SteerlabError, match="no gradient"):
        unlearn(model, FORGET, objective=GradientAscent(), target=Columns(((1, 5),)), config=UnlearnConfig(steps=2))
