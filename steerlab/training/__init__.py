"""Weight edits baked from interventions, a parity check against the runtime hooks, and export.

* :func:`bake` — turn an exact intervention (``Ablate``, ``AddVector``, ``HeadAblation``, ``ExpertMask``,
  ``RankOneRedirect``, ``LinearRedirect``, ``MultiKeyRedirect``, ``ColumnEdit``) into weights; :class:`NotBakeableError`
  where no exact weight form exists on the model.
* :func:`parity` — hooked original vs baked model on the same prompts: a :class:`ParityReport`.
* :func:`export` — a directory that ``transformers`` loads with no steerlab installed (safetensors, or a
  GGUF for llama/qwen2-style models), with ``steerlab_manifest.json``.

* :mod:`~steerlab.training.selection` — rank training candidates by probe (Cliff-as-a-Judge), guard or direction.
* :mod:`~steerlab.training.data` / :mod:`~steerlab.training.sft` — SFT data with refusal tokens, DeRTa data,
  LoRA fine-tuning (peft) merged back into a steerlab Model.

Example:
    >>> from steerlab.training import bake, parity, export                      # doctest: +SKIP
    >>> baked = bake(model, Ablate(direction))                                  # doctest: +SKIP
    >>> parity(model, baked, Ablate(direction), prompts).max_abs_logit_diff     # doctest: +SKIP
    >>> export(baked, "out/ablated")                                            # doctest: +SKIP
"""

from steerlab.errors import NotBakeableError, NotExportableError
from steerlab.training.bake import bake, embedding_scale, weight_change
from steerlab.training.data import SFTExample, derta_examples, read_jsonl, refusal_token_examples, write_jsonl
from steerlab.training.export import export, read_manifest
from steerlab.training.manifest import describe, history
from steerlab.training.parity import ParityReport, parity
from steerlab.training.selection import Ranking, rank_by_direction, rank_by_guard, rank_by_probe
from steerlab.training.sft import SFTConfig, SFTResult, finetune

__all__ = [
    "NotBakeableError",
    "NotExportableError",
    "ParityReport",
    "Ranking",
    "SFTConfig",
    "SFTExample",
    "SFTResult",
    "bake",
    "derta_examples",
    "describe",
    "embedding_scale",
    "export",
    "finetune",
    "history",
    "parity",
    "weight_change",
    "rank_by_direction",
    "rank_by_guard",
    "rank_by_probe",
    "read_jsonl",
    "read_manifest",
    "refusal_token_examples",
    "write_jsonl",
]
