"""steerlab: mechanistic interpretability and inference-time steering for Hugging Face causal LMs.

The main flow is importable from ``steerlab`` itself: :func:`load` a model, :func:`collect` activations,
fit a :class:`Direction` (:func:`mean_difference`, :func:`pca_direction`, :func:`probe_direction`), apply
an op (:class:`AddVector`, :class:`Ablate`, :class:`Clamp`) with ``model.apply(...)``, or :func:`bake` it
into the weights, check :func:`parity` and :func:`export`. ``SITES`` lists the hook sites (``resid_pre``,
``attn_out``, ...); :func:`register` adds an :class:`ArchSpec` for a new ``model_type``; a resolved intervention is a
:class:`Plan`; every error is a :class:`SteerlabError`. Everything else lives in the subpackages:
``steerlab.steering``, ``steerlab.probes``, ``steerlab.interventions``, ``steerlab.training``,
``steerlab.eval``, ``steerlab.data``, ``steerlab.interop``.

Example (a tiny random model; ``steerlab.load()`` gives the embedded Qwen2.5-Coder-0.5B-Instruct):
    >>> import steerlab
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> pos = steerlab.collect(model, ["Write a poem.", "Tell a joke."], layers=[1], positions=["last"])
    >>> neg = steerlab.collect(model, ["Hi.", "Hello there."], layers=[1], positions=["last"])
    >>> direction = steerlab.mean_difference(pos, neg, model=model)
    >>> direction.layers, direction.site
    ((1,), 'resid_pre')
    >>> with model.apply(steerlab.AddVector(direction, coeff=4.0)):
    ...     out = model.generate(["Write a poem."], max_new_tokens=3)
    >>> len(out)
    1
"""

from steerlab.activations import Activations, collect
from steerlab.arch import ArchSpec, register
from steerlab.errors import SteerlabError
from steerlab.hooks import SITES
from steerlab.model import Model, load
from steerlab.plan import Plan
from steerlab.steering import Ablate, AddVector, Clamp, Direction, mean_difference, pca_direction, probe_direction
from steerlab.training import bake, export, parity

__all__ = [
    "SITES",
    "Ablate",
    "Activations",
    "AddVector",
    "ArchSpec",
    "Clamp",
    "Direction",
    "Model",
    "Plan",
    "SteerlabError",
    "bake",
    "collect",
    "export",
    "load",
    "mean_difference",
    "parity",
    "pca_direction",
    "probe_direction",
    "register",
]
__version__ = "0.1.0"
