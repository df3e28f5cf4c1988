"""Export: safetensors directories that plain transformers loads, GGUF files both readers accept, and the manifest."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import steerlab
from steerlab.errors import NotExportableError
from steerlab.interventions.experts import ExpertMask
from steerlab.interventions.heads import HeadAblation
from steerlab.steering import Direction
from steerlab.steering.ops import Ablate, AddVector
from steerlab.testing import tiny_model
from steerlab.training import bake, export, parity, read_manifest

PROMPTS = ["Write a short poem about the sea.", "Hi there"]
TOL = 1e-4


def _direction(model, layer=1, seed=0):
    vec = torch.randn(1, model.d_model, generator=torch.Generator().manual_seed(seed))
    return Direction(vec, (layer,), method="mean_diff", data_hash="0123abcd")


def _logits(hf, model, prompts=PROMPTS):
    batch = model.encode(prompts)
    with torch.inference_mode():
        out = hf(**batch.model_inputs()).logits
    return out[batch.attention_mask.bool()].float()


def _reload(path: Path, attn: str = "eager", **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn, **kw)
    return hf.eval(), AutoTokenizer.from_pretrained(path, **kw)


def _same_tokens(model, tokenizer):
    for text in [model.chat().render(p).text for p in PROMPTS] + ["plain text, 123 ünï"]:
        assert (
            tokenizer(text, add_special_tokens=False)["input_ids"]
            == model.tokenizer(text, add_special_tokens=False)["input_ids"]
        )


def _mean_heads(m):
    return HeadAblation([(1, 0)], mode="mean", means=torch.ones(m.n_layers, m.n_heads, m.head_dim))


CASES = {
    "llama-ablate": ("llama", lambda m: Ablate(_direction(m))),
    "qwen2-add-as-llama": ("qwen2", lambda m: AddVector(_direction(m), coeff=3.0, layers=[2])),
    "gemma2-add-embed": ("gemma2", lambda m: AddVector(_direction(m), coeff=3.0, layers=[0])),
    "deepseek-heads-mean": ("deepseek_v3", _mean_heads),
    "gpt_oss-experts-off": ("gpt_oss", lambda m: ExpertMask([(1, 2)])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_safetensors_export_reloads_with_plain_transformers(case, tmp_path):
    family, make = CASES[case]
    model = tiny_model(family)
    iv = make(model)
    baked = bake(model, iv)
    report = parity(model, baked, iv, PROMPTS, max_new_tokens=0)
    out = export(baked, tmp_path / "out", manifest={"note": "test export", "run": 3})
    hf, tok = _reload(out)
    assert type(hf).__name__ == type(baked.hf).__name__
    assert float((_logits(hf, model) - _logits(baked.hf, model)).abs().max()) <= TOL
    with model.apply(iv):
        hooked = _logits(model.hf, model)
    assert float((_logits(hf, model) - hooked).abs().max()) <= TOL
    _same_tokens(model, tok)

    manifest = read_manifest(out)
    assert manifest["steerlab_version"] == steerlab.__version__ and manifest["weights_format"] == "safetensors"
    assert manifest["model_type"] == baked.spec.model_type and manifest["extra"] == {"note": "test export", "run": 3}
    (edit,) = manifest["edits"]
    assert edit["intervention"]["type"] == type(iv).__name__
    assert (
        edit["parity"][0]["max_abs_logit_diff"]
        == report.max_abs_logit_diff
        == manifest["parity"][0]["max_abs_logit_diff"]
    )
    if isinstance(iv, (Ablate, AddVector)):
        assert edit["intervention"]["direction"]["data_hash"] == "0123abcd"
        assert len(edit["intervention"]["direction"]["sha256"]) == 64
    for name, info in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == info["sha256"]
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and "quantization_config" not in config


def test_export_loads_without_steerlab(tmp_path):
    model = tiny_model("llama")
    iv = Ablate(_direction(model))
    out = export(bake(model, iv), tmp_path / "out")
    ids = model.encode(PROMPTS[:1]).input_ids
    code = (
        "import sys, json, torch; sys.modules['steerlab'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"hf = AutoModelForCausalLM.from_pretrained({str(out)!r}, attn_implementation='eager').eval()\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "with torch.no_grad(): print(json.dumps(hf(input_ids=ids).logits[0, -1].tolist()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))
    with model.apply(iv), torch.inference_mode():
        ours = model.hf(input_ids=ids).logits[0, -1]
    assert float((theirs - ours).abs().max()) <= TOL


def test_quantization_config_is_left_out_of_the_export_and_kept_on_the_model(tmp_path):
    model = tiny_model("llama")
    baked = bake(model, HeadAblation([(0, 1)]))
    baked.hf.config.quantization_config = {"quant_method": "gguf"}
    out = export(baked, tmp_path / "out")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert baked.hf.config.quantization_config == {"quant_method": "gguf"}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gguf_export_reads_back_in_gguf_and_transformers(family, tmp_path):
    import gguf

    model = tiny_model(family)
    iv = Ablate(_direction(model))
    baked = bake(model, iv)
    out = export(baked, tmp_path / "f32", format="gguf")
    reader = gguf.GGUFReader(out / "model.gguf")
    assert reader.fields["general.architecture"].contents() == family
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output.weight", "blk.0.attn_q.weight", "blk.2.ffn_down.weight"} <= names
    assert {t.tensor_type.name for t in reader.tensors} == {"F32"}
    assert len(names) == len(baked.hf.state_dict())
    hf, tok = _reload(out, gguf_file="model.gguf")
    assert hf.config.model_type == family
    assert float((_logits(hf, model) - _logits(baked.hf, model)).abs().max()) <= TOL
    _same_tokens(model, tok)
    assert tok.chat_template == model.tokenizer.chat_template
    assert read_manifest(out)["files"]["model.gguf"]["bytes"] == (out / "model.gguf").stat().st_size

    half = export(baked, tmp_path / "f16", format="gguf", precision="f16")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(half / "model.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    hf16, _ = _reload(half, gguf_file="model.gguf")
    ref = _logits(baked.hf, model)
    assert float((_logits(hf16, model) - ref).abs().max()) <= 2e-2 * float(ref.abs().max())


def test_gguf_export_of_tied_embeddings_omits_the_output_tensor(tmp_path):
    import gguf
    from test_bake import _tied_llama

    model = _tied_llama()
    out = export(model, tmp_path / "tied", format="gguf")
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(out / "model.gguf").tensors}
    hf, _ = _reload(out, gguf_file="model.gguf")
    assert hf.config.tie_word_embeddings
    assert float((_logits(hf, model) - _logits(model.hf, model)).abs().max()) <= TOL
    assert read_manifest(out)["edits"] == []


def test_gguf_export_refuses_what_the_loader_would_not_read_back(tmp_path):
    with pytest.raises(NotExportableError, match="supports llama, qwen2"):
        export(tiny_model("gemma2"), tmp_path / "a", format="gguf")
    llama = tiny_model("llama")
    means = torch.ones(llama.n_layers, llama.n_heads, llama.head_dim)
    with_bias = bake(llama, HeadAblation([(1, 0)], mode="mean", means=means))  # attention_bias=True now
    with pytest.raises(NotExportableError, match="attention_bias.*safetensors"):
        export(with_bias, tmp_path / "b", format="gguf")
    qwen_as_llama = bake(tiny_model("qwen2"), AddVector(_direction(llama), layers=[1]))
    with pytest.raises(NotExportableError, match="safetensors"):
        export(qwen_as_llama, tmp_path / "c", format="gguf")
    with pytest.raises(NotExportableError, match="format"):
        export(llama, tmp_path / "d", format="onnx")
    assert not (tmp_path / "b" / "model.gguf").exists()


def test_smollm_gguf_export_with_tokenizer_copied_from_the_source(smollm, tmp_path):
    """Real weights from a real GGUF: ablate, export F32 GGUF, reload with transformers' GGUF loader."""
    import gguf

    iv = Ablate(_direction(smollm, layer=5))
    baked = bake(smollm, iv)  # SmolLM2 ties its embeddings: the bake unties them
    report = parity(smollm, baked, iv, PROMPTS[:1], max_new_tokens=0)
    assert report.max_abs_logit_diff <= 2e-4, report  # logits reach ~40 here; float32 rounding over 30 layers
    out = export(baked, tmp_path / "smol", format="gguf")
    reader = gguf.GGUFReader(out / "model.gguf")
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"  # copied from the source GGUF
    assert "output.weight" in {t.name for t in reader.tensors}
    hf, tok = _reload(out, attn=baked.config._attn_implementation, gguf_file="model.gguf")
    assert not hf.config.tie_word_embeddings
    assert float((_logits(hf, smollm, PROMPTS[:1]) - _logits(baked.hf, smollm, PROMPTS[:1])).abs().max()) <= TOL
    _same_tokens(smollm, tok)
