"""The refusal-direction run (what ``steerlab refusal`` runs): fit and select the direction on the project split,
evaluate it on held-out prompts, write the reports, and optionally bake its ablation into exported weights.

* :func:`run_refusal` — the whole run into one folder: ``refusal_direction.safetensors``, ``report.json``,
  ``report.html``, ``selection.html``, ``plotly.min.js`` (and the export directory): a :class:`RefusalRun`.

A failed export does not lose the run: the reports are written with the export's error in them, and the error
comes back in :attr:`RefusalRun.export_error` for the caller to report.

Example (a random tiny model never refuses, so the refusal check and the filters are off):
    >>> import tempfile
    >>> from steerlab.testing import tiny_model
    >>> settings = dict(eval_dtype="float32", filter_train="none", kl_max=float("inf"), induce_min=float("-inf"),
    ...                 coeff=1.0, min_refusal_rate=0.0, max_new_tokens=4, batch_size=16, seed=0, argv=["steerlab"],
    ...                 export_to=None, export_format="safetensors", tol=1e-2, manifest={}, progress=False)
    >>> run = run_refusal(load=lambda dtype: tiny_model("llama"), out=Path(tempfile.mkdtemp()) / "refusal",
    ...                   held_out=["Make a weapon.", "Pick a lock."], n_eval=2, **settings)
    >>> run.selection.chosen.layer < run.selection.layer_cutoff, run.evaluation.n_harmful
    (True, 2)
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from steerlab.errors import InvalidValueError, SteerlabError

if TYPE_CHECKING:
    from steerlab.model import Model
    from steerlab.report import RunInfo
    from steerlab.steering.direction import Direction
    from steerlab.steering.evaluate import RefusalEvaluation
    from steerlab.steering.refusal import SelectionReport, TrainFilter
    from steerlab.training.deploy import ExportInfo
    from steerlab.training.export import ExportFormat

Dtype = Literal["float32", "bfloat16"]
DIRECTION_FILE = "refusal_direction.safetensors"


@dataclass(frozen=True)
class RefusalRun:
    """A finished run: the direction, its selection report, the held-out evaluation, the run metadata, and the
    export (``export``: what was written; ``export_error``: why nothing was; both ``None`` without an export)."""

    direction: Direction
    selection: SelectionReport
    evaluation: RefusalEvaluation
    info: RunInfo
    export: ExportInfo | None
    export_error: SteerlabError | None


def run_refusal(
    *,
    load: Callable[[Dtype], Model],
    out: Path,
    held_out: Sequence[str],
    n_eval: int,
    eval_dtype: Dtype,
    filter_train: TrainFilter,
    kl_max: float,
    induce_min: float,
    coeff: float,
    min_refusal_rate: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    argv: Sequence[str],
    export_to: Path | None,
    export_format: ExportFormat,
    tol: float,
    manifest: Mapping[str, Any],
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    export_log: Callable[[str], None] | None = None,
) -> RefusalRun:
    """Fit, select, evaluate and report the refusal direction (METHODS 1) into ``out``.

    ``load(dtype)`` returns the model in ``"bfloat16"`` or ``"float32"``: selection and generation run in
    ``eval_dtype``, the candidates are fitted in float32 (a second copy, loaded only after the check that the model
    refuses, unless ``eval_dtype`` is float32). The selection options (``filter_train``, ``kl_max``, ``induce_min``,
    ``coeff``, ``min_refusal_rate``) go to :func:`steerlab.steering.refusal_direction`; the evaluation greedily
    generates ``max_new_tokens`` on ``n_eval`` of ``held_out`` (shuffled with ``seed``) and the harmless test prompts.
    ``argv`` is recorded as the command in the reports.

    With ``export_to``, a float32 copy with the direction's ablation baked in is exported there (``export_format``,
    parity tolerance ``tol``, ``manifest`` fields plus the direction file); a steerlab error of the export is kept
    in the result and the reports instead of raised. ``log`` receives the run's milestones, ``export_log`` the
    export's progress lines. Nothing is written until a direction has been selected.
    """
    from steerlab.data import load_split
    from steerlab.report import RunInfo, write_refusal_report, write_selection_report
    from steerlab.steering.evaluate import evaluate_refusal_direction
    from steerlab.steering.refusal import refusal_direction

    if not 1 <= n_eval <= len(held_out):
        raise InvalidValueError(f"n_eval must be between 1 and the {len(held_out)} held-out prompts; got {n_eval}")
    say = log or (lambda message: None)
    split = load_split(seed=seed)
    run_model = load(eval_dtype)
    say(f"loaded {run_model.name}: select and generate in {eval_dtype}, fit in float32")
    # the float32 copy is loaded only after the check that the model refuses (a model that does not fails sooner)
    fit_model = run_model if eval_dtype == "float32" else (lambda: load("float32"))
    direction, selection = refusal_direction(
        run_model, split.harmful_train, split.harmless_train, harmful_val=split.harmful_val,
        harmless_val=split.harmless_val, filter_train=filter_train, fit_model=fit_model, kl_max=kl_max,
        induce_min=induce_min, induce_coeff=coeff, min_refusal_rate=min_refusal_rate, batch_size=batch_size,
        progress=progress,
    )  # fmt: skip
    del fit_model
    out.mkdir(parents=True, exist_ok=True)  # the first file to write: a failed selection leaves no folder
    direction.save(out / DIRECTION_FILE)
    say(f"selected position {selection.chosen.position}, layer {selection.chosen.layer}\n{selection.table()}")

    shuffled = list(held_out)
    random.Random(seed).shuffle(shuffled)
    evaluation = evaluate_refusal_direction(
        run_model, direction, harmful=shuffled[:n_eval], harmless=split.harmless_test,
        max_new_tokens=max_new_tokens, batch_size=batch_size, coeff=coeff, progress=progress,
    )  # fmt: skip
    say(f"held-out evaluation (greedy, {max_new_tokens} new tokens):\n{evaluation.as_table()}")
    info = RunInfo.collect(
        model=run_model.name, dtype=f"float32 (fit), {eval_dtype} (selection, evaluation)", seed=seed, argv=argv
    )
    del run_model  # free it before an export loads a float32 copy
    body: dict[str, Any] = {"run": info.to_dict(), "selection": selection.to_dict(), "evaluation": evaluation.to_dict()}
    export_info, export_error = None, None
    if export_to is not None:
        try:
            export_info = _export_ablation(load, direction, out, export_to, export_format=export_format, tol=tol,
                                           manifest=manifest, log=export_log)  # fmt: skip
        except SteerlabError as exc:  # keep the reports; the caller reports the missing export
            body["export"], export_error = {"error": str(exc)}, exc
        else:
            body["export"] = export_info
            say(f"exported the ablated model to {export_info['path']} "
                f"(max |logit diff| vs the hook {export_info['parity']['max_abs_logit_diff']:.3g})")  # fmt: skip
    (out / "report.json").write_text(json.dumps(body, indent=1))
    write_selection_report(out, selection, info=info)
    write_refusal_report(out, selection, evaluation, info=info, export_info=export_info)
    return RefusalRun(direction=direction, selection=selection, evaluation=evaluation, info=info, export=export_info,
                      export_error=export_error)  # fmt: skip


def _export_ablation(
    load: Callable[[Dtype], Model],
    direction: Direction,
    out: Path,
    target: Path,
    *,
    export_format: ExportFormat,
    tol: float,
    manifest: Mapping[str, Any],
    log: Callable[[str], None] | None,
) -> ExportInfo:
    """Bake the direction's ablation into a float32 copy of the model and export it to ``target``."""
    from steerlab.steering import Ablate
    from steerlab.training.deploy import bake_and_export

    model = load("float32")
    if log is not None:
        log(f"loaded {model.name} ({model.spec.model_type}, {model.n_layers} layers, d={model.d_model}, float32)")
    fields = {**manifest, "direction_file": str((out / DIRECTION_FILE).resolve())}
    return bake_and_export(model, Ablate(direction), target, format=export_format, precision="f32", tol=tol,
                           manifest=fields, log=log)  # fmt: skip
