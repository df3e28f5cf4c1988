"""Rank-one concept redirection (METHODS 10): exact algebra, hook vs baked weights, closed form vs lstsq / descent."""

import copy

import pytest
import torch

import steerlab
from steerlab.backends.hf import render, site_functions
from steerlab.errors import (
    InterventionNotFiredError,
    InvalidValueError,
    ShapeError,
    SteerlabError,
    UnknownPositionError,
)
from steerlab.interventions.redirect import (
    DegenerateEditError,
    LinearRedirect,
    MultiKeyRedirect,
    NotALinearModuleError,
    RankOneRedirect,
    closed_form_edit,
    rank_one_update,
    redirect_matrix,
    redirect_rank_one,
    resolve_linear,
)
from steerlab.measure import estimate_key_covariance, linear_redirect_from_prompts, module_keys
from steerlab.plan import RankOne, Step
from steerlab.steering import Direction
from steerlab.testing import tiny_model

PROMPTS = [
    "Write a short poem about the sea.",
    "Hi there",
    "Tell me a joke about cats.",
    "What is the capital of France?",
]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "How do I bake bread at home?", "Explain how vaccines work.",
    "Give me three tips for studying.", "You are a helpful assistant.", "Hi there! How are you today?",
    "Tell me a joke about cats.", "system user assistant model instruction response",
]  # fmt: skip
F64 = torch.float64


def _weight_update(model, edit):
    """(module path from the root, ΔW float32) of a linear redirect's weight form."""
    (w,) = edit.weights(model)
    return f"{model.spec.layers}.{w.layer}.{w.module}", w.delta.float()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _unit(v):
    return v / v.norm()


def _logits(model, prompts=PROMPTS):
    batch = model.encode(prompts)
    with torch.inference_mode():
        out = model.hf(**batch.model_inputs()).logits
    return out[batch.attention_mask.bool()]


def _baked_copy(model, edits):
    """A separate Model whose weights carry ``edits``: {module path: fn(weight) -> new weight}."""
    hf = copy.deepcopy(model.hf)
    with torch.no_grad():
        for path, fn in edits.items():
            mod = hf.get_submodule(path)
            mod.weight.copy_(fn(mod.weight.detach().double()).to(mod.weight.dtype))
    return steerlab.load(hf, model.tokenizer)


def _assert_close(actual, expected, tol, what=""):
    scale = max(1.0, float(expected.abs().max()))
    err = float((actual.double() - expected.double()).abs().max())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x {scale:.3g}"


# ----------------------------------------------------------------------------------------------
# residual-stream form
# ----------------------------------------------------------------------------------------------
def test_redirect_matrix_sends_a_to_b_and_fixes_the_orthogonal_complement():
    g = _gen(0)
    a_raw, b_raw = 3 * torch.randn(16, generator=g, dtype=F64), 0.5 * torch.randn(16, generator=g, dtype=F64)
    a, b = _unit(a_raw), _unit(b_raw)
    M = redirect_matrix(a_raw, b_raw, dtype=F64)  # normalises its inputs
    torch.testing.assert_close(M @ a, b, atol=1e-12, rtol=0)
    ortho = torch.randn(10, 16, generator=g, dtype=F64)
    ortho = ortho - (ortho @ a)[:, None] * a
    torch.testing.assert_close(ortho @ M.T, ortho, atol=1e-12, rtol=0)
    left, right = redirect_rank_one(a_raw, b_raw)
    torch.testing.assert_close(M, torch.eye(16, dtype=F64) + torch.outer(left, right))
    assert int(torch.linalg.matrix_rank(M - torch.eye(16, dtype=F64))) == 1
    # the hook is the same map, in the activation's dtype
    iv = RankOneRedirect(a_raw.float(), b_raw.float(), layers=[0])
    torch.testing.assert_close(iv.matrix(), M.float())
    h = torch.randn(2, 5, 16, generator=g, dtype=F64)
    _assert_close(site_functions(Step(0, "resid_pre", RankOne(left.float(), right.float())), None)[0][1](h.float(), None), h @ M.T, 1e-6, "hook fn")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "qwen2_moe"])
