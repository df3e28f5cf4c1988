"""The vLLM backend: per-request row groups and hooks (no engine needed), and, where vLLM is installed (the engines
venv, ``make engines-test``), the real engine against steerlab's HF hooks on the Qwen default."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import steerlab
from steerlab import compat
from steerlab.backends.vllm import Steer
from steerlab.backends.vllm_worker import Batch, LayerSteering, WorkerHooks, take_fired
from steerlab.errors import EngineError, InterventionNotFiredError, InvalidValueError, UnknownSiteError
from steerlab.plan import Add, Plan, Project, SetHeads, Step

HAS_VLLM = importlib.util.find_spec("vllm") is not None
D = 4


def _request(req_id, start, end, n_prompt, name=None, scale=None):
    extra = {} if name is None else {"steerlab": name, "steerlab_tag": req_id, **({} if scale is None else {"steerlab_scale": scale})}
    return compat.ScheduledRequest(req_id, start, end, n_prompt, extra)


# ----- row groups and edits (no engine) -----
def test_each_row_gets_its_own_requests_steering_and_scale():
    plans = {"up": Plan("up", (Step(0, "resid_pre", Add(torch.ones(D))),))}
    steering = LayerSteering(plans)
    scheduled = [_request("a", 0, 3, 3), _request("b", 3, 5, 2, "up", 2.0), _request("c", 5, 6, 4, "up")]
    batch = Batch.of(scheduled, torch.tensor([0, 1, 2, 0, 1, 4, 5, 6]))
    x = torch.zeros(8, D)
    out = steering.edit_residual(0, "resid_pre", x, batch)
    assert out[:, 0].tolist() == [0, 0, 0, 2, 2, 1, 0, 0]  # plain, x2, x1, padding rows untouched
    assert x.abs().sum() == 0  # the input is not edited in place
    assert steering.fired == {"b": {0}, "c": {0}}


def test_scale_multiplies_the_change_of_a_projection():
    unit = torch.tensor([1.0, 0, 0, 0])
    steering = LayerSteering({"ablate": Plan("Ablate", (Step(1, "attn_out", Project(unit)),))})
    batch = Batch.of([_request("a", 0, 1, 1, "ablate", 0.5), _request("b", 1, 2, 1, "ablate")], torch.tensor([0, 0]))
    x = torch.tensor([[4.0, 1, 0, 0], [4.0, 1, 0, 0]])
    out = steering.edit_residual(1, "attn_out", x, batch)
    assert out.tolist() == [[2.0, 1, 0, 0], [0.0, 1, 0, 0]]


def test_generated_tokens_are_told_from_prompt_tokens_by_position():
    steering = LayerSteering({"gen": Plan("gen", (Step(0, "resid_pre", Add(torch.ones(D)), tokens="generated"),))})
    # request a: prefill of 3 prompt tokens; request b: one decode step at position 5 of a 5-token prompt
    batch = Batch.of([_request("a", 0, 3, 3, "gen"), _request("b", 3, 4, 5, "gen")], torch.tensor([0, 1, 2, 5]))
    out = steering.edit_residual(0, "resid_pre", torch.zeros(4, D), batch)
    assert out[:, 0].tolist() == [0, 0, 0, 1]
    assert steering.fired == {"b": {0}}


@pytest.mark.parametrize("bad", [float("nan"), "strong", float("inf")])
def test_a_scale_that_is_not_a_finite_number_raises(bad):
    with pytest.raises(EngineError, match="steerlab_scale"):
        Batch.of([_request("a", 0, 1, 1, "up", bad)], torch.tensor([0]))


def test_operations_vllm_cannot_render_raise_naming_the_fix():
    plan = Plan("HeadAblation", (Step(0, "head", SetHeads((1,))),))
    with pytest.raises(UnknownSiteError, match="Bake the rest"):
        LayerSteering({"heads": plan})


class _Layer(nn.Module):
    """vLLM's decoder-layer convention: ``(positions, hidden, residual) -> (hidden, residual)``, the residual
    added inside the next step (here: ``x = hidden + residual``, then ``hidden = 2 x``)."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Identity()

    def forward(self, positions, hidden, residual):
        residual = hidden if residual is None else hidden + residual
        return self.mlp(2 * residual), residual


