"""The architecture registry: every family's spec resolves on a real (tiny) model of that family,
and the registry's routing functions reproduce each family's own router."""

import pytest
import torch

from steerlab.arch import ArchSpec, get_spec, known_model_types, normalize_layer, register, resolve_path, route
from steerlab.errors import LayerIndexError, UnknownArchitectureError
from steerlab.testing import FAMILIES, MOE_FAMILIES, tiny_model


def test_registry_covers_every_required_family():
    assert set(FAMILIES) <= set(known_model_types())
    assert len(FAMILIES) == 14


def test_spec_paths_resolve_on_every_family(family_model):
    spec, hf = family_model.spec, family_model.hf
    for top in (spec.embed, spec.final_norm, spec.unembed):
        assert isinstance(resolve_path(hf, top), torch.nn.Module)
    for layer in range(family_model.n_layers):
        for path in (spec.attn, spec.o_proj, spec.attn_out, spec.mlp_out, *spec.norms):
            assert isinstance(spec.layer_module(hf, layer, path), torch.nn.Module), path
        block = spec.moe_block(hf, layer)
        if block is None and spec.down_proj is not None:
            assert isinstance(spec.layer_module(hf, layer, spec.down_proj), torch.nn.Linear)
        if block is not None:
            experts = resolve_path(block, spec.moe.experts)
            assert experts.down_proj.dim() == 3 and experts.gate_up_proj.dim() == 3
            if spec.moe.shared_experts:
                assert isinstance(resolve_path(block, spec.moe.shared_experts), torch.nn.Module)
    o_proj = spec.layer_module(hf, 0, spec.o_proj)
    assert family_model.n_heads * family_model.head_dim == o_proj.in_features


def test_mlp_down_names_the_tensors_that_write_the_residual_stream(family_model):
    """Dense down_proj [d, I]; fused experts with the residual width on the layout's axis and the neuron
    axis of one expert's slice on the other; a shared expert's down_proj where the model has one."""
    from steerlab.arch import mlp_down

    spec, hf, d = family_model.spec, family_model.hf, family_model.d_model
    for layer in range(family_model.n_layers):
        down = mlp_down(spec, hf, layer)
        assert (down.dense is None) == (spec.moe_block(hf, layer) is not None)
        if down.dense is not None:
            assert resolve_path(hf, down.dense).weight.shape[0] == d
            continue
        fused = getattr(resolve_path(hf, down.experts), down.layout.down)
        assert fused.shape[down.layout.down_residual_axis] == d
        assert fused[0].shape[down.layout.down_neuron_axis] == fused.shape[3 - down.layout.down_residual_axis]
        if down.layout.down_bias is not None:
            assert getattr(resolve_path(hf, down.experts), down.layout.down_bias).shape[-1] == d
        if spec.moe.shared_experts:
            assert down.shared is not None and resolve_path(hf, down.shared).weight.shape[0] == d
        else:
            assert down.shared is None


def test_moe_families_have_moe_layers(moe_model):
    moe_layers = [i for i in range(moe_model.n_layers) if moe_model.spec.moe_block(moe_model.hf, i) is not None]
    assert moe_layers, moe_model.spec.model_type
    dense = [i for i in range(moe_model.n_layers) if i not in moe_layers]
    if moe_model.spec.model_type == "deepseek_v3":
        assert dense == [0]  # first_k_dense_replace=1 in the tiny config


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_route_reproduces_the_family_router(family):
    model = tiny_model(family)
    spec, hf = model.spec, model.hf
    layer = next(i for i in range(model.n_layers) if spec.moe_block(hf, i) is not None)
    router = resolve_path(spec.moe_block(hf, layer), spec.moe.router)
    x = torch.randn(11, model.d_model)
    with torch.no_grad():
        logits, weights, idx = router(x)
        my_weights, my_idx = route(spec, router, logits, hf.config)
    # compare as per-token dicts expert -> weight (top-k order may differ when unsorted)
    ref = torch.zeros(11, logits.shape[-1]).scatter(1, idx, weights.float())
    mine = torch.zeros(11, logits.shape[-1]).scatter(1, my_idx, my_weights.float())
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)


def test_route_switches_an_expert_off():
    model = tiny_model("mixtral")
    router = resolve_path(model.spec.moe_block(model.hf, 0), "gate")
    logits = torch.randn(50, 4)
    logits[:, 1] = float("-inf")
    weights, idx = route(model.spec, router, logits, model.hf.config)
    assert not (idx == 1).any()
    torch.testing.assert_close(weights.sum(-1), torch.ones(50))


def test_unknown_architecture_lists_known_and_how_to_register():
    with pytest.raises(UnknownArchitectureError) as err:
        get_spec("falcon_mamba_x")
    msg = str(err.value)
    assert "falcon_mamba_x" in msg and "qwen2" in msg and "register(" in msg


def test_register_new_family_and_refuse_silent_overwrite():
    spec = ArchSpec(model_type="steerlab_test_family", o_proj="attn.out")
    register(spec, overwrite=True)
    assert get_spec("steerlab_test_family").o_proj == "attn.out"
    with pytest.raises(UnknownArchitectureError, match="already registered"):
        register(spec)