def test_redirected_concept_reads_exactly_as_the_target(family):
    """Stream h⊥ + 3a, redirected, is the stream h⊥ + 3b: the same hidden state and the same logits."""
    model = tiny_model(family)
    g = _gen(1)
    a, b = _unit(torch.randn(model.d_model, generator=g)), _unit(torch.randn(model.d_model, generator=g))
    layer = 1

    def inject(vec):
        return lambda x, ctx: x - (x @ a)[..., None] * a + 3.0 * vec

    def run(vec, edit):
        seen = {}
        batch = model.encode(PROMPTS)
        with model.hooks() as hooks:
            hooks.add("resid_pre", layer, inject(vec))
            hooks.add("resid_pre", layer, lambda x, ctx: seen.__setitem__("before", x.clone()))
            if edit:
                render(edit.resolve(model), hooks)
            hooks.add("resid_pre", layer, lambda x, ctx: seen.__setitem__("after", x.clone()))
            with torch.inference_mode():
                logits = model.hf(**batch.model_inputs()).logits
        mask = batch.attention_mask.bool()
        return seen["before"][mask], seen["after"][mask], logits[mask]

    edit = RankOneRedirect(Direction(a[None], (layer,)), Direction(b[None], (layer,)))  # layers from the direction
    before, after, logits = run(a, edit)
    _, target_state, target_logits = run(b, None)
    _assert_close(after, target_state, 1e-4, "A redirected vs B")
    _assert_close(logits, target_logits, 1e-4, "logits")
    # the part orthogonal to a passes through untouched; the a-part moves to b
    a64, b64 = a.double(), b.double()
    proj = before.double() @ a64
    _assert_close(after.double() - proj[:, None] * b64, before.double() - proj[:, None] * a64, 1e-6, "orthogonal part")
    plain = _logits(model)
    assert float((logits - plain).abs().max()) > 1e-3  # the injection and edit did something


def test_residual_redirect_on_natural_states_leaves_orthogonal_directions():
    model = tiny_model("qwen2")
    g = _gen(2)
    a, b = _unit(torch.randn(model.d_model, generator=g)), _unit(torch.randn(model.d_model, generator=g))
    seen = {}
    batch = model.encode(PROMPTS)
    with model.hooks() as hooks:
        hooks.add("resid_pre", 2, lambda x, ctx: seen.__setitem__("before", x.clone()))
        render(RankOneRedirect(a, b, layers=[2]).resolve(model), hooks)
        hooks.add("resid_pre", 2, lambda x, ctx: seen.__setitem__("after", x.clone()))
        with torch.inference_mode():
            model.hf(**batch.model_inputs())
    mask = batch.attention_mask.bool()
    before, after = seen["before"][mask].double(), seen["after"][mask].double()
    proj = before @ a.double()
    _assert_close(after, before + proj[:, None] * (b - a).double(), 1e-6, "h + (a·h)(b - a)")
    # the part of h orthogonal to a is carried through unchanged; only its a-part turns into b
    _assert_close(after - proj[:, None] * b.double(), before - proj[:, None] * a.double(), 1e-6, "h - (a·h)a")
    # so the stream moves only along b - a: every readout orthogonal to b - a is unchanged
    move = (b - a).double()
    ortho = torch.linalg.qr(torch.stack([move, *torch.randn(5, model.d_model, generator=g, dtype=F64)]).T)[0][:, 1:]
    _assert_close(after @ ortho, before @ ortho, 1e-6, "readouts orthogonal to b - a")
    assert float((after - before).abs().max()) > 1e-3


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_redirect_everywhere_equals_baking_M_into_every_writer(family):
    model = tiny_model(family)
    g = _gen(3)
    a, b = torch.randn(model.d_model, generator=g), torch.randn(model.d_model, generator=g)
    iv = RankOneRedirect(Direction(a[None], (1,)), b, everywhere=True)
    M = iv.matrix(dtype=F64)
    spec = model.spec
    edits = {spec.embed: lambda w: w @ M.T}
    for la in range(model.n_layers):
        for role in (spec.o_proj, spec.down_proj):
            edits[f"{spec.layers}.{la}.{role}"] = lambda w: M @ w
    baked = _baked_copy(model, edits)
    with model.apply(iv) as session:
        hooked = _logits(model)
    assert set(session.counts.values()) == {1} and len(session.counts) == 1 + 2 * model.n_layers
    _assert_close(hooked, _logits(baked), 1e-4, "hook vs baked")
    assert float((hooked - _logits(model)).abs().max()) > 1e-3


