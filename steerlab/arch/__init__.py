"""Declarative architecture registry: ``model_type`` -> :class:`ArchSpec`.

Every piece of per-family knowledge steerlab needs lives in this package: where the decoder layers are, which
module's output is added to the residual stream, where the router and the fused experts of an MoE block live and how
the router turns logits into top-k weights, how a family gets a loadable bias it lacks, and how it is written as
GGUF. Nothing else in steerlab branches on a model family.

* :mod:`~steerlab.arch.spec`: the frozen value types (``ArchSpec``, ``MoESpec``, ``BiasRoute``, ``GGUFArch``).
* :mod:`~steerlab.arch.families`: the table of known families.
* :mod:`~steerlab.arch.registry`: ``register`` / ``get_spec`` / ``spec_for`` and queries over the table.
* :mod:`~steerlab.arch.routing`: routing rules (``route``, ``selection_scores``).
* :mod:`~steerlab.arch.mlp`: where an MLP writes the residual stream (``mlp_down``, ``FUSED_EXPERTS``).
* :mod:`~steerlab.arch.paths`: ``resolve_path``, ``normalize_layer``.

Example:
    >>> from steerlab.arch import get_spec
    >>> spec = get_spec("qwen2")
    >>> spec.o_proj
    'self_attn.o_proj'

Register a family the table does not know:
    >>> from steerlab.arch import ArchSpec, register
    >>> _ = register(ArchSpec(model_type="my_llama_clone"), overwrite=True)
"""

from steerlab.arch.families import BUILTIN_SPECS, short_window_reason, sliding_window_reason
from steerlab.arch.mlp import FUSED_EXPERTS, FusedExperts, MlpDown, dense_down_name, mlp_down
from steerlab.arch.paths import normalize_layer, resolve_path
from steerlab.arch.registry import (
    families_with_bias_route,
    get_spec,
    gguf_families,
    known_model_types,
    register,
    registered_specs,
    spec_for,
)
from steerlab.arch.routing import route, selection_scores
from steerlab.arch.spec import (
    BIAS_ROLES,
    ArchSpec,
    BiasRole,
    BiasRoute,
    ConfigCheck,
    ExpertGroups,
    ExpertLayout,
    GGUFArch,
    MoESpec,
    Routing,
)

__all__ = [
    "BIAS_ROLES",
    "BUILTIN_SPECS",
    "FUSED_EXPERTS",
    "ArchSpec",
    "BiasRole",
    "BiasRoute",
    "ConfigCheck",
    "ExpertGroups",
    "ExpertLayout",
    "FusedExperts",
    "GGUFArch",
    "MlpDown",
    "MoESpec",
    "Routing",
    "dense_down_name",
    "families_with_bias_route",
    "get_spec",
    "gguf_families",
    "known_model_types",
    "mlp_down",
    "normalize_layer",
    "register",
    "registered_specs",
    "resolve_path",
    "route",
    "selection_scores",
    "short_window_reason",
    "sliding_window_reason",
    "spec_for",
]