def test_loading_an_unregistered_model_type_fails_clearly():
    from transformers import GPT2Config, GPT2LMHeadModel

    import steerlab
    from steerlab.testing import tiny_tokenizer

    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tiny_tokenizer())))
    with pytest.raises(UnknownArchitectureError, match="'gpt2' is not in steerlab's registry"):
        steerlab.load(hf, tiny_tokenizer())


@pytest.mark.parametrize("layer,expected", [(0, 0), (2, 2), (-1, 2), (-3, 0)])
def test_normalize_layer(layer, expected):
    assert normalize_layer(layer, 3) == expected


@pytest.mark.parametrize("layer", [3, -4, 100])
def test_layer_out_of_range_names_the_valid_range(layer):
    with pytest.raises(LayerIndexError, match=r"0\.\.2"):
        normalize_layer(layer, 3)


def _tiny_unregistered(model_type: str, **extra):
    """A seeded tiny model of a transformers architecture steerlab does not register."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from steerlab.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    config = AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=0,
        eos_token_id=tok.eos_token_id, max_position_embeddings=128, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval(), tok


def _load_error(hf, tok) -> str:
    import steerlab

    assert hf.config.model_type not in known_model_types()
    with pytest.raises(UnknownArchitectureError) as err:
        steerlab.load(hf, tok)
    return str(err.value)


@pytest.mark.parametrize(
    "model_type,found",
    [
        ("starcoder2", "o_proj='self_attn.o_proj', mlp='mlp', down_proj='mlp.c_proj', attn_out='self_attn', mlp_out='mlp'"),
        ("olmo2", "down_proj='mlp.down_proj', attn_out='post_attention_layernorm', mlp_out='post_feedforward_layernorm'"),
    ],
)
def test_unknown_dense_architecture_hint_is_a_spec_that_works(model_type, found, monkeypatch):
    """The register hint names the modules found on this model, and registering it as shown gives a model whose
    sites are right: residual sites equal hidden_states, attention + MLP outputs recompose the residual stream."""
    import steerlab
    from steerlab.arch import registry

    hf, tok = _tiny_unregistered(model_type)
    msg = _load_error(hf, tok)
    assert f"architecture {model_type!r} is not in steerlab's registry" in msg and "qwen2" in msg
    assert f"(model.layers.0, {type(hf.model.layers[0]).__name__}) has: self_attn (" in msg
    assert found in msg and "It looks dense" in msg
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # registration ends with the test
    eval(msg.split("register before loading:\n")[1].strip(), {"steerlab": steerlab})
    model = steerlab.load(hf, tok)
    batch = model.encode(["Write a short poem about the sea.", "Hi"])
    seen = {}
    with model.hooks() as hooks:
        for site in ("resid_pre", "resid_post", "attn_out", "mlp_out"):
            hooks.add(site, 0, lambda x, ctx: seen.__setitem__(ctx.site, x.clone()))
        with torch.inference_mode():
            hidden = model.hf(**batch.model_inputs(), output_hidden_states=True).hidden_states
    torch.testing.assert_close(seen["resid_pre"], hidden[0])
    torch.testing.assert_close(seen["resid_post"], hidden[1])
    mask = batch.attention_mask.bool()
    recomposed = seen["resid_pre"] + seen["attn_out"] + seen["mlp_out"]
    torch.testing.assert_close(recomposed[mask], seen["resid_post"][mask], rtol=1e-5, atol=1e-5)


def test_unknown_moe_architecture_hint_says_moe_and_names_router_and_experts():
    hf, tok = _tiny_unregistered("phimoe", num_local_experts=4, num_experts_per_tok=2)
    msg = _load_error(hf, tok)
    assert "It looks like MoE: layer 0's mlp has experts (gate_up_proj (4, 192, 64), down_proj (4, 64, 96))" in msg
    assert "down_proj=None" in msg
    assert "moe=steerlab.arch.MoESpec(block='mlp', router='router', experts='experts')" in msg


# ----- declarative per-family facts: bias routes, GGUF, router bias, grouped routing -----
def _bias_route_cases() -> list[tuple[str, str]]:
    from steerlab.arch import BIAS_ROLES

    return [(f, role) for f in FAMILIES for role in BIAS_ROLES if get_spec(f).bias_route(role) is not None]


def test_bias_routes_name_only_registered_families_and_roles():
    from steerlab.arch import BIAS_ROLES, families_with_bias_route, registered_specs

    known = set(known_model_types())
    assert families_with_bias_route("down_proj") == ["llama", "mistral", "qwen2"]
    assert len(families_with_bias_route("o_proj")) == 10
    for spec in registered_specs():
        for r in spec.bias_routes:
            assert r.role in BIAS_ROLES and (r.model_type is None or r.model_type in known), spec.model_type
            assert r.flags and all(isinstance(k, str) for k, _ in r.flags)


@pytest.mark.parametrize(("family", "role"), _bias_route_cases())
def test_every_bias_route_rebuilds_a_model_with_that_bias_and_the_same_logits(family, role):
    """Each route's flags (under its model type) give every layer a zero ``role`` bias and change no logit."""
    import steerlab
    from steerlab.arch import mlp_down
    from steerlab.training.restructure import rebuild

    model = tiny_model(family)
    route_ = model.spec.bias_route(role)
    assert route_.check is None or route_.check(model.config) is None
    new = steerlab.load(rebuild(model.hf, flags=dict(route_.flags), model_type=route_.model_type), model.tokenizer)
    assert new.spec.model_type == (route_.model_type or family)
    for layer in range(new.n_layers):
        if role == "o_proj":
            module = new.spec.layer_module(new.hf, layer, new.spec.o_proj)
        else:
            module = resolve_path(new.hf, mlp_down(new.spec, new.hf, layer).dense)
        assert isinstance(module.bias, torch.Tensor) and float(module.bias.detach().abs().max()) == 0.0, (layer, role)
    batch = model.encode(["Write a short poem about the sea.", "Hi there"])
    with torch.inference_mode():
        before = model.hf(**batch.model_inputs()).logits
        after = new.hf(**batch.model_inputs()).logits
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(after[mask], before[mask], atol=1e-6, rtol=0)


