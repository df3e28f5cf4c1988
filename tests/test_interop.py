"""TransformerLens and nnsight interop: the same interventions give the same numbers through their
hook points / intervention API as through steerlab's own hooks, and activations agree.

Tolerances (float32, CPU): tiny models (eager attention everywhere) agree to 1e-5; SmolLM2 through
TL (which switches its copy to eager attention) vs steerlab (sdpa) to 2e-4 on logits.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

import steerlab
from steerlab import compat
from steerlab.errors import InterventionNotFiredError, ProvenanceWarning
from steerlab.hooks import open_sessions
from steerlab.interop import InteropError
from steerlab.interventions.columns import ColumnEdit
from steerlab.interventions.experts import ExpertMask
from steerlab.interventions.heads import HeadAblation
from steerlab.interventions.redirect import LinearRedirect
from steerlab.steering import Ablate, AddVector, Clamp, Direction
from steerlab.testing import tiny_direction, tiny_model

tl = pytest.importorskip("transformer_lens")
nnsight = pytest.importorskip("nnsight")

from steerlab.interop import (
    InteropUnavailableError,
    apply_tl,
    direction_from_tl,
    nnsight_intervene,
    to_bridge,
    to_language_model,
)
from steerlab.interop.nnsight_bridge import nnsight_generate
from steerlab.interop.tl_directions import direction_to_tl_hooks
from steerlab.interop.transformer_lens_bridge import tl_hook_name, tl_hooks, tl_site

FAMILIES = ["llama", "qwen2"]  # both GQA in the tiny configs (4 query heads, 2 kv heads)
PROMPTS = ["Write a short poem about the sea.", "Hi!", "Explain how vaccines work in two sentences."]
ATOL = 1e-5
_CACHE: dict = {}


def _setup(family: str):
    """(steerlab model, bridge over a copy, nnsight model over another copy), built once per family."""
    if family not in _CACHE:
        model = tiny_model(family)
        _CACHE[family] = (model, to_bridge(model, copy=True), to_language_model(model, copy=True))
    return _CACHE[family]


def _direction(model, layers=(1,), seed=0) -> Direction:
    g = torch.Generator().manual_seed(seed)
    return Direction(vectors=torch.randn(len(layers), model.d_model, generator=g), layers=tuple(layers))


def _interventions(model) -> dict:
    d = _direction(model)
    return {
        "add": AddVector(d, coeff=3.0),
        "add_two_layers": AddVector(_direction(model, layers=(0, 2), seed=1), coeff=2.0),
        "ablate": Ablate(d),
        "clamp": Clamp(d, value=1.5, layers=[0, 2]),
        "heads": HeadAblation([(0, 1), (2, 3)]),
        "heads_rescaled": HeadAblation([(1, 0), (1, 2)], rescale_norm=True),
    }


IV_NAMES = list(_interventions(tiny_model("llama")))


def _inputs(model):
    return model.encode(PROMPTS).model_inputs()


@torch.inference_mode()
def _steerlab_logits(model, iv=None):
    inputs = _inputs(model)
    if iv is None:
        return model.hf(**inputs).logits
    with model.apply(iv):
        return model.hf(**inputs).logits


# ----- TransformerLens -----
def test_tl_names_round_trip():
    for site in ("resid_pre", "resid_post", "attn_out", "mlp_out", "head"):
        assert tl_site(tl_hook_name(site, 4)) == (site, 4)
    assert tl_hook_name("head", 2) == "blocks.2.attn.hook_z"
    assert tl_site("blocks.3.hook_in") == ("resid_pre", 3)
    _, bridge, _ = _setup("llama")
    assert tl_hook_name("resid_pre", 1, bridge=bridge) == "blocks.1.hook_resid_pre"
    with pytest.raises(InteropError, match="router_logits"):
        tl_hook_name("router_logits", 0)
    with pytest.raises(InteropError, match="not a residual-stream"):
        tl_site("hook_embed")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", IV_NAMES)
def test_tl_hook_points_give_steerlab_logits(family, name):
    model, bridge, _ = _setup(family)
    iv = _interventions(model)[name]
    inputs = _inputs(model)
    ref, plain = _steerlab_logits(model, iv), _steerlab_logits(model)
    with torch.inference_mode():
        assert torch.allclose(bridge(inputs["input_ids"], attention_mask=inputs["attention_mask"]), plain, atol=ATOL)
        with apply_tl(bridge, iv) as hooks:
            got = bridge(inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert (ref - plain).abs().max() > 1e-2  # the intervention does something
    assert (got - ref).abs().max() <= ATOL
    assert all(fn.count >= 1 for _, fn in hooks)


def test_tl_hooks_work_with_run_with_hooks_and_from_a_model():
    model, bridge, _ = _setup("qwen2")
    iv = _interventions(model)["ablate"]
    inputs = _inputs(model)
    ref = _steerlab_logits(model, iv)
    names_from_model = [n for n, _ in tl_hooks(model, iv)]
    hooks = tl_hooks(bridge, iv)
    assert [n for n, _ in hooks] == names_from_model  # canonical names resolve to the same points here
    assert len(hooks) == 3 * model.n_layers
    with torch.inference_mode():
        got = bridge.run_with_hooks(inputs["input_ids"], fwd_hooks=hooks, attention_mask=inputs["attention_mask"])
    assert (got - ref).abs().max() <= ATOL
    assert not bridge.hook_dict["blocks.0.hook_resid_pre"]._forward_hooks  # removed afterwards


@pytest.mark.parametrize("op", ["add", "ablate", "clamp"])
def test_direction_to_tl_hooks_matches_the_steer_ops(op):
    model, bridge, _ = _setup("llama")
    d = _direction(model, layers=(1, 2))
    if op == "add":
        hooks, iv = direction_to_tl_hooks(d, op="add", coeff=2.5), AddVector(d, coeff=2.5)
    elif op == "ablate":
        hooks, iv = direction_to_tl_hooks(d, op="ablate", source_layer=2, n_layers=3), Ablate(d, source_layer=2)
    else:
        hooks, iv = direction_to_tl_hooks(d, op="clamp", value=-1.0, layers=[1]), Clamp(d, value=-1.0, layers=[1])
    inputs = _inputs(model)
    with torch.inference_mode(), bridge.hooks(fwd_hooks=hooks):
        got = bridge(inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert (got - _steerlab_logits(model, iv)).abs().max() <= ATOL
    assert direction_from_tl(hooks) is d  # and back
    with pytest.raises(Exception, match="n_layers"):
        direction_to_tl_hooks(d, op="ablate")


def test_tl_generate_matches_steerlab_generate():
    model, bridge, _ = _setup("llama")
    iv = AddVector(_direction(model), coeff=3.0)
    inputs = _inputs(model)
    n = 6
    with torch.inference_mode(), model.apply(iv):
        ref = model.hf.generate(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=n,
            min_new_tokens=n, do_sample=False, pad_token_id=model.tokenizer.pad_token_id,
        )  # fmt: skip
    kwargs = dict(max_new_tokens=n, do_sample=False, stop_at_eos=False, return_type="tokens", verbose=False)
    cached_ok = not compat.tl_cached_generate_is_broken()
    with torch.inference_mode(), apply_tl(bridge, iv):
        got = bridge.generate(
            inputs["input_ids"], attention_mask=inputs["attention_mask"], use_past_kv_cache=cached_ok, **kwargs
        )
        if not cached_ok:  # never silently wrong: the cached path raises inside apply_tl
            with pytest.raises(InteropError, match="use_past_kv_cache=False"):
                bridge.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], **kwargs)
    assert torch.equal(got[:, -n:], ref[:, -n:])
    assert "generate" not in vars(bridge)  # the guard is gone with the scope


def test_tl_cache_and_steerlab_collect_agree():
    model, bridge, _ = _setup("qwen2")
    inputs = _inputs(model)
    names = [tl_hook_name(s, la) for s in ("resid_pre", "resid_post", "attn_out", "mlp_out") for la in range(3)]
    with torch.inference_mode():
        _, cache = bridge.run_with_cache(
            inputs["input_ids"], attention_mask=inputs["attention_mask"], names_filter=names
        )
    acts = steerlab.collect(
        model, PROMPTS, sites=["resid_pre", "resid_post", "attn_out", "mlp_out"], positions=["last"], progress=False
    )
    for name in names:
        site, layer = tl_site(name)
        ours = acts.get(site, "last")[:, layer, 0]
        assert (cache[name][:, -1] - ours).abs().max() <= ATOL, name
    # a direction from the cache is the mean of the last-token activations; two caches give the mean difference
    d = direction_from_tl(cache, site="resid_post")
    assert d.layers == (0, 1, 2) and d.site == "resid_post"
    assert torch.allclose(d.vectors, acts.get("resid_post", "last")[:, :, 0].mean(0), atol=ATOL)
    diff = direction_from_tl(cache, {name: cache[name][:1] for name in names}, site="resid_pre", layers=[1])
    expected = acts.get("resid_pre", "last")[:, 1, 0].mean(0) - acts.get("resid_pre", "last")[0, 1, 0]
    assert diff.method == "mean_diff" and torch.allclose(diff.at(1), expected, atol=ATOL)
    per_layer = direction_from_tl({0: torch.ones(model.d_model), 2: torch.zeros(model.d_model)})
    assert per_layer.layers == (0, 2)


def test_apply_tl_removes_hooks_on_errors_and_checks_firing():
    model, bridge, _ = _setup("llama")
    iv = _interventions(model)["add"]
    inputs = _inputs(model)
    with pytest.raises(RuntimeError, match="boom"), apply_tl(bridge, iv):
        raise RuntimeError("boom")
    with torch.inference_mode():
        after = bridge(inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert torch.allclose(after, _steerlab_logits(model), atol=ATOL)
    with pytest.raises(InterventionNotFiredError, match="never fired"), apply_tl(bridge, iv):
        pass


def test_steerlab_hooks_run_on_a_bridged_model():
    model, bridge, _ = _setup("qwen2")
    bridged = steerlab.load(bridge)
    assert bridged.hf is bridge.original_model
    iv = _interventions(model)["heads_rescaled"]
    assert (_steerlab_logits(bridged, iv) - _steerlab_logits(model, iv)).abs().max() <= ATOL


# ----- nnsight -----
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", IV_NAMES)
def test_nnsight_trace_gives_steerlab_logits(family, name):
    model, _, lm = _setup(family)
    iv = _interventions(model)[name]
    inputs = _inputs(model)
    with torch.inference_mode(), lm.trace({k: inputs[k] for k in ("input_ids", "attention_mask")}):
        firings = nnsight_intervene(lm, iv)
        logits = lm.output.logits.save()
    assert (logits - _steerlab_logits(model, iv)).abs().max() <= ATOL
    assert firings and all(f.count == 1 for f in firings)


def test_nnsight_generate_matches_steerlab_generate():
    model, _, lm = _setup("qwen2")
    iv = _interventions(model)["ablate"]
    batch = {k: v for k, v in _inputs(model).items() if k != "position_ids"}
    n = 6
    with torch.inference_mode(), model.apply(iv):
        ref = model.hf.generate(**batch, max_new_tokens=n, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    with torch.inference_mode():
        got = nnsight_generate(lm, batch, iv, max_new_tokens=n, pad_token_id=model.tokenizer.pad_token_id)
    assert torch.equal(got[:, -n:], ref[:, -n:])


def test_nnsight_language_model_and_steerlab_load():
    model, _, _ = _setup("llama")
    import copy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = nnsight.LanguageModel(copy.deepcopy(model.hf), tokenizer=copy.deepcopy(model.tokenizer))
    iv = _interventions(model)["add_two_layers"]
    inputs = _inputs(model)
    feed = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    ref = _steerlab_logits(model, iv)
    with torch.inference_mode(), lm.trace(feed):
        nnsight_intervene(lm, iv)
        logits = lm.output.logits.save()
    assert (logits - ref).abs().max() <= ATOL
    unwrapped = steerlab.load(lm)  # steerlab's own hooks fire inside an nnsight trace too
    assert unwrapped.hf is lm._module
    with torch.inference_mode(), unwrapped.apply(iv), lm.trace(feed):
        logits2 = lm.output.logits.save()
    assert (logits2 - ref).abs().max() <= ATOL


def test_nnsight_activations_and_steerlab_collect_agree():
    model, _, lm = _setup("llama")
    inputs = _inputs(model)
    pre, post = [], []  # filled inside the trace with saved tensors
    with torch.inference_mode(), lm.trace({k: inputs[k] for k in ("input_ids", "attention_mask")}):
        for la in range(model.n_layers):  # nnsight reads in run order: a layer's input, then its output
            pre.append(lm.model.layers[la].input[:, -1].save())
            post.append(lm.model.layers[la].output[:, -1].save())
    acts = steerlab.collect(model, PROMPTS, sites=["resid_pre", "resid_post"], positions=["last"], progress=False)
    for la in range(model.n_layers):
        assert (acts.get("resid_pre", "last")[:, la, 0] - pre[la]).abs().max() <= ATOL
        assert (acts.get("resid_post", "last")[:, la, 0] - post[la]).abs().max() <= ATOL


# ----- errors -----
def test_unconvertible_interventions_raise_clear_errors():
    model, bridge, lm = _setup("llama")

    class ModuleEdit:  # installs its own module hooks: no (site, layer, fn) form
        def install(self, session):
            pass

    with pytest.raises(InteropError, match="steerlab.load"):
        tl_hooks(bridge, ModuleEdit())
    with pytest.raises(InteropError, match="tokens='all'"):
        tl_hooks(bridge, AddVector(_direction(model), tokens="generated"))
    with pytest.raises(InteropError, match="tokens='all'"):
        nnsight_intervene(lm, AddVector(_direction(model), tokens="prompt"))


def test_missing_packages_name_the_extra(monkeypatch):
    model = tiny_model("llama")
    for name in [m for m in sys.modules if m.split(".")[0] in ("transformer_lens", "nnsight")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import` now fails as if not installed
    monkeypatch.setitem(sys.modules, "transformer_lens", None)
    monkeypatch.setitem(sys.modules, "nnsight", None)
    with pytest.raises(InteropUnavailableError, match=r"pip install steerlab\[interop\]"):
        to_bridge(model, copy=True)
    with pytest.raises(InteropUnavailableError, match=r"pip install steerlab\[interop\]"):
        to_language_model(model, copy=True)


# ----- real weights -----
def test_smollm_through_tl_and_nnsight(smollm):
    iv = AddVector(_direction(smollm, layers=(10,)), coeff=2.0)
    inputs = _inputs(smollm)
    feed = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    ref = _steerlab_logits(smollm, iv)
    bridge = to_bridge(smollm, copy=True)
    with torch.inference_mode(), apply_tl(bridge, iv):
        got_tl = bridge(feed["input_ids"], attention_mask=feed["attention_mask"])
    del bridge
    lm = to_language_model(smollm, copy=True)
    with torch.inference_mode(), lm.trace(feed):
        nnsight_intervene(lm, iv)
        got_nn = lm.output.logits.save()
    real = feed["attention_mask"].bool()  # padding rows differ between eager and sdpa and mean nothing
    assert (got_tl - ref)[real].abs().max() <= 2e-4  # TL's copy runs eager attention, steerlab's sdpa
    assert (got_nn - ref)[real].abs().max() <= ATOL


# ----- every intervention crosses: steps without a hook point run as torch hooks on the same modules -----
def _module_interventions(model) -> dict:
    """Interventions whose plans hold module or MoE steps (no TransformerLens / nnsight hook point)."""
    g = torch.Generator().manual_seed(5)
    width = model.spec.layer_module(model.hf, 1, model.spec.o_proj).weight.shape[1]
    return {
        "experts_off": ExpertMask([(1, 0), (2, 3)], mode="off"),
        "o_proj_redirect": LinearRedirect(1, torch.randn(width, generator=g), torch.randn(width, generator=g),
                                          module="o_proj"),  # fmt: skip
        "routed_columns": ColumnEdit([(1, 0, 3), (2, 1, 5)], scale=0.0),
    }


@pytest.mark.parametrize("name", ["experts_off", "o_proj_redirect", "routed_columns"])
def test_module_and_moe_steps_cross_both_bridges(name):
    model, bridge, lm = _setup("qwen2_moe")
    iv = _module_interventions(model)[name]
    inputs = _inputs(model)
    ref, plain = _steerlab_logits(model, iv), _steerlab_logits(model)
    assert (ref - plain).abs().max() > 1e-3  # the intervention does something
    with torch.inference_mode(), apply_tl(bridge, iv):
        got = bridge(inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert (got - ref).abs().max() <= ATOL
    with pytest.raises(InteropError, match="apply_tl"):  # no scope to hold torch hooks
        tl_hooks(bridge, iv)
    with pytest.raises(InteropError, match=r"steerlab\.load\(lm\)\.apply"):
        nnsight_intervene(lm, iv)
    batch = model.encode(PROMPTS[:2])
    ids = nnsight_generate(lm, {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}, iv,
                           max_new_tokens=4)  # fmt: skip
    with model.apply(iv):
        expected = model.hf.generate(**batch.model_inputs(), max_new_tokens=4, do_sample=False,
                                     pad_token_id=model.tokenizer.pad_token_id)  # fmt: skip
    assert torch.equal(ids[:, -4:], expected[:, -4:])
    assert not open_sessions(model) and not open_sessions(steerlab.load(lm))  # every torch hook removed


def test_direction_to_tl_hooks_without_a_model_takes_the_recorded_depth():
    model = tiny_model("llama")  # 3 layers; the hooks name layer 1 only
    d = tiny_direction(model, layer=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no false "fitted on a model of another depth" warning
        hooks = direction_to_tl_hooks(d, op="add", coeff=1.0, layers=[1])
    assert [name for name, _ in hooks] == ["blocks.1.hook_resid_pre"]
    other = Direction(vectors=d.vectors, layers=d.layers, model=d.model, info={"n_layers": 5})
    with pytest.warns(ProvenanceWarning):  # a real depth mismatch still warns
        direction_to_tl_hooks(other, op="add", layers=[1], n_layers=3)