@pytest.mark.parametrize("family", ["gemma2", "deepseek_v3", "gpt_oss"])
def test_redirect_everywhere_fires_on_other_families(family):
    model = tiny_model(family)
    a, b = torch.randn(model.d_model, generator=_gen(4)), torch.randn(model.d_model, generator=_gen(5))
    with model.apply(RankOneRedirect(a, b, everywhere=True)) as session:
        hooked = _logits(model)
    assert min(session.counts.values()) >= 1
    assert torch.isfinite(hooked).all() and float((hooked - _logits(model)).abs().max()) > 1e-4


def test_residual_redirect_bad_inputs():
    model = tiny_model("llama")
    a, b = torch.randn(64, generator=_gen(6)), torch.randn(64, generator=_gen(7))
    with pytest.raises(ShapeError, match="d_model=64"):
        RankOneRedirect(torch.randn(8), torch.randn(8), layers=[0]).resolve(model)
    with pytest.raises(ShapeError, match="width"):
        RankOneRedirect(torch.randn(8), torch.randn(9), layers=[0])
    with pytest.raises(DegenerateEditError, match="same way"):
        RankOneRedirect(a, 2.5 * a, layers=[0])
    with pytest.raises(DegenerateEditError, match="zero vector"):
        RankOneRedirect(a, torch.zeros(64), layers=[0])
    with pytest.raises(ShapeError, match="everywhere"):
        RankOneRedirect(a, b, layers=[0], everywhere=True)
    with pytest.raises(ShapeError, match="layers="):
        RankOneRedirect(a, b).resolve(model)
    two = Direction(torch.randn(2, 64), (0, 1))
    with pytest.raises(ShapeError, match="source_layer"):
        RankOneRedirect(two, b, everywhere=True).resolve(model)
    assert len(RankOneRedirect(two, b, everywhere=True, source_layer=1).resolve(model).steps) == 1 + 2 * model.n_layers
    with pytest.raises(DegenerateEditError):  # a per-layer pair that coincides
        RankOneRedirect(Direction(torch.stack([a, b]), (0, 1)), Direction(torch.stack([b, b]), (0, 1))).resolve(model)
    assert issubclass(DegenerateEditError, SteerlabError) and issubclass(NotALinearModuleError, SteerlabError)


# ----------------------------------------------------------------------------------------------
# linear form: algebra
# ----------------------------------------------------------------------------------------------
def _spd(n, g):
    q = torch.randn(n, 3 * n, generator=g, dtype=F64)
    return q @ q.T / (3 * n) + 0.1 * torch.eye(n, dtype=F64)


