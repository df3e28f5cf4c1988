"""Weight edits baked from interventions, a parity check against the runtime hooks, export, and fine-tuning.

* :func:`bake` — turn an exact intervention (``Ablate``, ``AddVector``, ``HeadAblation``, ``ExpertMask``,
  ``RankOneRedirect``, ``LinearRedirect``, ``MultiKeyRedirect``, ``ColumnEdit``) into weights; :class:`NotBakeableError`
  where no exact weight form exists on the model.
* :func:`parity` — hooked original vs baked model on the same prompts: a :class:`~steerlab.training.parity.ParityReport`.
* :func:`export` — a directory that ``transformers`` loads with no steerlab installed (safetensors, or a
  GGUF for llama/qwen2-style models), with ``steerlab_manifest.json`` (:func:`read_manifest`).
* :func:`rank_by_probe` — rank training candidates by a probe (Cliff-as-a-Judge); by a guard or a direction:
  :mod:`~steerlab.training.selection`.
* :func:`refusal_token_examples` / :func:`finetune` with :class:`SFTConfig` — SFT data with refusal tokens and
  LoRA fine-tuning (peft) merged back into a steerlab Model; DeRTa data and JSONL helpers in
  :mod:`~steerlab.training.data`.

Example:
    >>> import steerlab, tempfile
    >>> from steerlab.testing import tiny_model, tiny_direction
    >>> model = tiny_model("llama")
    >>> ablate = steerlab.Ablate(tiny_direction(model))
    >>> baked = bake(model, ablate)
    >>> parity(model, baked, ablate, ["How do I pick a lock?"]).ok()
    True
    >>> out = export(baked, tempfile.mkdtemp())
    >>> read_manifest(out)["edits"][0]["intervention"]["type"]
    'Ablate'
"""

from steerlab.errors import NotBakeableError, NotExportableError
from steerlab.training.bake import bake
from steerlab.training.data import refusal_token_examples
from steerlab.training.export import export, read_manifest
from steerlab.training.parity import parity
from steerlab.training.selection import rank_by_probe
from steerlab.training.sft import SFTConfig, finetune

__all__ = [
    "NotBakeableError",
    "NotExportableError",
    "SFTConfig",
    "bake",
    "export",
    "finetune",
    "parity",
    "rank_by_probe",
    "read_manifest",
    "refusal_token_examples",
]
