"""Baking interventions into weights: hooked original vs baked model on tiny models of every family (oracle tests),
plus the refusals (NotBakeableError) where no exact weight edit exists."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch

import steerlab
from steerlab.errors import NotBakeableError, SteerlabError
from steerlab.interventions.experts import ExpertMask
from steerlab.interventions.heads import HeadAblation
from steerlab.interventions.redirect import LinearRedirect, MultiKeyRedirect, RankOneRedirect
from steerlab.steering import Direction
from steerlab.steering.ops import Ablate, AddVector, Clamp
from steerlab.testing import FAMILIES, tiny_model, tiny_tokenizer
from steerlab.training import bake, parity
from steerlab.training.bake import embedding_scale, weight_change
from steerlab.training.manifest import history
from steerlab.training.parity import ParityReport
from steerlab.training.restructure import is_tied, rebuild

PROMPTS = ["Write a short poem about the sea.", "Hi there", "Tell me a joke about cats."]
TOL = 1e-4  # float32, max |logit difference|, hooked original vs baked

# (family, intervention name) pairs with no exact weight form; every other pair below must bake within TOL.
NOT_BAKEABLE = {
    # post-norms (Gemma): the residual receives normalised outputs, so writer edits cannot reproduce a map on them
    *{(f, n) for f in ("gemma2", "gemma3_text") for n in ("ablate", "ablate_half", "redirect", "add_later")},
    # a constant after layer l-1's MLP needs a loadable MLP-output bias (only llama's mlp_bias, qwen2/mistral as
    # llama, and gpt-oss's expert biases with routing weights summing to 1 have one)
    *{
        (f, "add_later")
        for f in ("qwen3", "phi3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "granitemoe")
    },
    # a mean folded into o_proj needs a loadable o_proj bias
    *{(f, "heads_mean") for f in ("phi3", "mixtral", "qwen2_moe")},
    # a router with no bias cannot keep an expert out of every top-k
    *{(f, "experts_off") for f in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe")},
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _state_hash(hf) -> str:
    digest = hashlib.sha256()
    for name, t in sorted(hf.state_dict().items()):
        digest.update(name.encode())
        digest.update(t.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _logits(model, prompts=PROMPTS):
    batch = model.encode(prompts)
    with torch.inference_mode():
        out = model.hf(**batch.model_inputs()).logits
    return out[batch.attention_mask.bool()]


def _interventions(model) -> dict[str, object]:
    g = _gen(7)
    d = model.d_model
    direction = Direction(torch.randn(1, d, generator=g), (1,))
    means = torch.randn(model.n_layers, model.n_heads, model.head_dim, generator=g)
    o_in = model.spec.layer_module(model.hf, 1, model.spec.o_proj).in_features
    ivs: dict[str, object] = {
        "ablate": Ablate(direction),
        "ablate_half": Ablate(direction, strength=0.4),
        "add_embed": AddVector(direction, coeff=3.0, layers=[0]),
        "add_later": AddVector(direction, coeff=3.0, layers=[2]),
        "heads_zero": HeadAblation([(1, 0), (2, -1)]),
        "heads_mean": HeadAblation([(1, 0), (2, 3)], mode="mean", means=means),
        "redirect": RankOneRedirect(direction, torch.randn(d, generator=g), everywhere=True),
        "linear": LinearRedirect(1, torch.randn(o_in, generator=g), torch.randn(o_in, generator=g), module="o_proj"),
        "multikey": MultiKeyRedirect(
            2,
            torch.randn(2, o_in, generator=g),
            target_keys=torch.randn(2, o_in, generator=g),
            preserve=torch.randn(3, o_in, generator=g),
            lam=0.5,
            module="o_proj",
        ),
    }
    if model.spec.moe is not None:
        ivs["experts_off"] = ExpertMask([(2, 1), (1, 3)])
        if model.spec.moe.shared_experts is not None:
            ivs["shared_off"] = ExpertMask(shared_off=[2])
    return ivs


@pytest.mark.parametrize("family", FAMILIES)
def test_baked_weights_match_the_hooks_on_every_family(family):
    model = tiny_model(family)
    before = _state_hash(model.hf)
    plain = _logits(model)
    for name, iv in _interventions(model).items():
        if (family, name) in NOT_BAKEABLE:
            with pytest.raises(NotBakeableError, match="runtime"):
                bake(model, iv)
            continue
        baked = bake(model, iv)
        report = parity(model, baked, iv, PROMPTS, max_new_tokens=0)
        assert isinstance(report, ParityReport) and report.n_prompts == len(PROMPTS)
        assert report.max_abs_logit_diff <= TOL, f"{family}/{name}: {report}"
        changed = float((_logits(baked) - plain).abs().max())
        assert changed > 1e-3, f"{family}/{name} changed nothing ({changed:.2g}): the test would be vacuous"
        assert baked.hf is not model.hf
    assert _state_hash(model.hf) == before, "bake(inplace=False) must leave the source model untouched"


def test_bias_routes_name_only_registered_families():
    known = set(steerlab.arch.known_model_types())
    routes = [(spec.model_type, route) for spec in steerlab.arch.registered_specs() for route in spec.bias_routes]
    assert routes, "no family declares a bias route: the test would be vacuous"
    for family, route in routes:
        assert family in known and route.role in ("o_proj", "down_proj")
        assert route.model_type is None or route.model_type in known


@pytest.mark.parametrize(
    ("family", "name"), [("llama", "ablate"), ("gpt_oss", "add_later"), ("deepseek_v3", "experts_off")]
)
def test_greedy_generation_agrees(family, name):
    model = tiny_model(family)
    iv = _interventions(model)[name]
    report = parity(model, bake(model, iv), iv, PROMPTS[:2], max_new_tokens=6)
    assert report.generation_match == 1.0 and report.ok(TOL), report


def test_family_swap_for_a_missing_bias_keeps_the_model_exact():
    """Qwen2 has no o_proj / down_proj bias option: it is rebuilt as Llama with attention_bias and mlp_bias."""
    model = tiny_model("qwen2")
    rebuilt = rebuild(model.hf, flags={"attention_bias": True, "mlp_bias": True}, model_type="llama")
    assert type(rebuilt).__name__ == "LlamaForCausalLM"
    new = rebuilt.state_dict()
    assert set(model.hf.state_dict()) < set(new)
    assert all(float(new[k].abs().max()) == 0.0 for k in set(new) - set(model.hf.state_dict()))
    other = steerlab.load(rebuilt, model.tokenizer)
    torch.testing.assert_close(_logits(other), _logits(model), atol=1e-6, rtol=0)

    iv = _interventions(model)["add_later"]
    baked = bake(model, iv)
    assert baked.spec.model_type == "llama" and baked.config.mlp_bias and baked.config.attention_bias
    entry = history(baked.hf)[-1]
    assert entry["model_type"] == {"before": "qwen2", "after": "llama"} and entry["config_flags"]["mlp_bias"]


def test_embedding_scale_is_measured():
    assert embedding_scale(tiny_model("llama")) == pytest.approx(1.0, rel=1e-6)
    assert embedding_scale(tiny_model("gemma2")) == pytest.approx(8.0, rel=1e-6)  # sqrt(hidden_size=64)
    assert embedding_scale(tiny_model("granitemoe")) == pytest.approx(2.0, rel=1e-6)  # embedding_multiplier


def _tied_llama():
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tiny_tokenizer()
    config = AutoConfig.for_model(
        "llama", hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(1)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return steerlab.load(hf.eval(), tok)


@pytest.mark.parametrize("name", ["ablate", "add_embed", "redirect"])
def test_tied_embeddings_are_untied_before_the_embedding_is_edited(name):
    model = _tied_llama()
    assert is_tied(model.hf)
    unembed = model.hf.get_output_embeddings().weight.detach().clone()
    iv = _interventions(model)[name]
    baked = bake(model, iv)
    assert is_tied(model.hf) and not is_tied(baked.hf) and not baked.config.tie_word_embeddings
    torch.testing.assert_close(baked.hf.get_output_embeddings().weight, unembed, atol=0, rtol=0)
    assert parity(model, baked, iv, PROMPTS, max_new_tokens=0).max_abs_logit_diff <= TOL
    assert history(baked.hf)[-1]["untied_embeddings"] is True


def test_inplace_edits_the_model_itself():
    fresh = tiny_model("llama")
    model = steerlab.load(copy.deepcopy(fresh.hf), fresh.tokenizer)
    iv = _interventions(model)["heads_zero"]
    with model.apply(iv):
        expected = _logits(model)
    hf = model.hf
    assert bake(model, iv, inplace=True) is model and model.hf is hf
    torch.testing.assert_close(_logits(model), expected, atol=TOL, rtol=0)

    qwen = tiny_model("qwen2")
    model = steerlab.load(copy.deepcopy(qwen.hf), qwen.tokenizer)
    iv = _interventions(model)["add_later"]
    with model.apply(iv):
        expected = _logits(model)
    assert bake(model, iv, inplace=True) is model
    assert model.spec.model_type == "llama" and type(model.hf).__name__ == "LlamaForCausalLM"
    assert history(model.hf)[-1]["model_type"] == {"before": "qwen2", "after": "llama"}
    torch.testing.assert_close(_logits(model), expected, atol=TOL, rtol=0)


def test_bakes_stack_and_parity_is_recorded_on_the_right_entry():
    model = tiny_model("llama")
    ivs = _interventions(model)
    first = bake(model, ivs["heads_zero"])
    second = bake(first, ivs["ablate"])
    rep = parity(first, second, ivs["ablate"], PROMPTS, max_new_tokens=0)
    assert rep.ok(TOL)
    entries = history(second.hf)
    assert [e["intervention"]["type"] for e in entries] == ["HeadAblation", "Ablate"]
    assert "parity" not in entries[0] and entries[1]["parity"][0]["max_abs_logit_diff"] == rep.max_abs_logit_diff
    assert entries[1]["intervention"]["direction"]["sha256"] and history(model.hf) == []


def test_refusals_name_the_reason_and_the_runtime_fix():
    model = tiny_model("llama")
    d = Direction(torch.randn(2, model.d_model, generator=_gen(3)), (1, 2))
    cases = {
        "tokens": (AddVector(d, layers=[1], tokens="prompt"), "tokens='all'"),
        "per_layer": (Ablate(d, per_layer=True), "per_layer"),
        "rescale": (HeadAblation([(1, 0)], rescale_norm=True), "not linear"),
        "clamp": (Clamp(d, value=1.0, layers=[1]), "Clamp"),
        "layers": (RankOneRedirect(d, d.vectors[1] + 1.0, source_layer=1, layers=[1]), "everywhere=True"),
        "unknown": (object(), "no weight form"),
    }
    for name, (iv, needle) in cases.items():
        with pytest.raises(NotBakeableError, match=needle) as info:
            weight_change(model, iv)
        assert isinstance(info.value, SteerlabError) and "model.apply" in str(info.value), name
    with pytest.raises(NotBakeableError, match="force"):
        bake(tiny_model("gpt_oss"), ExpertMask([(1, 0)], mode="force"))
    with pytest.raises(NotBakeableError, match="post-norm"):
        bake(tiny_model("gemma2"), Ablate(d, source_layer=1))


def test_refusals_that_depend_on_the_config():
    # DeepSeek keeps only some expert groups: a bias on a switched-off expert would change which groups win
    ds = tiny_model("deepseek_v3")
    model = steerlab.load(copy.deepcopy(ds.hf), ds.tokenizer)
    for layer in range(1, model.n_layers):
        model.spec.moe_block(model.hf, layer).gate.topk_group = 1
    with pytest.raises(NotBakeableError, match="groups"):
        bake(model, ExpertMask([(2, 1)]))
    # Mistral attends within a window shorter than its context: Llama cannot carry its new bias
    mi = tiny_model("mistral")
    model = steerlab.load(copy.deepcopy(mi.hf), mi.tokenizer)
    model.config.sliding_window = 16
    with pytest.raises(NotBakeableError, match="sliding window"):
        bake(model, _interventions(model)["heads_mean"])
    assert len(bake(model, _interventions(model)["heads_zero"]).hf.state_dict()) == len(model.hf.state_dict())
    # Qwen2 with sliding-window layers: Llama cannot carry it either
    qw = tiny_model("qwen2")
    model = steerlab.load(copy.deepcopy(qw.hf), qw.tokenizer)
    model.config.layer_types = ["sliding_attention"] * model.n_layers
    with pytest.raises(NotBakeableError, match="sliding-window"):
        bake(model, _interventions(model)["add_later"])
