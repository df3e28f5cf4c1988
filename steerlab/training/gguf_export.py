"""Write a dense llama/qwen2-style model as a GGUF file (F32 or F16) with llama.cpp tensor names.

The file is read back by ``gguf.GGUFReader`` and by transformers' GGUF loader
(``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``), which rebuilds the config from the
metadata alone: so only models that loader reproduces exactly are written (families whose registry spec has
:attr:`~steerlab.arch.ArchSpec.gguf`); anything else (biases the loader would drop, sliding windows, rope scaling,
other families) raises
:class:`~steerlab.errors.NotExportableError`. Tokenizer metadata is copied from the source GGUF when
there is one, else built from the HF tokenizer (byte-level BPE) and checked by re-reading it.

Example:
    >>> import tempfile
    >>> from steerlab.testing import tiny_model
    >>> write_gguf(tiny_model("llama"), Path(tempfile.mkdtemp()) / "model.gguf", precision="f32").name
    'model.gguf'
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steerlab import compat
from steerlab.arch import GGUFArch, gguf_families
from steerlab.errors import ChatTemplateError, NotExportableError
from steerlab.model import Model
from steerlab.training.restructure import is_tied


def _refuse(model: Model, why: str) -> NotExportableError:
    return NotExportableError(
        f"cannot write this {model.spec.model_type} model as a GGUF that transformers loads back exactly: {why}. "
        "Export it with format='safetensors' instead"
    )


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise NotExportableError("the config states no rope_theta")
    return float(theta)


def check_writable(model: Model) -> GGUFArch:
    """The :class:`~steerlab.arch.GGUFArch` of ``model``'s family, or :class:`NotExportableError` naming what stands
    in the way."""
    config = model.config
    spec = model.spec.gguf
    if spec is None:
        raise NotExportableError(
            f"GGUF export supports {', '.join(gguf_families())} models; this one is {model.spec.model_type}. "
            "Export it with format='safetensors' instead"
        )
    on = [f for f in spec.flags_off if getattr(config, f, False)]
    if on:
        raise _refuse(model, f"it has {', '.join(on)}=True, and transformers' GGUF loader builds {spec.arch} without "
                             "those biases (a baked bias needs the safetensors export)")  # fmt: skip
    if spec.check is not None and (reason := spec.check(config)):
        raise _refuse(model, reason)
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise _refuse(model, f"it uses rope scaling ({rope_type!r}), which the loader does not read back")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise _refuse(model, f"its activation is {config.hidden_act!r}, not silu")
    heads = model.n_heads
    if not spec.permute_qk and model.head_dim * heads != model.d_model:
        raise _refuse(model, "its head_dim is not hidden_size / num_attention_heads")
    return spec


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py ``LlamaModel.permute``): halves of each head interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model: Model, spec: GGUFArch, precision: str) -> Iterator[tuple[str, np.ndarray]]:
    import gguf

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == spec.arch)
    names = gguf.get_tensor_name_map(arch, model.n_layers)
    tied = is_tied(model.hf)
    n_heads, n_kv = model.n_heads, int(getattr(model.config, "num_key_value_heads", None) or model.n_heads)
    for hf_name, tensor in model.hf.state_dict().items():
        module, _, suffix = hf_name.rpartition(".")
        if tied and module == model.spec.unembed:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        name = names.get_name(module)
        if name is None:
            raise NotExportableError(f"{hf_name} has no llama.cpp {spec.arch} tensor name; export safetensors instead")
        t = tensor.detach().to("cpu", torch.float32)
        if spec.permute_qk and name.endswith(".attn_q"):
            t = _permute(t, n_heads)
        elif spec.permute_qk and name.endswith(".attn_k"):
            t = _permute(t, n_kv)
        array = t.numpy()
        if precision == "f16" and array.ndim > 1:
            array = array.astype(np.float16)
        yield f"{name}.{suffix}", np.ascontiguousarray(array)


# ----- tokenizer metadata -----
def _copy_tokenizer_fields(writer, source: Path, *, skip: frozenset[str] = frozenset()) -> None:
    import gguf

    reader = gguf.GGUFReader(source)
    for key, fld in reader.fields.items():
        if not key.startswith("tokenizer.") or key in skip:
            continue
        main = fld.types[0]
        if main == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, fld.contents(), main, sub_type=fld.types[-1])
        else:
            writer.add_key_value(key, fld.contents(), main)


def _pre_name(tokenizer) -> str:
    """llama.cpp's name for the HF tokenizer's pre-tokenizer (what transformers maps back to the same split)."""
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        splits = [s for s in steps if s.get("type") == "Split"]
        if len(steps) == 2 and len(splits) == 1 and steps[1].get("type") == "ByteLevel":
            regex = splits[0].get("pattern", {}).get("Regex")
            for name, known in compat.gguf_pre_tokenizer_splits().items():
                if known == regex:
                    return name
    raise NotExportableError(
        f"the tokenizer's pre-tokenizer ({pre.get('type')!r}) has no llama.cpp name that transformers maps back to it; "
        "export from a GGUF-loaded model (its tokenizer metadata is copied), or use format='safetensors'"
    )


def _build_tokenizer_fields(writer, model: Model) -> None:
    import gguf

    tok = model.tokenizer
    state = json.loads(tok.backend_tokenizer.to_str())
    bpe = state.get("model", {})
    if bpe.get("type") != "BPE" or (state.get("normalizer") not in (None, {})):
        raise NotExportableError(
            "GGUF tokenizer metadata can be built here for byte-level BPE tokenizers without a normalizer only; "
            "export from a GGUF-loaded model (its metadata is copied) or use format='safetensors'"
        )
    vocab_size = int(model.config.vocab_size)
    special = set(tok.all_special_ids)
    added = {int(i): t for i, t in tok.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i < len(tok):
            tokens.append(tok.convert_ids_to_tokens(i))
            if i in special or (i in added and added[i].special):
                types.append(gguf.TokenType.CONTROL)
            elif i in added:
                types.append(gguf.TokenType.USER_DEFINED)
            else:
                types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_name(tok))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("pad_token_id", writer.add_pad_token_id), ("unk_token_id", writer.add_unk_token_id)):  # fmt: skip
        value = getattr(tok, attr, None)
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(bool(getattr(tok, "add_bos_token", False)))
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def _source_gguf(model: Model) -> Path | None:
    from steerlab.embedded import EMBEDDED, gguf_path

    if model.name in EMBEDDED:
        return gguf_path(model.name)
    if model.name.endswith(".gguf"):
        candidate = Path(str(getattr(model.config, "_name_or_path", ""))) / model.name
        if candidate.is_file():
            return candidate
    return None


def _check_tokenizer(model: Model, path: Path) -> None:
    """Re-read the written tokenizer with transformers and compare encodings of rendered chat prompts."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    texts = ["Write a short poem about the sea.", "Hi there! 123 ünïcödé"]
    try:
        texts += [model.chat().render(t).text for t in texts]  # special tokens must stay whole
    except ChatTemplateError:
        pass  # no chat template: plain text only
    for text in texts:
        want = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        got = loaded(text, add_special_tokens=False)["input_ids"]
        if want != got:
            raise NotExportableError(
                f"the GGUF tokenizer built from the HF tokenizer encodes {text[:40]!r} differently; export from a "
                "GGUF-loaded model (its tokenizer metadata is copied) or use format='safetensors'"
            )


