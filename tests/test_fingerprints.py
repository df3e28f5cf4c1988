"""Training records: guards and probes know the prompts they were fitted on, and say so when measured on them."""

import warnings
from dataclasses import replace

import pytest
import torch

from steerlab.data import DEMO_HARMFUL, DEMO_HARMLESS
from steerlab.data.fingerprints import Fingerprints, fingerprint, split_unseen, training_record
from steerlab.errors import InSampleWarning, ShapeError, ValueFileError
from steerlab.probes import LatentGuard, ProbeGuard
from steerlab.testing import tiny_model


def test_fingerprints_ignore_case_spacing_and_compatibility_forms_only():
    assert fingerprint("Ｈow  do I\tkill a process?") == fingerprint("how do i kill a process?")
    assert fingerprint("How do I kill a process?") != fingerprint("How do I kill a person?")
    record = Fingerprints.of(["a b", "A  B", "c"])
    assert len(record) == 2 and record == Fingerprints.of(["c", "a b"])
    assert split_unseen(record, ["d", "C", "e"]) == (["d", "e"], 1)
    with pytest.raises(ShapeError):
        Fingerprints(torch.zeros(3))


def test_distinct_prompts_of_the_packaged_sets_get_distinct_fingerprints():
    from steerlab.data.guard_sets import guard_sets

    prompts = {" ".join(p.casefold().split()) for s in guard_sets() for p in s.prompts}
    assert len(Fingerprints.of(sorted(prompts))) == len(prompts) > 1000


@pytest.mark.parametrize("kind", [ProbeGuard, LatentGuard])
def test_a_fitted_guard_records_fit_and_calibration_prompts_and_keeps_them_on_disk(kind, tmp_path):
    model = tiny_model("llama")
    fit_h, fit_s, val_h, val_s = DEMO_HARMFUL[:6], DEMO_HARMLESS[:6], DEMO_HARMFUL[6:9], DEMO_HARMLESS[6:9]
    guard = kind.fit(model, fit_h, fit_s, **({"layer": 1} if kind is ProbeGuard else {"layers": [1]}))
    assert guard.trained_on == Fingerprints.of(fit_h, fit_s)
    guard = guard.calibrate(val_h, val_s)
    assert guard.trained_on == Fingerprints.of(fit_h, fit_s, val_h, val_s) == training_record(guard)
    path = guard.save(tmp_path / "guard.safetensors")
    loaded = kind.load(path, model=model)
    assert loaded.trained_on == guard.trained_on
    # the record is part of the checksum: a changed record is a damaged file
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(path))
    tensors["trained_on"] = tensors["trained_on"][1:].clone()
    save_file(tensors, str(path), meta)
    with pytest.raises(ValueFileError, match="checksum"):
        kind.load(path)
    # files saved before records load without one, and nothing can be checked against them
    bare = replace(loaded.probe, trained_on=None) if kind is ProbeGuard else replace(loaded, trained_on=None)
    bare.save(tmp_path / "old.safetensors")
    old = kind.load(tmp_path / "old.safetensors", model=model, **({"threshold": 0.5} if kind is ProbeGuard else {}))
    assert old.trained_on is None and training_record(old) is None
    assert old.calibrate(val_h, val_s).trained_on is None  # a partial record would call the fit prompts new


def test_evaluate_and_tuning_warn_exactly_on_in_sample_prompts():
    from steerlab import Ablate, AddVector
    from steerlab.measure.gate_rows import measure_tuning_rows
    from steerlab.testing import tiny_direction

    model = tiny_model("llama")
    guard = LatentGuard.fit(model, DEMO_HARMFUL[:6], DEMO_HARMLESS[:6], layers=[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", InSampleWarning)
        guard.evaluate(DEMO_HARMFUL[6:], DEMO_HARMLESS[6:])  # new prompts: no warning
    with pytest.warns(InSampleWarning, match=r"1 of the 7 harmful prompts\)"):
        guard.evaluate(DEMO_HARMFUL[5:], DEMO_HARMLESS[6:])
    d = tiny_direction(model, layer=1)
    sets = {"safe": DEMO_HARMLESS[4:8], "harmful": DEMO_HARMFUL[8:], "ordinary": DEMO_HARMLESS[8:]}
    with pytest.warns(InSampleWarning, match=r"tuning the guard on prompts it was fitted on \(2 of the 4 safe prompts\)"):
        measure_tuning_rows(model, guard, sets, refuse=AddVector(d, coeff=4.0), comply={"ablate": Ablate(d)}, max_new_tokens=1)


def test_fit_guard_records_every_prompt_of_its_training_pool():
    from steerlab.data.guard_sets import guard_training_data
    from steerlab.probes.fitting import fit_guard

    guard = fit_guard(tiny_model("llama"), mode="latent", position="t_inst", layers=[1], n_train=5, seed=0, batch_size=16, calibrate=True)
    data = guard_training_data(per_set=5, seed=0)
    assert guard.trained_on == Fingerprints.of(data.harmful, data.harmless)
