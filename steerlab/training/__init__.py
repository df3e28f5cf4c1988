"""Weight edits baked from interventions, a parity check against the runtime hooks, and export.

* :func:`bake` — turn an exact intervention (``Ablate``, ``AddVector``, ``HeadAblation``, ``ExpertMask``,
  ``RankOneRedirect``, ``LinearRedirect``, ``MultiKeyRedirect``) into weights; :class:`NotBakeableError`
  where no exact weight form exists on the model.
* :func:`parity` — hooked original vs baked model on the same prompts: a :class:`ParityReport`.
* :func:`export` — a directory that ``transformers`` loads with no steerlab installed (safetensors, or a
  GGUF for llama/qwen2-style models), with ``steerlab_manifest.json``.

Data selection and fine-tuning live in their own submodules (``steerlab.training.data``, ``.select``, ``.sft``).

Example:
    >>> from steerlab.training import bake, parity, export                      # doctest: +SKIP
    >>> baked = bake(model, Ablate(direction))                                  # doctest: +SKIP
    >>> parity(model, baked, Ablate(direction), prompts).max_abs_logit_diff     # doctest: +SKIP
    >>> export(baked, "out/ablated")                                            # doctest: +SKIP
"""

from steerlab.errors import NotBakeableError, NotExportableError
from steerlab.training.bake import bake, embedding_scale, plan
from steerlab.training.export import export, read_manifest
from steerlab.training.manifest import describe, history
from steerlab.training.parity import ParityReport, parity

__all__ = [
    "NotBakeableError",
    "NotExportableError",
    "ParityReport",
    "bake",
    "describe",
    "embedding_scale",
    "export",
    "history",
    "parity",
    "plan",
    "read_manifest",
]
