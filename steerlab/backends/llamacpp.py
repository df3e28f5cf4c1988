"""Render a plan as a llama.cpp control vector (``--control-vector FILE``).

llama.cpp adds tensor ``direction.N`` to the output of decoder block ``N`` (0-based, ``N >= 1``) at every
token of the prompt and of the reply (``llama_adapter_cvec::apply_to``, called as ``build_cvec(cur, il)``
after each block's residual add). The output of block ``N`` is steerlab's ``resid_post`` of layer ``N``
and ``resid_pre`` of layer ``N + 1``, so

* ``Add`` on ``resid_pre`` of layer ``L`` -> ``direction.(L-1)`` (``L >= 2``; ``resid_pre`` of layer 0 and 1
  has no control-vector slot: llama.cpp rejects ``direction.0``),
* ``Add`` on ``resid_post`` of layer ``L`` -> ``direction.L`` (``1 <= L <= n_layers - 1``).

Nothing else fits: a control vector only adds, everywhere. Projections (Ablate, Clamp), per-token
selections (``tokens="generated"``), module edits and MoE routing raise :class:`NotExportableError`
naming the baked export (``steerlab export --ablate --format gguf``) as the way to ship them.

Example:
    >>> import tempfile, pathlib
    >>> from steerlab.testing import tiny_model, tiny_direction
    >>> model = tiny_model("llama")
    >>> plan = model.plan(steerlab.AddVector(tiny_direction(model, layer=2), coeff=3.0))
    >>> sorted(control_vector(plan, n_layers=model.n_layers, d_model=model.d_model))
    [1]
    >>> path = write_control_vector(plan, pathlib.Path(tempfile.mkdtemp()) / "v.gguf", model=model)
    >>> read_control_vector(path)["model_hint"]
    'llama'
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from steerlab.errors import EngineError, NotExportableError, ValueFileError
from steerlab.plan import Add, Plan, Step

if TYPE_CHECKING:
    from steerlab.model import Model

ARCHITECTURE = "controlvector"


BAKED_EXPORT = "ship it as edited weights instead: `steerlab export --ablate --format gguf` or `steerlab.bake` + export"


def slot_of(step: Step, *, n_layers: int) -> int:
    """The ``direction.N`` index llama.cpp adds at for ``step`` (see module docs); raises if there is none.

    Example:
        >>> import torch
        >>> add = Add(torch.ones(4))
        >>> slot_of(Step(5, "resid_pre", add), n_layers=8), slot_of(Step(5, "resid_post", add), n_layers=8)
        (4, 5)
    """
    if not isinstance(step.op, Add):
        raise NotExportableError(
            f"{type(step.op).__name__} at {step.where} cannot be a llama.cpp control vector (a control vector only "
            f"adds a fixed vector); {BAKED_EXPORT}"
        )
    if step.tokens != "all":
        raise NotExportableError(
            f"the step at {step.where} acts on tokens={step.tokens!r}, but llama.cpp adds a control vector at every "
            "token: use tokens='all' for a control vector"
        )
    if step.site == "resid_pre":
        slot = step.layer - 1
    elif step.site == "resid_post":
        slot = step.layer
    else:
        raise NotExportableError(
            f"an addition at {step.where} has no llama.cpp control-vector slot (control vectors add to the "
            "residual stream between blocks): steer resid_pre or resid_post instead"
        )
    if not 1 <= slot < n_layers:
        raise NotExportableError(
            f"an addition at {step.where} would be llama.cpp's direction.{slot}, which does not exist (control "
            f"vectors cover the outputs of blocks 1..{n_layers - 1}: resid_pre of layers 2..{n_layers - 1}, "
            f"resid_post of layers 1..{n_layers - 1}): steer another layer"
        )
    return slot


def control_vector(plan: Plan, *, n_layers: int, d_model: int) -> dict[int, np.ndarray]:
    """``{N: float32 vector}`` for llama.cpp's ``direction.N`` (additions at the same slot are summed)."""
    if not plan.steps:
        raise NotExportableError(f"{plan.source} has no steps: an empty control vector would do nothing")
    slots: dict[int, np.ndarray] = {}
    for step in plan.steps:
        slot = slot_of(step, n_layers=n_layers)
        vector = step.op.vector.detach().to("cpu").double().numpy()
        if vector.shape != (d_model,):
            raise NotExportableError(f"the vector at {step.where} has shape {vector.shape}, the model {d_model}")
        slots[slot] = slots.get(slot, 0.0) + vector
    cancelled = [slot for slot, v in slots.items() if not np.any(v)]
    if cancelled:
        raise NotExportableError(f"the additions at direction.{cancelled[0]} sum to zero: that slot would do nothing")
    return {slot: np.asarray(v, dtype=np.float32) for slot, v in sorted(slots.items())}


def write_control_vector(plan: Plan, path: str | Path, *, model: Model) -> Path:
    """Write ``plan`` (additions on the residual stream) as a llama.cpp control-vector GGUF at ``path``.

    Use it with ``llama-completion -m MODEL.gguf --control-vector path`` (strength 1: the plan's
    coefficients are already in the vectors).
    """
    import gguf

    slots = control_vector(plan, n_layers=model.n_layers, d_model=model.d_model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), ARCHITECTURE)
    writer.add_string(f"{ARCHITECTURE}.model_hint", str(model.hf.config.model_type))
    writer.add_uint32(f"{ARCHITECTURE}.layer_count", len(slots))
    writer.add_string(f"{ARCHITECTURE}.steerlab_source", plan.source)
    for slot, vector in slots.items():
        writer.add_tensor(f"direction.{slot}", vector)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_control_vector(path: str | Path) -> dict[str, Any]:
    """``{"model_hint", "source", "directions": {N: vector}}`` of a control-vector GGUF."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = reader.fields
    if "general.architecture" not in fields or _text(fields["general.architecture"]) != ARCHITECTURE:
        raise ValueFileError(f"{path} is not a llama.cpp control vector (general.architecture != {ARCHITECTURE!r})")
    directions = {int(t.name.split(".", 1)[1]): np.array(t.data, dtype=np.float32) for t in reader.tensors}
    hint = fields.get(f"{ARCHITECTURE}.model_hint")
    source = fields.get(f"{ARCHITECTURE}.steerlab_source")
    return {
        "model_hint": _text(hint) if hint is not None else None,
        "source": _text(source) if source is not None else None,
        "directions": directions,
    }


def _text(field: Any) -> str:
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def run_llama_completion(
    binary: str | Path,
    model: str | Path,
    text: str,
    *,
    n_tokens: int,
    control_vector: str | Path | None = None,
    ignore_eos: bool = False,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Greedy ``llama-completion`` on ``text`` (already chat-formatted), optionally with a control vector;
    raises :class:`EngineError` with llama.cpp's last output lines if it fails."""
    args = [str(binary), "-m", str(model), "-p", text, "-n", str(n_tokens), "--temp", "0", "--top-k", "1", "-no-cnv",
            "-t", "2", "-c", "1024", "--simple-io", "--no-display-prompt"]  # fmt: skip
    if ignore_eos:
        args.append("--ignore-eos")
    if control_vector is not None:
        args += ["--control-vector", str(control_vector)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    if out.returncode != 0:
        raise EngineError(f"llama-completion exited {out.returncode}: {out.stderr[-1500:]}")
    return out