def test_a_missing_bias_route_lists_the_registered_families_that_have_one(monkeypatch):
    from steerlab.arch import BiasRoute, registry
    from steerlab.errors import NotBakeableError
    from steerlab.training.restructure import bias_route

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    register(ArchSpec("steerlab_biased_family", bias_routes=(BiasRoute("down_proj", (("mlp_bias", True),)),)))
    with pytest.raises(NotBakeableError) as err:
        bias_route(tiny_model("phi3"), "down_proj", what="AddVector(...)")
    msg = str(err.value)
    assert "Families that can carry it: llama, mistral, qwen2, steerlab_biased_family." in msg
    assert "model.apply" in msg


def test_bias_routes_and_moe_specs_reject_inconsistent_values():
    from steerlab.arch import BiasRoute, ExpertGroups, MoESpec

    with pytest.raises(UnknownArchitectureError, match="role"):
        BiasRoute("q_proj", (("attention_bias", True),))
    with pytest.raises(UnknownArchitectureError, match="one bias route per role"):
        ArchSpec("x", bias_routes=(BiasRoute("o_proj", ()), BiasRoute("o_proj", (("attention_bias", True),))))
    with pytest.raises(UnknownArchitectureError, match="router_bias"):
        MoESpec(routing="sigmoid_grouped")
    with pytest.raises(UnknownArchitectureError, match="sigmoid_grouped"):
        MoESpec(groups=ExpertGroups(count="num_group", kept="topk_group"))


def test_gguf_families_name_llama_cpp_architectures():
    import gguf

    from steerlab.arch import gguf_families

    assert gguf_families() == ["llama", "qwen2"]
    for family in gguf_families():
        assert get_spec(family).gguf.arch in gguf.MODEL_ARCH_NAMES.values()


def _router(model):
    spec, hf = model.spec, model.hf
    layer = next(i for i in range(model.n_layers) if spec.moe_block(hf, i) is not None)
    return resolve_path(spec.moe_block(hf, layer), spec.moe.router)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_router_bias_is_the_routers_per_expert_bias_and_keeps_an_expert_out(family):
    """``router_bias`` names an [E] tensor whose very negative entry keeps that expert out of the family's own top-k;
    a family without one has no 1-d tensor on its router at all."""
    import copy

    model = tiny_model(family)
    router = copy.deepcopy(_router(model))
    x = torch.randn(40, model.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        n_experts = router(x)[0].shape[-1]
        name = model.spec.moe.router_bias
        if name is None:
            assert not [k for k, t in router.state_dict().items() if t.dim() == 1]
            return
        bias = getattr(router, name)
        assert isinstance(bias, torch.Tensor) and bias.shape == (n_experts,)
        assert (router(x)[2] == 1).any()  # chosen somewhere before: the test is not vacuous
        bias[1] = -1e9
        idx = router(x)[2]
    assert not (idx == 1).any()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_selection_scores_rank_experts_as_the_family_router_does(family):
    from steerlab.arch import selection_scores

    model = tiny_model(family)
    router = _router(model)
    x = torch.randn(30, model.d_model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _, idx = router(x)
        scores = selection_scores(model.spec, router, logits)
    assert model.spec.moe.limited_groups(router) is None  # the tiny DeepSeek keeps every group
    mine = torch.topk(scores, idx.shape[-1], dim=-1)[1]
    assert torch.equal(mine.sort(-1).values, idx.sort(-1).values)


def test_limited_groups_reports_group_limited_routing_only():
    import copy

    for family in MOE_FAMILIES:
        assert tiny_model(family).spec.moe.limited_groups(_router(tiny_model(family))) is None, family
    router = copy.deepcopy(_router(tiny_model("deepseek_v3")))
    router.topk_group = 1
    assert get_spec("deepseek_v3").moe.limited_groups(router) == (1, 2)