class _Model(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(_Layer() for _ in range(n))

    def forward(self, *, input_ids, positions):
        hidden, residual = input_ids, None
        for layer in self.model.layers:
            hidden, residual = layer(positions, hidden, residual)
        return hidden + residual


def _worker(model, scheduled):
    starts = [s.start for s in scheduled] + [scheduled[-1].end]
    runner = SimpleNamespace(
        get_model=lambda: model,
        input_batch=SimpleNamespace(num_reqs=len(scheduled), req_ids=[s.req_id for s in scheduled]),
        query_start_loc=SimpleNamespace(np=starts),
        requests={s.req_id: SimpleNamespace(sampling_params=SimpleNamespace(extra_args=s.extra_args),
                                            num_prompt_tokens=s.num_prompt_tokens) for s in scheduled},
    )  # fmt: skip
    return SimpleNamespace(model_runner=runner)


def test_worker_hooks_edit_the_sum_of_hidden_and_residual_and_come_off():
    model = _Model(3)
    x = torch.randn(4, D)
    positions = torch.arange(4)
    plain = model(input_ids=x, positions=positions)
    v = torch.randn(D)
    plans = {"add": Plan("add", (Step(1, "resid_pre", Add(v)), Step(2, "resid_post", Add(v)), Step(0, "mlp_out", Add(v))))}
    worker = _worker(model, [_request("p", 0, 2, 2), _request("s", 2, 4, 2, "add")])
    hooks = WorkerHooks(worker, plans, attn_out="self_attn", mlp_out="mlp", n_layers=3)
    worker.steerlab_hooks = hooks
    steered = model(input_ids=x, positions=positions)
    # by hand: the stream after layer i is h_i + r_i = 3 x_i (x_i the stream entering it)
    s = x[2:]
    s = 3 * s + v  # layer 0 with its mlp output + v (hidden 2s + v, residual s)
    s = 3 * (s + v)  # layer 1 with its input + v
    s = 3 * s + v  # layer 2, its output + v
    torch.testing.assert_close(steered[2:], s)
    torch.testing.assert_close(steered[:2], plain[:2])
    assert take_fired(worker) == {"s": [0, 1, 2]} and take_fired(worker) == {}
    hooks.remove()
    torch.testing.assert_close(model(input_ids=x, positions=positions), plain)


def test_a_model_with_other_layer_counts_is_refused():
    worker = _worker(_Model(2), [_request("a", 0, 1, 1)])
    with pytest.raises(EngineError, match="not the same model"):
        WorkerHooks(worker, {}, attn_out="self_attn", mlp_out="mlp", n_layers=3)


# ----- the real engine -----
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (make engines; make engines-test)")
N_TOKENS = 32


@pytest.fixture(scope="module")
def interventions(harm_direction):
    return {
        "add": steerlab.AddVector(harm_direction, coeff=1.0),
        "ablate": steerlab.Ablate(harm_direction),
        "clamp": steerlab.Clamp(harm_direction, value=0.0, layers=range(8, 20)),
    }


@pytest.fixture(scope="module")
def engine(qwen, interventions):
    from steerlab.backends.vllm import VLLMEngine

    eng = VLLMEngine(qwen, interventions)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def prompts():
    from steerlab.data import advbench, past_tense_harmless

    return advbench()[-16:] + past_tense_harmless()[-16:]  # other sources than the direction's training pairs


def _same(a, b):
    return sum(x == y for x, y in zip(a, b, strict=True))


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("name", ["add", "ablate", "clamp"])
def test_vllm_steering_matches_steerlab_hooks_token_for_token(qwen, engine, interventions, prompts, name):
    plain = qwen.generate(prompts, max_new_tokens=N_TOKENS)
    with qwen.apply(interventions[name]):
        hooked = qwen.generate(prompts, max_new_tokens=N_TOKENS)
    engine_out = engine.generate(prompts, steer=name, max_new_tokens=N_TOKENS)
    same, changed = _same(engine_out, hooked), len(prompts) - _same(hooked, plain)
    print(f"{name}: vLLM == HF hook on {same}/{len(prompts)}; steering changed {changed}/{len(prompts)}")
    assert same >= 0.9 * len(prompts)
    assert changed >= 3  # the intervention acts, so equality above is not plain == plain


@needs_vllm
@pytest.mark.slow
def test_a_mixed_batch_gives_every_row_what_it_asked_for(qwen, engine, harm_direction, prompts):
    rows = prompts[:12]
    steer = [None, ("add", 0.5), ("add", 2.0)] * 4
    requests = [None if s is None else Steer(*s) for s in steer]
    mixed = engine.generate(rows, steer=requests, max_new_tokens=16)
    expected = {}
    for scale in (None, 0.5, 2.0):
        picked = [p for p, s in zip(rows, steer) if (s and s[1]) == scale]
        if scale is None:
            out = qwen.generate(picked, max_new_tokens=16)
        else:
            with qwen.apply(steerlab.AddVector(harm_direction, coeff=scale)):
                out = qwen.generate(picked, max_new_tokens=16)
        expected.update(zip(picked, out))
    same = sum(m == expected[p] for p, m in zip(rows, mixed))
    print(f"mixed batch: {same}/{len(rows)} rows equal their own HF run")
    assert same >= 11
    assert len({m for m, s in zip(mixed, steer) if s and s[1] == 2.0} - {expected[p] for p, s in zip(rows, steer) if s is None}) > 0


@needs_vllm
@pytest.mark.slow
def test_prefix_cache_is_never_shared_between_steered_and_plain_requests(qwen, engine, interventions):
    from steerlab.data import advbench

    rows = advbench()[:4]  # prompts no other test sends, so nothing of theirs is cached yet
    system = "You are a careful assistant who answers briefly. " * 30  # > one 128-token cache block (vLLM on CPU)
    kw = {"max_new_tokens": 12, "system": system}
    plain_hf = qwen.generate(rows, **kw)
    with qwen.apply(interventions["add"]):
        steered_hf = qwen.generate(rows, **kw)
    assert steered_hf != plain_hf
    first = engine.generate(rows, steer="add", **kw)  # fills the cache with steered blocks
    plain = engine.generate(rows, **kw)  # same prompts: must not read them (may read each other's plain blocks)
    again = engine.generate(rows, steer="add", **kw)  # reads its own
    assert engine.settings["prefix_caching"] and min(engine.cached_tokens) >= 128
    assert first == steered_hf and plain == plain_hf and again == steered_hf


@needs_vllm
def test_a_step_that_never_acts_raises(qwen, engine, harm_direction):
    engine.register({"late": steerlab.AddVector(harm_direction, coeff=1.0, tokens="generated")})
    with pytest.raises(InterventionNotFiredError, match="late"):
        engine.generate(["Hi"], steer="late", max_new_tokens=1)  # the one new token is sampled, never fed back
    assert engine.generate(["Hi"], steer="late", max_new_tokens=3)


@needs_vllm
def test_bad_requests_raise_before_the_engine_runs(engine):
    with pytest.raises(InvalidValueError, match="registered"):
        engine.generate(["Hi"], steer="nope")
    with pytest.raises(InvalidValueError, match="one per prompt"):
        engine.generate(["Hi", "Yo"], steer=["add"])
    with pytest.raises(UnknownSiteError, match="no vLLM rendering"):
        engine.register({"heads": Plan("HeadAblation", (Step(0, "head", SetHeads((1,))),))})


@needs_vllm
@pytest.mark.slow
def test_activations_read_inside_vllm_equal_steerlab_collect(qwen, engine, prompts):
    kw = {"layers": [0, 7, 12, 23], "positions": ["t_inst", "last", "post_inst", "inst_mean", "inst_to_last_mean"]}
    ours = steerlab.collect(qwen, prompts, progress=False, **kw)
    engine.generate(prompts[:4], max_new_tokens=4)  # cached blocks of these prompts must not hide their tokens
    theirs = engine.collect(prompts, **kw)
    assert theirs.layers == ours.layers and theirs.positions == ours.positions
    for position in kw["positions"]:
        a, b = ours["resid_pre", position], theirs["resid_pre", position]
        assert a.shape == b.shape
        rel = ((a - b).norm(dim=-1) / a.norm(dim=-1)).max()
        assert rel < 1e-4, (position, float(rel))
    assert engine.generate(prompts[:2], steer="add", max_new_tokens=4)  # steering hooks are back after reading


# placed before the per-family engines below: closing those tears down vLLM's process groups
def _gate_in_vllm_matches_hf(qwen, engine, harm_direction, rows, guard, *, max_new_tokens, log_scores=False):
    """A three-way gate on ``guard`` (band cut at the scores' quartiles) generates the HF policy's rows in vLLM."""
    from steerlab.interventions.gated import GatedRefusal

    scores = guard.score(rows)
    cut, k = sorted(scores.tolist()), len(rows) // 4
    gated = GatedRefusal(guard, refuse=steerlab.AddVector(harm_direction, coeff=1.0), comply=steerlab.Ablate(harm_direction),
                         low=(cut[k - 1] + cut[k]) / 2, high=(cut[-k] + cut[-k - 1]) / 2)  # fmt: skip
    hf = qwen.generate(rows, policy=gated, max_new_tokens=max_new_tokens)
    ours = engine.generate_gated(rows, gated, max_new_tokens=max_new_tokens)
    assert [o.action for o in ours] == [o.action for o in hf] and {o.action for o in hf} == {"refuse", "comply", "leave"}
    got = torch.tensor([o.score for o in ours])
    if log_scores:  # probabilities of untrained tokens are tiny: compare them in log space
        torch.testing.assert_close(got.log(), scores.log(), rtol=0, atol=1e-3)
    else:
        torch.testing.assert_close(got, scores, rtol=1e-3, atol=1e-4)
    same = sum(a.text == b.text for a, b in zip(ours, hf))
    print(f"{type(guard).__name__} gate: vLLM == HF policy on {same}/{len(rows)} rows")
    assert same >= len(rows) - 1


@needs_vllm
@pytest.mark.slow
def test_gated_refusal_in_vllm_matches_the_hf_policy(qwen, engine, harm_direction, prompts):
    from steerlab.interventions.gated import GatedRefusal
    from steerlab.probes import LatentGuard

    rows = prompts[:6] + prompts[-6:]  # AdvBench and harmless past-tense questions
    guard = LatentGuard.fit(qwen, prompts[6:16], prompts[16:26], layers=[12, 16])
    _gate_in_vllm_matches_hf(qwen, engine, harm_direction, rows, guard, max_new_tokens=16)
    assert engine.generate(rows[:2], steer="add", max_new_tokens=4)  # the engine's own steerings are still there
    # a probe guard over two layers (mean logit) reads the same scores inside vLLM
    from steerlab.probes import ProbeGuard

    two = ProbeGuard.fit(qwen, prompts[6:16], prompts[16:26], layer=[12, 16], position="last", C=0.1)
    two = GatedRefusal(two, comply=steerlab.Ablate(harm_direction))
    read = engine.generate_gated(rows, two, max_new_tokens=2)
    torch.testing.assert_close(torch.tensor([o.score for o in read]), two.guard.score(rows), rtol=1e-3, atol=1e-4)
    # a guard on the mean over the instruction and template reads its span inside vLLM
    pooled = ProbeGuard.fit(qwen, prompts[6:16], prompts[16:26], layer=[12, 16], position="inst_to_last_mean", C=0.1)
    read = engine.generate_gated(rows, GatedRefusal(pooled, comply=steerlab.Ablate(harm_direction)), max_new_tokens=2)
    torch.testing.assert_close(torch.tensor([o.score for o in read]), pooled.score(rows), rtol=1e-3, atol=1e-4)
    # a floor: the lowest quarter is left alone in vLLM as on the HF path
    cut, k = sorted(guard.score(rows).tolist()), len(rows) // 4
    floored = GatedRefusal(guard, refuse=steerlab.AddVector(harm_direction, coeff=1.0), comply=steerlab.Ablate(harm_direction),
                           floor=(cut[k - 1] + cut[k]) / 2, low=(cut[2 * k - 1] + cut[2 * k]) / 2, high=(cut[-k] + cut[-k - 1]) / 2)  # fmt: skip
    hf = qwen.generate(rows, policy=floored, max_new_tokens=8)
    ours = engine.generate_gated(rows, floored, max_new_tokens=8)
    assert [o.action for o in ours] == [o.action for o in hf] == floored.actions(guard.score(rows))
    assert sum(o.action == "leave" for o in hf) >= 2 * k and sum(a.text == b.text for a, b in zip(ours, hf)) >= len(rows) - 1


@needs_vllm
@pytest.mark.slow
def test_a_refusal_token_gate_in_vllm_matches_the_hf_policy(qwen, engine, harm_direction, prompts):
    """The guard is a second (HF) model fine-tuned with refusal tokens; it reads the token ids vLLM generates from."""
    from steerlab.interventions.token_guard import RefusalTokenGuard
    from steerlab.training.data import control_tokens
    from steerlab.training.sft import add_tokens

    rows = prompts[:4] + prompts[-4:]
    guard = RefusalTokenGuard.from_model(add_tokens(qwen, control_tokens()))  # untrained tokens: arbitrary scores
    _gate_in_vllm_matches_hf(qwen, engine, harm_direction, rows, guard, max_new_tokens=12, log_scores=True)


def test_a_request_naming_an_unregistered_steering_raises_in_the_worker():
    with pytest.raises(EngineError, match="not registered"):
        Batch.of([_request("a", 0, 1, 1, "ghost")], torch.tensor([0]), known={"up"})


# ----- every family vLLM and steerlab both run: tiny random models, saved and loaded by both -----
ENGINE_FAMILIES = {
    "llama": {}, "qwen2": {}, "qwen3": {}, "mistral": {}, "phi3": {},
    "gemma2": {"tie_word_embeddings": True}, "gemma3_text": {"tie_word_embeddings": True},  # vLLM ties Gemma's
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 96},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
}  # fmt: skip


