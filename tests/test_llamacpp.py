"""llama.cpp control vectors: steerlab's plan -> ``direction.N`` GGUF (offset, sums, refusals), and, where a
llama.cpp build is present (``STEERLAB_LLAMA_CPP``: a folder holding ``bin/llama-completion``), the real engine."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import steerlab
from steerlab.backends.llamacpp import control_vector, read_control_vector, run_llama_completion, write_control_vector
from steerlab.errors import NotExportableError
from steerlab.plan import Add, Plan, Step
from steerlab.testing import tiny_direction, tiny_model


def test_resid_pre_of_layer_l_is_direction_l_minus_1_and_coefficients_are_baked(tmp_path):
    model = tiny_model("qwen2")
    direction = tiny_direction(model, layer=2)
    path = write_control_vector(model.plan(steerlab.AddVector(direction, coeff=-2.5)), tmp_path / "v.gguf", model=model)
    read = read_control_vector(path)
    assert sorted(read["directions"]) == [1]
    np.testing.assert_allclose(read["directions"][1], -2.5 * direction.at(2).numpy(), rtol=1e-6)
    assert read["model_hint"] == "qwen2" and read["source"] == "AddVector"


def test_resid_post_maps_to_its_own_block_and_additions_on_one_slot_sum():
    plan = Plan("two", (Step(2, "resid_pre", Add(torch.ones(4))), Step(1, "resid_post", Add(torch.full((4,), 2.0)))))
    slots = control_vector(plan, n_layers=3, d_model=4)
    assert list(slots) == [1] and slots[1].dtype == np.float32
    np.testing.assert_array_equal(slots[1], np.full(4, 3.0, dtype=np.float32))


@pytest.mark.parametrize(
    ("step", "names"),
    [
        (Step(1, "resid_pre", Add(torch.ones(4))), "direction.0"),  # block 0's output: llama.cpp rejects slot 0
        (Step(0, "resid_pre", Add(torch.ones(4))), "direction.-1"),
        (Step(3, "resid_post", Add(torch.ones(4))), "direction.3"),  # past the last block
        (Step(2, "resid_pre", Add(torch.ones(4)), tokens="generated"), "every token"),
        (Step(2, "mlp_out", Add(torch.ones(4))), "resid_pre or resid_post"),
        (Step(2, "resid_pre", Add(torch.zeros(4))), "sum to zero"),
    ],
)
def test_steps_a_control_vector_cannot_express_raise(step, names):
    with pytest.raises(NotExportableError, match=names):
        control_vector(Plan("x", (step,)), n_layers=3, d_model=4)


def test_ablation_is_not_a_control_vector_and_the_error_points_at_the_baked_export(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(NotExportableError, match="--ablate --format gguf"):
        write_control_vector(
            model.plan(steerlab.Ablate(tiny_direction(model, layer=1))), tmp_path / "v.gguf", model=model
        )
    assert not (tmp_path / "v.gguf").exists()


def test_a_file_that_is_not_a_control_vector_is_refused(tmp_path):
    from steerlab.errors import ValueFileError
    from steerlab.training.gguf_export import write_gguf

    path = write_gguf(tiny_model("qwen2"), tmp_path / "model.gguf")
    with pytest.raises(ValueFileError, match="not a llama.cpp control vector"):
        read_control_vector(path)


# ----- the real engine -----
def _llama_completion() -> Path | None:
    root = os.environ.get("STEERLAB_LLAMA_CPP")
    binary = Path(root) / "bin" / "llama-completion" if root else None
    return binary if binary is not None and binary.is_file() else None


def _run(binary: Path, model: Path, text: str, n: int, vector: Path | None) -> str:
    out = run_llama_completion(binary, model, text, n_tokens=n, control_vector=vector)
    return out.stdout.replace("[end of text]", "").strip()


@pytest.mark.slow
@pytest.mark.skipif(_llama_completion() is None, reason="no llama.cpp build (make llama-cpp; STEERLAB_LLAMA_CPP)")
def test_llama_cpp_control_vector_steers_as_the_hf_hook_does(qwen, tmp_path_factory):
    from steerlab.training.gguf_export import write_gguf

    tmp = tmp_path_factory.mktemp("llamacpp")
    gguf_model = write_gguf(qwen, tmp / "qwen-f32.gguf", precision="f32")
    layer, n = 12, 16
    direction = tiny_direction(qwen, layer=layer, seed=3).unit()
    steer = steerlab.AddVector(direction, coeff=8.0)
    vector = write_control_vector(qwen.plan(steer), tmp / "v.gguf", model=qwen)
    prompts = ["Name three fruits.", "What is the capital of France?", "Write a haiku about rain.",
               "Explain what a list is in Python.", "Give me a tip for sleeping well.", "What does a compiler do?",
               "Suggest a name for a cat.", "How many legs does a spider have?", "Describe the colour blue.",
               "Write one sentence about the sea."]  # fmt: skip
    texts = [qwen.chat().render(p).text for p in prompts]
    with qwen.apply(steer):
        hf_steered = qwen.generate(prompts, max_new_tokens=n)
    hf_plain = qwen.generate(prompts, max_new_tokens=n)
    binary = _llama_completion()
    cpp_steered = [_run(binary, gguf_model, t, n, vector) for t in texts]
    cpp_plain = [_run(binary, gguf_model, t, n, None) for t in texts]
    # greedy, f32 on both sides: the same 16 tokens (llama.cpp's kernels sum in another order, so a near-tie
    # may flip a token late in a reply; the bar is 8 of 10)
    assert sum(a == b.strip() for a, b in zip(cpp_plain, hf_plain)) >= 8, list(zip(cpp_plain, hf_plain))
    assert sum(a == b.strip() for a, b in zip(cpp_steered, hf_steered)) >= 8, list(zip(cpp_steered, hf_steered))
    changed = sum(a != b for a, b in zip(hf_steered, hf_plain))
    assert changed >= 3, "the steering must change replies for the comparison to test the layer offset"


@pytest.mark.skipif(_llama_completion() is None, reason="no llama.cpp build (make llama-cpp; STEERLAB_LLAMA_CPP)")
def test_a_failing_llama_cpp_run_raises_with_its_output(tmp_path):
    from steerlab.errors import EngineError

    with pytest.raises(EngineError, match="llama-completion exited"):
        run_llama_completion(_llama_completion(), tmp_path / "missing.gguf", "Hi", n_tokens=1)
