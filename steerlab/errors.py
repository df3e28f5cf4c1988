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


class EngineError(SteerlabError, RuntimeError):
    """An inference engine (llama.cpp, vLLM) failed; the message carries its own output."""


class HookSessionError(SteerlabError, RuntimeError):
    """A hook session (or ``model.apply`` scope) used outside its ``with`` block, or entered twice."""


class GenerationStateError(SteerlabError, RuntimeError):
    """The state of a generation (how many tokens the KV cache holds, the prompt length) is unknown."""


class InvalidValueError(SteerlabError, ValueError):
    """An option of a value (a coefficient, threshold, layer list, token selection) has the wrong type or value."""


class NonFiniteError(InvalidValueError):
    """A tensor or number holds NaN or infinity where finite values are needed (vectors, weights, thresholds)."""


class ValueFileError(SteerlabError, OSError):
    """A saved steerlab file (direction, probe, guard) is missing, unreadable, corrupt or of another kind."""

    def __str__(self) -> str:  # OSError would otherwise format (errno, strerror) pairs
        return str(self.args[0]) if self.args else ""


class ProvenanceError(SteerlabError, ValueError):
    """A direction is applied to another model or at another site than it was fitted on (``strict=True``)."""


class SteerlabWarning(UserWarning):
    """Base class of steerlab's warnings: something looks wrong but may be intended."""


class ProvenanceWarning(SteerlabWarning):
    """A direction is applied to another model or at another site than it was fitted on."""


class InSampleWarning(SteerlabWarning):
    """A guard is measured or tuned on prompts it was fitted on: the numbers are optimistic."""


class ZeroVectorError(ShapeError):
    """A direction's vector is zero where an op needs it (adding it does nothing; it cannot be normalised)."""