def _engine_tiny_model(model_type: str):
    """A random 3-layer model whose heads are 64 wide (vLLM's CPU attention has no kernel for narrower ones)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from steerlab.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type, hidden_size=128, intermediate_size=192, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=0,
        eos_token_id=tok.eos_token_id, max_position_embeddings=512, **{"tie_word_embeddings": False, **ENGINE_FAMILIES[model_type]},
    )  # fmt: skip
    return steerlab.load(AutoModelForCausalLM.from_config(config).eval(), tok)


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(ENGINE_FAMILIES))
def test_every_family_steers_in_vllm_as_in_steerlab(model_type, tmp_path):
    from steerlab.backends.vllm import VLLMEngine
    from steerlab.testing import tiny_direction

    model = _engine_tiny_model(model_type)
    model.hf.save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    direction = tiny_direction(model, layer=1, seed=0)
    interventions = {
        "add": steerlab.AddVector(direction, coeff=4.0, unit=True),
        "ablate": steerlab.Ablate(direction),
        "clamp": steerlab.Clamp(direction, value=2.0, layers=[1, 2]),
        "generated": steerlab.AddVector(direction, coeff=4.0, unit=True, tokens="generated"),
    }
    prompts = ["Hello there", "Write a poem", "What is up", "Tell me a story"]
    engine = VLLMEngine(model, interventions, checkpoint=tmp_path, max_model_len=256, kv_cache_bytes=64 << 20)
    outputs = {}
    try:
        for name in (None, *interventions):
            if name is None:
                expected = model.generate(prompts, max_new_tokens=8)
            else:
                with model.apply(interventions[name]):
                    expected = model.generate(prompts, max_new_tokens=8)
            outputs[name] = engine.generate(prompts, steer=name, max_new_tokens=8)
            assert outputs[name] == expected, (model_type, name)
    finally:
        engine.close()
    assert outputs["add"] != outputs[None] and outputs["generated"] != outputs[None]  # the steering acts
    with pytest.raises(EngineError, match="closed"):
        engine.generate(prompts, max_new_tokens=2)


def test_engine_sizes_are_checked_before_vllm_is_touched():
    from steerlab.backends.vllm import VLLMEngine

    with pytest.raises(InvalidValueError, match="kv_cache_bytes"):
        VLLMEngine(None, kv_cache_bytes=0)  # type: ignore[arg-type]
    with pytest.raises(InvalidValueError, match="max_model_len"):
        VLLMEngine(None, max_model_len=True)  # type: ignore[arg-type]