def test_rank_one_update_maps_the_key_and_fixes_inputs_with_zero_u():
    g = _gen(8)
    W = torch.randn(5, 7, generator=g, dtype=F64)
    k_a, k_b = torch.randn(7, generator=g, dtype=F64), torch.randn(7, generator=g, dtype=F64)
    C = _spd(7, g)
    for cov in (None, C):
        delta = rank_one_update(W, k_a, W @ k_b, covariance=cov)
        new = W + delta
        torch.testing.assert_close(new @ k_a, W @ k_b, atol=1e-10, rtol=0)  # W' k_A = v_B
        u = k_a if cov is None else torch.linalg.solve(cov, k_a)
        x = torch.randn(20, 7, generator=g, dtype=F64)
        x = x - (x @ u)[:, None] * u / (u @ u)  # uᵀx = 0
        torch.testing.assert_close(x @ new.T, x @ W.T, atol=1e-10, rtol=0)
        assert int(torch.linalg.matrix_rank(delta)) == 1
    torch.testing.assert_close(
        rank_one_update(W, k_a, W @ k_b, covariance=torch.eye(7, dtype=F64)), rank_one_update(W, k_a, W @ k_b)
    )
    assert rank_one_update(W.float(), k_a, W @ k_b).dtype == torch.float32


def test_closed_form_without_preservation_fits_independent_keys_exactly():
    g = _gen(9)
    W = torch.randn(6, 8, generator=g, dtype=F64)
    keys, values = torch.randn(3, 8, generator=g, dtype=F64), torch.randn(3, 6, generator=g, dtype=F64)
    new, delta = closed_form_edit(W, keys, values, lam=0.0)  # Σ k kᵀ is singular: the smallest fitting change
    torch.testing.assert_close(keys @ new.T, values, atol=1e-9, rtol=0)
    torch.testing.assert_close(new, W + delta)
    null = torch.linalg.svd(keys)[2][3:]  # inputs orthogonal to every key are untouched
    torch.testing.assert_close(null @ new.T, null @ W.T, atol=1e-9, rtol=0)


def test_closed_form_with_heavy_preservation_keeps_preserved_outputs():
    g = _gen(10)
    W = torch.randn(5, 4, generator=g, dtype=F64)
    keys, values = torch.randn(2, 4, generator=g, dtype=F64), torch.randn(2, 5, generator=g, dtype=F64)
    keep = torch.randn(6, 4, generator=g, dtype=F64)  # with the keys, more constraints than inputs
    heavy, _ = closed_form_edit(W, keys, values, preserve=keep, lam=1e8)
    _assert_close(keep @ heavy.T, keep @ W.T, 1e-6, "preserved outputs")
    light, _ = closed_form_edit(W, keys, values, preserve=keep, lam=1e-3)
    fit = lambda w: float((keys @ w.T - values).norm())
    assert fit(light) < fit(heavy) and fit(light) < fit(W)


@pytest.mark.parametrize("ridge", [0.0, 0.3])
def test_closed_form_matches_lstsq_and_gradient_descent(ridge):
    g = _gen(11)
    W = torch.randn(4, 5, generator=g, dtype=F64)
    keys, values = torch.randn(3, 5, generator=g, dtype=F64), torch.randn(3, 4, generator=g, dtype=F64)
    keep, lam = torch.randn(6, 5, generator=g, dtype=F64), 0.7
    new, _ = closed_form_edit(W, keys, values, preserve=keep, lam=lam, ridge=ridge)
    # oracle 1: the same quadratic objective as one least-squares problem
    rows = [keys, lam**0.5 * keep, ridge**0.5 * torch.eye(5, dtype=F64)]
    targets = [values, lam**0.5 * keep @ W.T, ridge**0.5 * W.T]
    solution = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)).solution.T
    torch.testing.assert_close(new, solution, atol=1e-9, rtol=0)
    # oracle 2: minimise it by L-BFGS from W with autograd
    w = W.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe"
    )

    def loss():
        opt.zero_grad()
        value = (
            ((keys @ w.T - values) ** 2).sum() + lam * ((keep @ (w - W).T) ** 2).sum() + ridge * ((w - W) ** 2).sum()
        )
        value.backward()
        return value

    opt.step(loss)
    torch.testing.assert_close(new, w.detach(), atol=1e-6, rtol=0)


