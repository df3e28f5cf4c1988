"""Shared fixtures: a tiny trained tokenizer, chat templates of four families, tiny random models
of every registered architecture, and the embedded real-weight models (loaded once per session)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from steerlab.testing import (  # noqa: E402  (after the environment is set)
    FAMILIES,
    MOE_FAMILIES,
    tiny_model,
)


@pytest.fixture(params=FAMILIES)
def family_model(request):
    return tiny_model(request.param)


@pytest.fixture(params=MOE_FAMILIES)
def moe_model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random llama with the test tokenizer, saved like any HF checkpoint (a path for the CLI)."""
    model = tiny_model("llama")
    path = tmp_path_factory.mktemp("tiny-llama")
    model.hf.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def smollm():
    import steerlab

    return steerlab.load("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def qwen():
    import steerlab

    return steerlab.load("qwen2.5-coder-0.5b-instruct")


@pytest.fixture(scope="session")
def harm_direction(qwen):
    """Mean difference of harmful and harmless training pairs at layer 12, last instruction token (32 pairs)."""
    import steerlab
    from steerlab.data import load_split

    split = load_split(seed=0, n_train=32)
    acts = [steerlab.collect(qwen, p, layers=[12], positions="t_inst", progress=False) for p in (split.harmful_train, split.harmless_train)]
    return steerlab.mean_difference(*acts)
