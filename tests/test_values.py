"""Values that cannot be silently wrong (issue 15, item 3): finite numbers, readable files, non-zero vectors,
integer layers, known token selections, and the provenance of directions."""

import json
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import steerlab
from steerlab.errors import (
    InvalidValueError,
    LayerIndexError,
    NonFiniteError,
    ProvenanceError,
    ProvenanceWarning,
    ShapeError,
    SteerlabError,
    SteerlabWarning,
    UnknownPositionError,
    ValueFileError,
    ZeroVectorError,
)
from steerlab.interventions.redirect import LinearRedirect, MultiKeyRedirect, RankOneRedirect
from steerlab.probes import LatentGuard, LinearProbe, Probe, ProbeGuard
from steerlab.steering import Ablate, AddVector, Clamp, Direction, mean_difference, pca_direction, probe_direction
from steerlab.testing import tiny_model

PROMPTS = ["Write a short poem about the sea.", "Hi there", "Tell me a joke about cats.", "Explain how vaccines work."]
OTHER = ["What is the capital of France?", "How do I bake bread at home?", "Give me three tips for studying.", "Hi!"]
BAD = [float("nan"), float("inf"), -float("inf")]


def _named(model_type="llama", name="tiny-llama"):
    model = tiny_model(model_type)
    model.name = name
    return model