def test_closed_form_with_one_key_is_the_rank_one_update():
    """UCE with keys [k_A], values [v_B], preservation P: ΔW = (v - Wk) uᵀ / (λ + uᵀk), u = (PᵀP)⁻¹k."""
    g = _gen(12)
    W = torch.randn(5, 6, generator=g, dtype=F64)
    k, v = torch.randn(6, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    P = torch.randn(10, 6, generator=g, dtype=F64)
    C = P.T @ P
    u = torch.linalg.solve(C, k)
    for lam in (0.5, 2.0):
        _, delta = closed_form_edit(W, k, v, preserve=P, lam=lam)
        torch.testing.assert_close(delta, torch.outer(v - W @ k, u) / (lam + u @ k), atol=1e-10, rtol=0)
    _, limit = closed_form_edit(W, k, v, preserve=P, lam=1e-9)
    torch.testing.assert_close(limit, rank_one_update(W, k, v, covariance=C), atol=1e-6, rtol=0)
    _, plain = closed_form_edit(W, k, v, preserve=torch.eye(6, dtype=F64), lam=1e-9)  # C = I
    torch.testing.assert_close(plain, rank_one_update(W, k, v), atol=1e-6, rtol=0)


def test_linear_algebra_bad_inputs():
    g = _gen(13)
    W = torch.randn(5, 7, generator=g, dtype=F64)
    k = torch.randn(7, generator=g, dtype=F64)
    with pytest.raises(ShapeError, match="width 6"):
        rank_one_update(W, torch.randn(6, dtype=F64), W @ k)
    with pytest.raises(ShapeError, match="outputs width 5"):
        rank_one_update(W, k, torch.randn(4, dtype=F64))
    with pytest.raises(DegenerateEditError, match="does nothing"):
        rank_one_update(W, k, W @ k)  # k_A == k_B
    with pytest.raises(DegenerateEditError, match="zero key"):
        rank_one_update(W, torch.zeros(7, dtype=F64), torch.randn(5, dtype=F64))
    singular = torch.outer(k, k)
    with pytest.raises(DegenerateEditError, match="ridge"):
        rank_one_update(W, k, torch.randn(5, dtype=F64), covariance=singular)
    with pytest.raises(ShapeError, match="symmetric"):
        rank_one_update(W, k, torch.randn(5, dtype=F64), covariance=torch.randn(7, 7, dtype=F64))
    with pytest.raises(ShapeError, match=r"keys must be \[n, 7\]"):
        closed_form_edit(W, torch.randn(2, 6, dtype=F64), torch.randn(2, 5, dtype=F64))
    with pytest.raises(ShapeError, match="one output per key"):
        closed_form_edit(W, torch.randn(2, 7, dtype=F64), torch.randn(3, 5, dtype=F64))
    with pytest.raises(InvalidValueError, match=">= 0"):
        closed_form_edit(W, torch.randn(2, 7, dtype=F64), torch.randn(2, 5, dtype=F64), lam=-1.0)


# ----------------------------------------------------------------------------------------------
# linear form: on models
# ----------------------------------------------------------------------------------------------
def test_keys_and_covariance_match_a_manual_collection():
    model = tiny_model("llama")
    path, linear = resolve_linear(model, 1, "down_proj")
    assert path == "model.layers.1.mlp.down_proj"
    last, raw = [], []
    for p in PROMPTS:  # one prompt at a time: no padding at all
        grabbed = {}
        handle = linear.register_forward_pre_hook(
            lambda m, args, grabbed=grabbed: grabbed.__setitem__("x", args[0][0].double())
        )
        try:
            with torch.inference_mode():
                model.hf(**model.encode([p]).model_inputs())
                last.append(grabbed["x"][-1])
                model.hf(**model.encode([p], chat=False).model_inputs())
                raw.append(grabbed["x"])
        finally:
            handle.remove()
    keys = module_keys(model, PROMPTS, layer=1, average=False, batch_size=3)
    _assert_close(keys, torch.stack(last), 1e-5, "keys")
    _assert_close(module_keys(model, PROMPTS, layer=1, batch_size=3), torch.stack(last).mean(0), 1e-5, "mean key")
    everything = torch.cat(raw)
    expected = everything.T @ everything / everything.shape[0]
    C = estimate_key_covariance(model, PROMPTS, layer=1, batch_size=3)
    assert C.dtype == F64
    _assert_close(C, expected, 1e-5, "covariance")
    ridged = estimate_key_covariance(model, PROMPTS, layer=1, ridge=0.5, batch_size=3)
    _assert_close(ridged, expected + 0.5 * torch.eye(C.shape[0], dtype=F64), 1e-5, "ridge")
    assert not model.hf.model.layers[1].mlp.down_proj._forward_pre_hooks  # collection hooks are gone


CASES = [
    ("llama", "down_proj", 1, True),
    ("qwen2", "o_proj", 0, False),
    ("gemma2", "down_proj", 2, True),
    ("qwen2_moe", "o_proj", 1, True),  # MoE family: attention output projection
    ("deepseek_v3", "down_proj", 0, False),  # first layer is a dense MLP
    ("gpt_oss", "o_proj", 1, False),  # o_proj with a bias
]


@pytest.mark.parametrize(("family", "module", "layer", "with_cov"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_linear_redirect_hook_equals_the_edited_weight(family, module, layer, with_cov):
    model = tiny_model(family)
    cov = estimate_key_covariance(model, CORPUS, layer=layer, module=module, ridge=1e-2) if with_cov else None
    concept = ["Tell me a joke about cats."]
    edit = linear_redirect_from_prompts(model, concept, ["How do I bake bread at home?", "Hi there"], layer=layer,
                                       module=module, covariance=cov)  # fmt: skip
    path, delta = _weight_update(model, edit)
    _, linear = resolve_linear(model, layer, module)
    assert path.endswith(model.spec.o_proj if module == "o_proj" else model.spec.down_proj)
    assert delta.shape == linear.weight.shape and int(torch.linalg.matrix_rank(delta.double(), rtol=1e-5)) == 1
    torch.testing.assert_close(edit.edited_weight(model), linear.weight.detach() + delta)
    plain = _logits(model)
    baked = _baked_copy(model, {path: lambda w: w + delta.double()})

    seen = {}
    with model.apply(edit) as session:
        hooked = _logits(model)
        session.add_module_hook(linear, lambda m, args, out: seen.__setitem__("y", out[0, -1].clone()))
        with torch.inference_mode():
            model.hf(**model.encode(concept).model_inputs())
    assert list(session.counts.values()) == [2]
    _assert_close(hooked, _logits(baked), 1e-4, "hook vs baked logits")
    assert float((hooked - plain).abs().max()) > 1e-3
    v_b = edit.target_value(model) + (linear.bias.detach().double() if linear.bias is not None else 0.0)
    _assert_close(seen["y"], v_b, 1e-4, "the concept's key now gives v_B")
    assert not linear._forward_hooks and not linear._forward_pre_hooks
    _assert_close(_logits(model), plain, 0.0, "hooks removed")


def test_linear_redirect_generation_is_the_same_with_and_without_cache():
    model = tiny_model("llama")
    edit = linear_redirect_from_prompts(model, ["Tell me a joke about cats."], ["Hi there"], layer=1)
    with model.apply(edit):
        cached = model.generate(PROMPTS[:2], max_new_tokens=6)
        uncached = model.generate(PROMPTS[:2], max_new_tokens=6, use_cache=False)
    assert cached == uncached


def test_multikey_redirect_hook_equals_the_edited_weight():
    model = tiny_model("llama")
    kw = {"layer": 1, "average": False}
    keys = module_keys(model, PROMPTS[:3], **kw)
    targets = module_keys(model, CORPUS[:3], **kw)
    keep = module_keys(model, CORPUS[3:], **kw)
    exact = MultiKeyRedirect(1, keys, target_keys=targets, lam=0.0)
    W = model.hf.model.layers[1].mlp.down_proj.weight.detach().double()
    _assert_close(keys.double() @ exact.edited_weight(model).double().T, targets.double() @ W.T, 1e-4, "W' k_i = v_i")
    edit = MultiKeyRedirect(1, keys, target_keys=targets, preserve=keep, lam=0.5)
    path, delta = _weight_update(model, edit)
    baked = _baked_copy(model, {path: lambda w: w + delta.double()})
    with model.apply(edit):
        hooked = _logits(model)
    _assert_close(hooked, _logits(baked), 1e-4, "hook vs baked logits")
    assert float((hooked - _logits(model)).abs().max()) > 1e-3


def test_linear_redirect_bad_inputs_and_unfired_hooks():
    model = tiny_model("llama")
    k = torch.randn(model.config.intermediate_size, generator=_gen(14))
    with pytest.raises(NotALinearModuleError, match="not a 2D nn.Linear"):
        resolve_linear(model, 0, "input_layernorm")
    with pytest.raises(NotALinearModuleError, match="fused"):
        resolve_linear(tiny_model("mixtral"), 0, "down_proj")
    with pytest.raises(NotALinearModuleError, match="no module 'mlp.down_proj'"):
        resolve_linear(tiny_model("qwen2_moe"), 1, "down_proj")
    with pytest.raises(NotALinearModuleError, match=r"\(4, 64, 32\)|not a 2D"):
        resolve_linear(tiny_model("qwen3_moe"), 0, "mlp.experts.down_proj")
    with pytest.raises(ShapeError, match="takes inputs of width 96"):
        LinearRedirect(0, torch.randn(64), torch.randn(64)).delta(model)
    with pytest.raises(DegenerateEditError, match="same vector"):
        LinearRedirect(0, k, k.clone())
    with pytest.raises(ShapeError, match="exactly one"):
        LinearRedirect(0, k)
    with pytest.raises(DegenerateEditError, match="zero key"):
        LinearRedirect(0, torch.zeros_like(k), k).delta(model)
    with pytest.raises(DegenerateEditError, match="ridge"):
        LinearRedirect(0, k, 2 * k + 1, covariance=torch.zeros(96, 96)).delta(model)
    edit = LinearRedirect(0, k, torch.randn(96, generator=_gen(15)))
    with pytest.raises(RuntimeError, match="inside"):
        model.hooks().add_module(model.hf.model.layers[0].mlp.down_proj, lambda *a: None, name="x")  # no open session
    linear = model.hf.model.layers[0].mlp.down_proj
    with pytest.raises(InterventionNotFiredError, match="never fired"), model.apply(edit):
        pass
    with pytest.raises(RuntimeError, match="boom"), model.apply(MultiKeyRedirect(0, k, target_keys=2 * k)):
        raise RuntimeError("boom")
    assert not linear._forward_hooks


def test_linear_redirect_positions_generated_only():
    model = tiny_model("llama")
    k_a = module_keys(model, ["Tell me a joke about cats."], layer=1)
    k_b = module_keys(model, ["Hi there"], layer=1)
    edit = LinearRedirect(1, k_a, k_b, tokens="generated")
    prompt_only = model.apply(LinearRedirect(1, k_a, k_b, tokens="prompt"))
    with pytest.raises(UnknownPositionError, match="prompt length"), prompt_only:
        _logits(model)  # a plain forward has no prompt length
    with model.apply(edit):
        cached = model.generate(PROMPTS[:2], max_new_tokens=6)
        uncached = model.generate(PROMPTS[:2], max_new_tokens=6, use_cache=False)
    assert cached == uncached
