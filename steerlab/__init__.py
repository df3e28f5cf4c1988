"""steerlab: mechanistic interpretability and inference-time steering for Hugging Face causal LMs.

Example:
    >>> import steerlab                                                   # doctest: +SKIP
    >>> model = steerlab.load()              # embedded Qwen2.5-Coder-0.5B-Instruct
    >>> acts = steerlab.collect(model, ["Write a poem."], positions=["t_inst", "post_inst"])
"""

from steerlab.activations import Activations, collect
from steerlab.arch import ArchSpec, MoESpec, get_spec, known_model_types, register
from steerlab.chat import ChatFormat, EncodedBatch
from steerlab.errors import SteerlabError
from steerlab.hooks import SITES, HookContext, HookSession
from steerlab.model import Model, load

__all__ = [
    "SITES",
    "Activations",
    "ArchSpec",
    "ChatFormat",
    "EncodedBatch",
    "HookContext",
    "HookSession",
    "Model",
    "MoESpec",
    "SteerlabError",
    "collect",
    "get_spec",
    "known_model_types",
    "load",
    "register",
]
__version__ = "0.1.0"