def _vectors(n=2, d=64, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _with(t, index, value):
    t = t.clone()
    t.view(-1)[index] = value
    return t


# ----- NaN and infinity ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", BAD)
def test_non_finite_numbers_are_rejected_at_construction(bad):
    d = Direction(_vectors(), layers=(0, 1))
    probe = Probe(weights=_vectors(1, 8), bias=torch.zeros(1), layers=(1,))
    means = {"mean_harmful": _vectors(2, 8), "mean_harmless": _vectors(2, 8, seed=1), "layers": (0, 1)}
    with pytest.raises(NonFiniteError, match="non-finite"):
        Direction(_with(_vectors(), 5, bad), layers=(0, 1))
    with pytest.raises(NonFiniteError, match="coeff"):
        AddVector(d, coeff=bad)
    with pytest.raises(NonFiniteError, match="value"):
        Clamp(d, value=bad, layers=[1])
    with pytest.raises(NonFiniteError, match="threshold"):
        LatentGuard(**means, threshold=bad)
    with pytest.raises(NonFiniteError, match="harmful class mean"):
        LatentGuard(**{**means, "mean_harmful": _with(means["mean_harmful"], 3, bad)})
    with pytest.raises(NonFiniteError, match="threshold"):
        ProbeGuard(probe=probe, threshold=bad)
    with pytest.raises(NonFiniteError, match="weights"):
        Probe(weights=_with(_vectors(1, 8), 2, bad), bias=torch.zeros(1), layers=(1,))
    with pytest.raises(NonFiniteError, match="bias"):
        Probe(weights=_vectors(1, 8), bias=torch.tensor([bad]), layers=(1,))
    with pytest.raises(NonFiniteError, match="activations"):
        mean_difference(_with(torch.randn(3, 1, 8), 0, bad), torch.randn(3, 1, 8), layers=[1])


def _rewrite(path: Path, *, tensors=None, meta=None, drop=()):
    """Rewrite a saved file as an older or hand-made one would be: new tensors / metadata, no checksum."""
    with safe_open(str(path), framework="pt") as fh:
        old_meta = dict(fh.metadata())
        old = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 -- safe_open is not iterable
    new_meta = {k: v for k, v in {**old_meta, **(meta or {})}.items() if k not in drop and k != "sha256"}
    save_file({**old, **(tensors or {})}, str(path), metadata=new_meta)
    return path


def test_non_finite_values_in_files_are_rejected_at_load(tmp_path):
    probe = Probe(weights=_vectors(1, 8), bias=torch.zeros(1), layers=(1,), model="tiny-m")
    cases = [
        (
            Direction(_vectors(), layers=(0, 1)),
            Direction.load,
            {"tensors": {"vectors": _with(_vectors(), 1, float("nan"))}},
        ),
        (probe, Probe.load, {"tensors": {"weights": _with(_vectors(1, 8), 1, float("inf"))}}),
        (
            LatentGuard(mean_harmful=_vectors(2, 8), mean_harmless=_vectors(2, 8, seed=1), layers=(0, 1)),
            LatentGuard.load,
            {"meta": {"threshold": "nan"}},
        ),
        (ProbeGuard(probe=probe), ProbeGuard.load, {"meta": {"info": json.dumps({"guard_threshold": float("nan")})}}),
    ]
    for i, (value, load, change) in enumerate(cases):
        path = _rewrite(value.save(tmp_path / f"v{i}.safetensors"), **change)
        with pytest.raises(ValueFileError, match=re.escape(str(path))) as err:
            load(path)
        assert "non-finite" in str(err.value) or "nan" in str(err.value), str(err.value)
    x = np.random.default_rng(0).normal(size=(40, 4))
    path = LinearProbe().fit(x, x[:, 0] > 0).save(tmp_path / "lp.safetensors")
    _rewrite(path, tensors={"coef": torch.full((1, 4), float("nan"), dtype=torch.float64)})
    with pytest.raises(ValueFileError, match="non-finite"):
        LinearProbe.load(path)


def test_nan_direction_no_longer_reaches_the_model():
    model = tiny_model("llama")
    with pytest.raises(NonFiniteError):
        AddVector(Direction(torch.full((1, model.d_model), float("nan")), layers=(1,)), coeff=1.0)


# ----- damaged and foreign files ---------------------------------------------------------------------------------
def _saved(kind: str, path: Path) -> tuple[Path, object]:
    """A valid file of ``kind`` with the marker string 'tiny-m' in its metadata, and its loader."""
    probe = Probe(weights=_vectors(1, 8), bias=torch.zeros(1), layers=(1,), model="tiny-m")
    if kind == "Direction":
        return Direction(_vectors(), layers=(0, 1), model="tiny-m").save(path), Direction.load
    if kind == "Probe":
        return probe.save(path), Probe.load
    if kind == "ProbeGuard":
        return ProbeGuard(probe=probe, threshold=0.4).save(path), ProbeGuard.load
    if kind == "LatentGuard":
        guard = LatentGuard(
            mean_harmful=_vectors(2, 8), mean_harmless=_vectors(2, 8, seed=1), layers=(0, 1), model_name="tiny-m"
        )
        return guard.save(path), LatentGuard.load
    x = np.random.default_rng(0).normal(size=(40, 4))
    labels = np.where(x[:, 0] > 0, "tiny-m", "other")
    return LinearProbe().fit(x, labels).save(path), LinearProbe.load


def _flip_data(path):
    raw = bytearray(path.read_bytes())
    raw[-2] ^= 0x5A  # inside the last tensor's bytes
    path.write_bytes(bytes(raw))


def _flip_header(path):
    raw = path.read_bytes()
    assert raw.count(b"tiny-m") >= 1
    path.write_bytes(raw.replace(b"tiny-m", b"tiny-n", 1))  # still valid JSON: only the checksum can tell


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


def _not_safetensors(path):
    path.write_bytes(b"this is a text file, not safetensors\n" * 4)


def _foreign_safetensors(path):
    save_file({"model.embed_tokens.weight": torch.ones(4, 4)}, str(path))


def _directory(path):
    path.unlink()
    path.mkdir()


def _missing(path):
    path.unlink()


def _missing_key(path):
    with safe_open(str(path), framework="pt") as fh:
        fmt = fh.metadata()["format"]
    key = {"steerlab.LinearProbe/1": "params", "steerlab.LatentGuard/1": "threshold"}.get(fmt, "layers")
    _rewrite(path, drop=(key,))


CORRUPTIONS = {
    "flipped data byte": (_flip_data, "checksum"),
    "flipped header byte": (_flip_header, "checksum"),
    "truncated": (_truncate, "not a readable"),
    "not safetensors": (_not_safetensors, "not a readable"),
    "foreign safetensors": (_foreign_safetensors, "not a steerlab"),
    "directory": (_directory, "is a directory"),
    "missing": (_missing, "does not exist"),
    "missing metadata key": (_missing_key, "lacks"),
}


@pytest.mark.parametrize("kind", ["Direction", "Probe", "ProbeGuard", "LatentGuard", "LinearProbe"])
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_damaged_files_raise_a_steerlab_error_naming_the_file(tmp_path, kind, corruption):
    damage, says = CORRUPTIONS[corruption]
    path, load = _saved(kind, tmp_path / "value.safetensors")
    load(path)  # intact: loads
    damage(path)
    with pytest.raises(ValueFileError) as err:
        load(path)
    message = str(err.value)
    assert str(path) in message and says in message, message
    assert isinstance(err.value, SteerlabError)


def test_a_file_of_another_steerlab_kind_says_how_to_load_it(tmp_path):
    path = Probe(weights=_vectors(1, 8), bias=torch.zeros(1), layers=(1,)).save(tmp_path / "probe.safetensors")
    with pytest.raises(ValueFileError, match=r"is a steerlab Probe file, not a Direction; load it with .*Probe\.load"):
        Direction.load(path)


def test_files_from_before_the_checksum_and_provenance_still_load_and_apply_quietly(tmp_path):
    path = tmp_path / "old.safetensors"
    meta = {"layers": "[1]", "site": "resid_pre", "position": '"last"', "method": "mean_diff", "model": "",
            "data_hash": "", "info": "{}", "format": "steerlab.Direction/1"}  # fmt: skip
    save_file({"vectors": _vectors(1, 64)}, str(path), metadata=meta)
    d = Direction.load(path)
    assert d.model == "" and d.model_n_layers is None and d.layers == (1,)
    model = _named()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with model.apply(AddVector(d, coeff=1.0)):
            model.generate(PROMPTS[:1], max_new_tokens=2)


# ----- zero vectors ----------------------------------------------------------------------------------------------
def test_zero_vectors_are_errors_that_name_the_fix():
    zero = Direction(torch.zeros(1, 64), layers=(1,))
    with pytest.raises(
        ZeroVectorError, match=r"layer\(s\) \[1\] is zero, so adding it would do nothing.*leave those layers out"
    ):
        AddVector(zero, coeff=3.0)
    for make in (lambda: Ablate(zero), lambda: Clamp(zero, value=1.0, layers=[1])):
        with pytest.raises(ShapeError, match=r"is zero.*leave those layers out .*refit the direction"):
            make()


def test_zero_vectors_found_only_at_apply_time_and_unused_zero_rows_are_fine():
    model = tiny_model("llama")
    vectors = _vectors(3, 64)
    vectors[2] = 0.0
    d = Direction(vectors, layers=(0, 1, 2))
    op = AddVector(d, coeff=1.0, layers=[-1])  # -1 is layer 2 only once the model is known
    with pytest.raises(ZeroVectorError, match=r"\[2\] is zero"), model.apply(op):
        pass
    with model.apply(Ablate(d, source_layer=1)), model.apply(Clamp(d, value=0.5, layers=[1])):
        model.generate(PROMPTS[:1], max_new_tokens=2)  # the zero row of layer 2 is never used
    with model.apply(AddVector(d, coeff=1.0, layers=[0, 1], unit=True)):
        model.generate(PROMPTS[:1], max_new_tokens=2)


# ----- layers ----------------------------------------------------------------------------------------------------
def test_duplicate_and_non_integer_layers_are_rejected():
    with pytest.raises(LayerIndexError, match=r"\[3\] more than once"):
        Direction(_vectors(), layers=(3, 3))
    with pytest.raises(LayerIndexError, match="more than once"):
        Probe(weights=_vectors(2, 8), bias=torch.zeros(2), layers=(1, 1))
    d = Direction(_vectors(1, 64), layers=(1,))
    for bad in (1.0, True, np.float64(1.0), torch.tensor(1.0), "1"):
        with pytest.raises(LayerIndexError, match="integer layer index"):
            Direction(_vectors(1, 64), layers=(bad,))
        with pytest.raises(LayerIndexError, match="integer layer index"):
            AddVector(d, layers=[bad])
        with pytest.raises(LayerIndexError, match="integer layer index"):
            AddVector(d, source_layer=bad)
    for op in (
        lambda: AddVector(d, layers="1"),
        lambda: Clamp(d, value=1.0, layers="1"),
        lambda: RankOneRedirect(d, d, layers="12"),
    ):
        with pytest.raises(LayerIndexError, match="not the string"):
            op()


def test_numpy_and_torch_integer_layers_work_everywhere():
    model = tiny_model("llama")
    d = Direction(_vectors(2, 64), layers=(np.int64(0), torch.tensor(1)))
    assert d.layers == (0, 1) and all(type(la) is int for la in d.layers)
    assert torch.equal(d.select(np.int64(1)).vectors, d.at(1)[None]) and torch.equal(
        d.at(torch.tensor(0)), d.vectors[0]
    )
    plain = AddVector(d, coeff=4.0, layers=[1], source_layer=0)
    odd = AddVector(d, coeff=4.0, layers=[np.int32(1)], source_layer=torch.tensor(0))
    assert odd == plain
    with model.apply(plain):
        expected = model.generate(PROMPTS, max_new_tokens=3)
    with model.apply(odd):
        assert model.generate(PROMPTS, max_new_tokens=3) == expected
    with model.apply(Clamp(d, value=1.0, layers=np.array([1]))), model.apply(Ablate(d, source_layer=np.int64(1))):
        model.generate(PROMPTS[:1], max_new_tokens=2)
    assert type(RankOneRedirect(d, d.select(1), layers=[np.int64(1)]).layers[0]) is int
    assert type(LinearRedirect(np.int64(1), torch.ones(8), torch.arange(8.0)).layer) is int
    assert type(MultiKeyRedirect(torch.tensor(1), torch.ones(2, 8), torch.ones(2, 8)).layer) is int
    probe = Probe(weights=_vectors(2, 8), bias=torch.zeros(2), layers=(np.int64(3), 5))
    assert probe.select(torch.tensor(5)).layers == (5,)


# ----- token selections ------------------------------------------------------------------------------------------
OPS = {
    "AddVector": lambda d, p: AddVector(d, tokens=p),
    "Ablate": lambda d, p: Ablate(d, tokens=p),
    "Clamp": lambda d, p: Clamp(d, value=1.0, layers=[1], tokens=p),
    "RankOneRedirect": lambda d, p: RankOneRedirect(d, Direction(_vectors(1, 64, seed=5), layers=(1,)), tokens=p),
    "LinearRedirect": lambda d, p: LinearRedirect(1, torch.ones(8), torch.arange(8.0), tokens=p),
    "MultiKeyRedirect": lambda d, p: MultiKeyRedirect(1, torch.ones(2, 8), torch.ones(2, 8), tokens=p),
}


@pytest.mark.parametrize("op", list(OPS))
def test_unknown_token_selections_are_rejected_with_the_valid_ones(op):
    d = Direction(_vectors(1, 64), layers=(1,))
    for good in ("all", "prompt", "generated"):
        OPS[op](d, good)
    for bad in ("generatd", "last", "All", None, 0):
        with pytest.raises(UnknownPositionError, match="'all', 'prompt', 'generated'"):
            OPS[op](d, bad)


# ----- provenance ------------------------------------------------------------------------------------------------
def test_directions_applied_to_another_model_or_site_warn_and_fail_when_strict():
    model = _named()
    assert issubclass(ProvenanceWarning, SteerlabWarning) and issubclass(SteerlabWarning, UserWarning)
    v = _vectors(1, 64)
    cases = {
        "name": (Direction(v, layers=(1,), model="other-model"), "'other-model' and is applied to 'tiny-llama'"),
        "depth": (Direction(v, layers=(1,), model="tiny-llama", info={"n_layers": 24}), "24 layers and this one has 3"),
        "site": (
            Direction(v, layers=(1,), site="resid_post", model="tiny-llama"),
            "'resid_post' and AddVector acts on resid_pre",
        ),
    }
    for d, says in cases.values():
        with pytest.warns(ProvenanceWarning, match=re.escape(says)), model.apply(AddVector(d, coeff=1.0)):
            model.generate(PROMPTS[:1], max_new_tokens=1)
        with pytest.raises(ProvenanceError, match=re.escape(says)), model.apply(AddVector(d, coeff=1.0, strict=True)):
            pass
    post = cases["site"][0]
    with (
        pytest.raises(ProvenanceError, match="Clamp acts on resid_pre"),
        model.apply(Clamp(post, value=1.0, layers=[1], strict=True)),
    ):
        pass
    with (
        pytest.raises(ProvenanceError, match="Ablate acts on resid_pre"),
        model.apply(Ablate(post, per_layer=True, strict=True)),
    ):
        pass
    with (
        pytest.raises(ProvenanceError, match="fitted on 'other-model'"),
        model.apply(RankOneRedirect(cases["name"][0], _vectors(1, 64, seed=9)[0], layers=[1], strict=True)),
    ):
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with model.apply(Ablate(post, strict=True)):  # one vector projected out everywhere: any residual site is fine
            model.generate(PROMPTS[:1], max_new_tokens=1)
        same = Direction(v, layers=(1,), model=model)  # a Model: its name and depth are recorded
        assert same.model == "tiny-llama" and same.model_n_layers == 3
        with model.apply(AddVector(same, coeff=1.0, strict=True)):
            model.generate(PROMPTS[:1], max_new_tokens=1)
    with (
        pytest.raises(ShapeError, match="d_model=64"),
        model.apply(AddVector(Direction(_vectors(1, 32), layers=(1,), model="tiny-llama"))),
    ):  # another width stays an error
        pass


def test_provenance_survives_save_and_load(tmp_path):
    model = _named()
    d = mean_difference(
        torch.randn(4, 1, 64), torch.randn(4, 1, 64), layers=[2], site="resid_post", position=-2, model=model
    )
    back = Direction.load(d.save(tmp_path / "d.safetensors"))
    assert (back.model, back.model_n_layers, back.width, back.site, back.position) == (
        "tiny-llama",
        3,
        64,
        "resid_post",
        -2,
    )


# ----- fitters record where the direction comes from -------------------------------------------------------------
def test_fitters_take_the_model_and_the_collected_activations():
    model = _named("qwen2", "tiny-qwen2")
    kw = {"layers": [1], "positions": [-2], "progress": False}
    pos, neg = steerlab.collect(model, PROMPTS, **kw), steerlab.collect(model, OTHER, **kw)
    for fit in (mean_difference, pca_direction, probe_direction):
        d = fit(pos, neg, model=model)
        assert (d.model, d.model_n_layers, d.layers, d.site, d.position) == ("tiny-qwen2", 3, (1,), "resid_pre", -2), (
            fit
        )
        x = fit(
            pos.get("resid_pre", -2)[:, :, 0], neg.get("resid_pre", -2)[:, :, 0], layers=[1], position=-2, model=model
        )
        torch.testing.assert_close(x.vectors, d.vectors)
        assert (x.model, x.model_n_layers, x.position) == ("tiny-qwen2", 3, -2)
    assert mean_difference(torch.ones(2, 1, 4), torch.zeros(2, 1, 4), layers=[0], model="name").model == "name"
    both = steerlab.collect(model, PROMPTS, layers=[1], positions=["last", "post_inst"], progress=False)
    with pytest.raises(SteerlabError, match="position="):
        mean_difference(both, both, model=model)
    with pytest.raises(ShapeError, match="single-token position"):
        mean_difference(both, both, position="post_inst", model=model)
    with pytest.raises(ShapeError, match="d_model=64"):
        mean_difference(torch.ones(2, 1, 8), torch.zeros(2, 1, 8), layers=[0], model=model)


def _quick_start() -> list[str]:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    block = section.split("```python", 1)[1].split("```", 1)[0]
    lines = block.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("kw = "))
    end = next(i for i, line in enumerate(lines) if i > start and line.startswith("with "))
    code = lines[start:end]  # from the collection settings to the fitted direction r, before it is applied
    assert any(line.startswith("r = mean_difference(") for line in code) and "positions=[-2]" in code[0]
    return code