def _check_loadable(model: Model, path: Path) -> None:
    """Build the model transformers would make from the file (on the meta device) and compare parameter names."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    want = {k for k in model.hf.state_dict() if not (is_tied(model.hf) and k.startswith(model.spec.unembed + "."))}
    have = {
        k for k in skeleton.state_dict() if not (config.tie_word_embeddings and k.startswith(model.spec.unembed + "."))
    }
    if want != have:
        raise _refuse(model, f"the loader would build {sorted(have ^ want)[:4]} differently")


def write_gguf(model: Model, path: Path, *, precision: str = "f32", source_gguf: str | Path | None = None) -> Path:
    """Write ``model`` to the GGUF file ``path`` and check that transformers would rebuild the same model from it.

    Example:
        >>> import tempfile
        >>> from steerlab.testing import tiny_model
        >>> path = write_gguf(tiny_model("qwen2"), Path(tempfile.mkdtemp()) / "model.gguf")
        >>> path.is_file()
        True
    """
    import gguf

    if precision not in ("f32", "f16"):
        raise NotExportableError(f"precision must be 'f32' or 'f16', got {precision!r}")
    spec = check_writable(model)
    config = model.config
    source = Path(source_gguf) if source_gguf is not None else _source_gguf(model)
    writer = gguf.GGUFWriter(str(path), spec.arch)
    writer.add_name(Path(model.name).stem.replace(".", "-") or "model")
    writer.add_description("exported by steerlab (see steerlab_manifest.json)")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if precision == "f16" else gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(model.d_model)
    writer.add_block_count(model.n_layers)
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(model.n_heads)
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or model.n_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_rope_dimension_count(model.head_dim)
    if model.head_dim * model.n_heads != model.d_model:  # permute_qk families only (check_writable)
        writer.add_key_length(model.head_dim)
        writer.add_value_length(model.head_dim)
    if source is not None:
        template = model.tokenizer.chat_template
        _copy_tokenizer_fields(writer, source, skip=frozenset({"tokenizer.chat_template"} if template else ()))
        if template:
            writer.add_chat_template(model.tokenizer.chat_template)
    else:
        _build_tokenizer_fields(writer, model)
    for name, array in _tensors(model, spec, precision):
        writer.add_tensor(name, array)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    try:
        _check_loadable(model, path)
        if source is None:
            _check_tokenizer(model, path)
    except Exception:
        path.unlink(missing_ok=True)
        raise
    return path


def gguf_summary(path: str | Path) -> dict[str, Any]:
    """Architecture, tensor count and tensor types of a GGUF file (via ``gguf.GGUFReader``).

    Example:
        >>> import tempfile
        >>> from steerlab.testing import tiny_model
        >>> path = write_gguf(tiny_model("llama"), Path(tempfile.mkdtemp()) / "model.gguf")
        >>> gguf_summary(path)["architecture"]
        'llama'
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {
        "architecture": reader.fields["general.architecture"].contents(),
        "n_tensors": len(reader.tensors),
        "types": sorted({t.tensor_type.name for t in reader.tensors}),
    }
