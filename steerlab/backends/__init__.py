"""Backends render :class:`~steerlab.plan.Plan` values; they never look at the intervention that made one.

* :mod:`steerlab.backends.hf` — hooks on the transformers model (what ``model.apply`` uses);
* :mod:`steerlab.backends.weights` — weight edits (what ``training.bake`` uses);
* :mod:`steerlab.backends.llamacpp` — llama.cpp control vectors (additions on the residual stream).
"""
