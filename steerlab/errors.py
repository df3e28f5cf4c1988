"""Error types. Every steerlab error names the problem and the fix."""

from __future__ import annotations


class SteerlabError(Exception):
    """Base class of all errors raised by steerlab."""


class UnknownArchitectureError(SteerlabError, KeyError):
    """The model's ``model_type`` has no entry in the architecture registry."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class LayerIndexError(SteerlabError, IndexError):
    """A layer index is outside the model's range."""


class UnknownSiteError(SteerlabError, ValueError):
    """A hook site name is not one steerlab knows, or the site does not exist at that layer."""


class UnknownPositionError(SteerlabError, ValueError):
    """A position name or offset cannot be resolved."""


class ChatTemplateError(SteerlabError, ValueError):
    """The tokenizer has no chat template, or the template cannot be analysed."""


class EmptyInputError(SteerlabError, ValueError):
    """An empty prompt list (or other empty input) where at least one item is needed."""


class ShapeError(SteerlabError, ValueError):
    """A tensor has the wrong shape (e.g. a direction of the wrong width)."""


class InterventionNotFiredError(SteerlabError, RuntimeError):
    """A registered hook never ran during the scope it was registered for."""


class ModelLoadError(SteerlabError, OSError):
    """A model could not be found, assembled or verified."""


class NotBakeableError(SteerlabError, ValueError):
    """An intervention has no exact weight-edit form on this model (apply it as a runtime hook instead)."""


class NotExportableError(SteerlabError, ValueError):
    """A model cannot be written in the requested export format (pick another format or architecture)."""


class HookSessionError(SteerlabError, RuntimeError):
    """A hook session (or ``model.apply`` scope) used outside its ``with`` block, or entered twice."""


class GenerationStateError(SteerlabError, RuntimeError):
    """The state of a generation (how many tokens the KV cache holds, the prompt length) is unknown."""
