"""What ``steerlab steer --calibrated`` and ``steerlab calibrate`` share: opening the gate's guard and its branches."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from steerlab.cli import inputs
from steerlab.cli.args import UsageError


def open_guard(spec: str, *, tau: float | None, model: Any, dtype: str) -> Any:
    """A saved ProbeGuard / LatentGuard file, or the directory of a refusal-token model (threshold: ``tau`` or the
    saved one); usage errors as :func:`check_guard_spec`."""
    import torch

    from steerlab.interventions.token_guard import SETTINGS_FILE, RefusalTokenGuard
    from steerlab.probes import LatentGuard, ProbeGuard
    from steerlab.probes.fitting import saved_guard_kind

    check_guard_spec(spec, tau)
    root = Path(spec).expanduser()
    if root.is_dir():
        if (root / SETTINGS_FILE).is_file():
            return RefusalTokenGuard.load(root, dtype=getattr(torch, dtype), threshold=tau)
        return RefusalTokenGuard.from_model(inputs.open_model(spec, dtype), threshold=tau)
    path = inputs.existing_file(spec, "guard")
    kind = ProbeGuard if saved_guard_kind(path) == "probe" else LatentGuard
    return inputs.read_saved(path, f"steerlab {kind.__name__}", lambda f: kind.load(f, model=model))


def guard_record(spec: str, tau: float | None) -> Any:
    """The prompts a saved guard records it was fitted on (``Fingerprints``), read without loading a model; ``None``
    for a guard saved without a record. Usage errors as :func:`check_guard_spec`."""
    from steerlab.data.fingerprints import training_record
    from steerlab.interventions.token_guard import SETTINGS_FILE, RefusalTokenGuard

    check_guard_spec(spec, tau)
    root = Path(spec).expanduser()
    if root.is_dir():
        return RefusalTokenGuard.saved_record(root) if (root / SETTINGS_FILE).is_file() else None
    return training_record(open_guard(spec, tau=tau, model=None, dtype="float32"))


def check_guard_spec(spec: str, tau: float | None) -> None:
    """The usage errors :func:`open_guard` would raise, before a model is loaded."""
    from steerlab.interventions.token_guard import SETTINGS_FILE

    root = Path(spec).expanduser()
    if root.is_dir():
        if not (root / SETTINGS_FILE).is_file() and tau is None:
            raise UsageError(f"{spec} is a model directory without {SETTINGS_FILE} (steerlab refusal-tokens writes one); give the "
                             "refusal-token threshold with --tau")  # fmt: skip
        return
    if tau is not None:
        raise UsageError("--tau is the threshold of a refusal-token guard (a model directory); a saved guard file carries its own")
    inputs.existing_file(spec, "guard")


def branches(args: argparse.Namespace, direction, strengths: list[float]) -> tuple[Any, dict[str, Any], int]:
    """(refuse, {name: comply}, source layer): the direction added x``--refuse-coeff`` at its layer, and ablated at
    each strength (the vector of ``--layer`` or the direction's first layer, every layer)."""
    from steerlab.steering import Ablate, AddVector

    source = args.layer if args.layer is not None else direction.layers[0]
    refuse = AddVector(direction, coeff=args.refuse_coeff, layers=[source], source_layer=source)
    comply = {f"ablate{s:g}": Ablate(direction, source_layer=source, strength=s) for s in strengths}
    return refuse, comply, source
