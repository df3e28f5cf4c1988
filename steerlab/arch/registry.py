"""The registry itself: ``model_type`` -> :class:`~steerlab.arch.spec.ArchSpec`, with lookups that say how to
register what is missing. The entries are added by :mod:`steerlab.arch.families`.

Example:
    >>> get_spec("qwen2").o_proj
    'self_attn.o_proj'
"""

from __future__ import annotations

from torch import nn

from steerlab.arch.spec import ArchSpec, BiasRole
from steerlab.errors import UnknownArchitectureError

_REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec, *, overwrite: bool = False) -> ArchSpec:
    """Add ``spec`` to the registry (``overwrite=True`` replaces an existing entry)."""
    if spec.model_type in _REGISTRY and not overwrite:
        raise UnknownArchitectureError(
            f"model_type {spec.model_type!r} is already registered; pass overwrite=True to replace it"
        )
    _REGISTRY[spec.model_type] = spec
    return spec


def known_model_types() -> list[str]:
    """All registered model types, sorted."""
    return sorted(_REGISTRY)


def registered_specs() -> list[ArchSpec]:
    """All registered specs, sorted by model type."""
    return [_REGISTRY[t] for t in known_model_types()]


def families_with_bias_route(role: BiasRole) -> list[str]:
    """The registered model types that can carry a loadable ``role`` bias, sorted."""
    return [s.model_type for s in registered_specs() if s.bias_route(role) is not None]


def gguf_families() -> list[str]:
    """The registered model types that can be written as GGUF, sorted."""
    return [s.model_type for s in registered_specs() if s.gguf is not None]


def get_spec(model_type: str) -> ArchSpec:
    """The spec for ``model_type``; unknown types raise an error listing the known ones."""
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise UnknownArchitectureError(
            f"architecture {model_type!r} is not in steerlab's registry. Known: "
            f"{', '.join(known_model_types())}. To add it, describe where its modules live: "
            f"steerlab.arch.register(steerlab.arch.ArchSpec(model_type={model_type!r}, "
            "layers='model.layers', o_proj='self_attn.o_proj', down_proj='mlp.down_proj', ...))"
        ) from None


def spec_for(model: nn.Module) -> ArchSpec:
    """Look up the spec for a loaded HF model by its ``config.model_type``; for an unknown type the error
    shows an ``ArchSpec(...)`` guessed from the module names found on this model."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]
    from steerlab.arch_hint import registration_hint

    raise UnknownArchitectureError(
        f"architecture {model_type!r} is not in steerlab's registry ({type(model).__name__}). Known: "
        f"{', '.join(known_model_types())}. {registration_hint(model)}"
    )
