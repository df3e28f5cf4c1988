"""collect(share_prefix=True) computes the shared chat-template prefix once: same activations as the
plain path on every family, and the prefix length respects every requested position."""

from __future__ import annotations

import pytest
import torch

import steerlab
from steerlab import compat
from steerlab.prefix_cache import MIN_SHARED, new_cache, shared_prefix_length, take_prefix
from steerlab.steering import AddVector, Direction
from steerlab.testing import FAMILIES, tiny_model

PROMPTS = ["Write a short poem about the sea.", "Hi!", "Explain how vaccines work.", "Tell me a joke about cats."]


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prefix_gives_the_same_activations(family):
    model = tiny_model(family)
    kw = {"sites": ["resid_pre", "resid_post", "attn_out", "mlp_out"], "positions": ["last", "t_inst", "post_inst", -2, "inst_mean", "inst_to_last_mean"]}
    widths = []
    embed = model.hf.get_input_embeddings()
    handle = embed.register_forward_hook(lambda mod, args, out: widths.append(int(args[0].shape[1])))
    try:
        shared = steerlab.collect(model, PROMPTS, batch_size=3, progress=False, **kw)
        plain = steerlab.collect(model, PROMPTS, batch_size=3, progress=False, share_prefix=False, **kw)
    finally:
        handle.remove()
    if new_cache(model) is not None:  # full-attention caches: the second batch skips the shared prefix
        assert widths[1] <= widths[3] - MIN_SHARED, widths
    for site in kw["sites"]:
        for p in kw["positions"]:
            torch.testing.assert_close(shared.get(site, p), plain.get(site, p), atol=1e-4, rtol=1e-4)


def test_prefix_is_used_where_it_can_be():
    model = tiny_model("llama")
    fmt = model.chat()
    rows = fmt.tokenize(PROMPTS)
    batches = [b for _, b in fmt.batches(rows, 3)]
    n = shared_prefix_length(rows, batches, ["last"])
    assert n >= MIN_SHARED and all(r[0][:n] == rows[0][0][:n] for r in rows)
    assert shared_prefix_length(rows, batches, ["all"]) == 0
    # a position inside the shared part caps it
    assert shared_prefix_length(rows, batches, ["last", -int(min(len(r[0]) for r in rows))]) == 0
    assert shared_prefix_length(rows, batches[:1], ["last"]) == 0  # one batch: nothing to reuse
    assert new_cache(tiny_model("gemma2")) is None  # sliding-window layers keep the plain path
    cache = new_cache(model)
    first = batches[0]
    with torch.inference_mode():
        model.hf(**compat.with_cache(model.hf, cache, **first.model_inputs()))
    kv = take_prefix(cache, first, n)
    assert len(kv) == model.n_layers and kv[0][0].shape[:3] == (1, model.config.num_key_value_heads, n)


def test_no_sharing_inside_other_hooks():
    model = tiny_model("qwen2")
    d = Direction(vectors=torch.randn(1, model.d_model), layers=(1,))
    with model.apply(AddVector(d, coeff=3.0)):
        steered = steerlab.collect(model, PROMPTS, positions=["last"], progress=False)
        plain = steerlab.collect(model, PROMPTS, positions=["last"], progress=False, share_prefix=False)
    assert torch.equal(steered.get("resid_pre", "last"), plain.get("resid_pre", "last"))