def test_readme_quick_start_records_the_model_and_the_fitted_position():
    """The quick start's fitting lines, run as written on a tiny model (layer 17 -> 1: it has 3 layers)."""
    model = _named("qwen2", "tiny-qwen2")
    split = SimpleNamespace(harmful_train=PROMPTS * 12, harmless_train=OTHER * 12)
    code = "\n".join(_quick_start()).replace("[17]", "[1]")
    scope = {"steerlab": steerlab, "model": model, "split": split, "mean_difference": mean_difference}
    exec(code, scope)  # noqa: S102 -- the README's own lines, on purpose
    r = scope["r"]
    assert r.model == "tiny-qwen2" and r.position == -2, (r.model, r.position)
    assert (r.layers, r.site, r.model_n_layers) == ((1,), "resid_pre", 3)


def test_pipeline_directions_record_the_models_depth():
    from steerlab.steering.harmfulness import class_directions

    model = tiny_model("qwen2")
    d = class_directions(model, ["Write a short poem about the sea.", "Hi there"], ["Tell me a joke about cats.", "Hi"],
                         layers=[1], positions=("last",))["last"]  # fmt: skip
    assert d.model == model.name and d.info["n_layers"] == model.n_layers


def test_strict_must_be_a_bool():
    model = tiny_model("llama")
    d = Direction(vectors=torch.ones(1, model.d_model), layers=(1,))
    with pytest.raises(InvalidValueError, match="strict must be True or False"), model.apply(AddVector(d, strict="no")):
        pass
