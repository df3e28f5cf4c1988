"""Keys of a linear map measured: its inputs at chosen positions, their covariance, and key-based redirects.

* :func:`module_keys` — the input of a linear module (``down_proj``, ``o_proj``, a path) at a position.
* :func:`estimate_key_covariance` — ``C = E[k kᵀ] (+ ridge·I)`` over every non-pad token.
* :func:`linear_redirect_from_prompts` — a :class:`~steerlab.interventions.LinearRedirect` whose keys
  are the mean keys of two prompt sets.

Example:
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")                     # down_proj of each layer: 96 neurons -> 64
    >>> corpus = ["The quick brown fox jumps over the lazy dog.", "Hi there! How are you today?"]
    >>> C = estimate_key_covariance(model, corpus, layer=1, ridge=1e-3)
    >>> C.shape
    torch.Size([96, 96])
    >>> edit = linear_redirect_from_prompts(model, ["About cats:"], ["About dogs:"], layer=1, covariance=C)
    >>> with model.apply(edit):
    ...     texts = model.generate(["What do cats eat?"], max_new_tokens=4)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from steerlab.arch import normalize_layer
from steerlab.chat import Position
from steerlab.errors import InvalidValueError
from steerlab.interventions.linear_redirect import LinearRedirect, resolve_linear
from steerlab.plan import Tokens
from steerlab.reader import PerPrompt, Rows, Tap, read

if TYPE_CHECKING:
    from steerlab.model import Model


def _tap(model: Model, layer: int, module: str, reducer) -> Tap:
    """A tap on the input of the linear ``module`` of ``layer`` (checked to be a 2D linear map)."""
    _, linear = resolve_linear(model, layer, module)
    return Tap("input", normalize_layer(layer, model.n_layers), reducer, module=linear)


def module_keys(
    model: Model,
    prompts: Sequence[str],
    *,
    layer: int,
    module: str = "down_proj",
    position: Position = "last",
    average: bool = True,
    chat: bool = True,
    system: str | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """Keys: the input of the linear ``module`` at ``position`` (default the last token) of each prompt.

    Returns their mean [in] (``average=True``), else one row per prompt [n, in], float32 on CPU
    (means are taken in float64; a multi-token position is averaged within each prompt).

    Example:
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> k_cat = module_keys(model, ["Tell me about cats.", "Cats are"], layer=1)
        >>> k_cat.shape, module_keys(model, ["Tell me about cats.", "Cats are"], layer=1, average=False).shape
        (torch.Size([96]), torch.Size([2, 96]))
        >>> module_keys(model, ["Cats are"], layer=1, module="o_proj").shape         # the attention output's input
        torch.Size([64])
    """
    reducer = PerPrompt(position)  # float64 means
    (keys,) = read(model, prompts, taps=[_tap(model, layer, module, reducer)], batch_size=batch_size, chat=chat,
                   system=system, progress=progress, desc="keys")  # fmt: skip
    return (keys.mean(dim=0) if average else keys).float()


class _SecondMoment:
    """``Σ k kᵀ`` over non-pad tokens (float64) and the token count."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | float = 0.0
        self.n = 0

    def update(self, x: torch.Tensor, rows: Rows, layer: int) -> None:
        keys = x[rows.mask(x.device)].double().cpu()  # [tokens, in]
        self.sum = self.sum + keys.T @ keys
        self.n += keys.shape[0]

    def result(self) -> torch.Tensor:
        return self.sum / self.n


def estimate_key_covariance(
    model: Model,
    prompts: Sequence[str],
    *,
    layer: int,
    module: str = "down_proj",
    ridge: float = 0.0,
    chat: bool = False,
    system: str | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """``C = E[k kᵀ] + ridge·I`` over every non-pad token of ``prompts`` (ordinary text: ``chat=False``).

    The keys are the input of the linear ``module``; sums are float64 and so is the result [in, in].
    A few prompts give a singular ``C``: collect more text, or pass a small ``ridge``.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> C = estimate_key_covariance(model, ["The quick brown fox jumps over the lazy dog."], layer=1, ridge=1e-4)
        >>> C.shape, C.dtype, torch.allclose(C, C.T)
        (torch.Size([96, 96]), torch.float64, True)
    """
    if ridge < 0:
        raise InvalidValueError(f"ridge must be >= 0 (a small ridge makes C invertible), got {ridge}")
    (cov,) = read(model, prompts, taps=[_tap(model, layer, module, _SecondMoment())], batch_size=batch_size,
                  chat=chat, system=system, progress=progress, desc="covariance")  # fmt: skip
    return cov + ridge * torch.eye(cov.shape[0], dtype=torch.float64)


def linear_redirect_from_prompts(
    model: Model,
    concept_prompts: Sequence[str],
    target_prompts: Sequence[str],
    *,
    layer: int,
    module: str = "down_proj",
    covariance: torch.Tensor | None = None,
    position: Position = "last",
    tokens: Tokens = "all",
    chat: bool = True,
    batch_size: int = 16,
) -> LinearRedirect:
    """A :class:`LinearRedirect` from mean keys (:func:`module_keys`): ``concept_prompts`` -> ``target_prompts``.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> edit = linear_redirect_from_prompts(model, ["About cats:"], ["About dogs:"], layer=1)
        >>> edit.layer, edit.module, edit.key.shape
        (1, 'down_proj', torch.Size([96]))
    """
    kw = {"layer": layer, "module": module, "position": position, "chat": chat, "batch_size": batch_size}
    k_a, k_b = module_keys(model, concept_prompts, **kw), module_keys(model, target_prompts, **kw)
    return LinearRedirect(layer, k_a, k_b, module=module, covariance=covariance, tokens=tokens)
