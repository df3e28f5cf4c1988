"""The unlearning losses as plain functions of tensors (the trainer feeds them; tests check them by hand).

* :func:`sequence_logprob` — per row, the summed log-probability of the labelled tokens.
* :func:`npo_loss` — Negative Preference Optimization (Zhang et al. 2024):
  ``-(2/β) · mean log σ(-β · (log π_θ(y|x) - log π_ref(y|x)))``; as β → 0 it becomes gradient ascent.
* :func:`rmu_loss` — Representation Misdirection for Unlearning (Li et al. 2024, WMDP): on forget tokens the
  layer-ℓ activations are pushed toward ``c · u`` (a fixed random unit vector scaled by ``c``), on retain
  tokens they are held at the frozen model's: ``mse(h_f, c·u) + α · mse(h_r, h_r^frozen)``, each the mean of the
  squared difference over the hidden axis and the (non-padding) tokens — the official code's ``mse_loss``
  with padding left out.
* :func:`uniform_ce` — ULD's retain term for the assistant (Ji et al. 2024): cross-entropy between the uniform
  distribution and the model's next-token distribution, ``-mean_v log p_v``, at the labelled positions; it is
  smallest when the assistant's logits are flat, i.e. when subtracting them changes nothing.
* :func:`router_anchor_loss` — UOE's anchor (METHODS 7, inferred form): ``-mean log softmax(router logits)[e]``
  over the forget tokens, so unlearning cannot simply route the tokens away from expert ``e``.

Example:
    >>> logp, ref = torch.tensor([-3.0]), torch.tensor([-3.0])
    >>> round(float(npo_loss(logp, ref, beta=0.1)), 4)         # log ratio 0: -(2/β) log σ(0) = 20 ln 2
    13.8629
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from steerlab.errors import ShapeError

IGNORE_INDEX = -100


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-probabilities of ``labels`` ``[b, s-1]`` and the mask of labelled positions.

    Example:
        >>> logits = torch.zeros(1, 3, 4)                       # uniform over 4 tokens
        >>> lp, mask = token_logprobs(logits, torch.tensor([[-100, 2, 1]]))
        >>> [round(float(v), 4) for v in lp[mask]]
        [-1.3863, -1.3863]
    """
    if logits.shape[:2] != labels.shape:
        raise ShapeError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [batch, seq]")
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, ``log π(y|x)``: the summed log-probability of the labelled tokens ``[b]``."""
    picked, _ = token_logprobs(logits, labels)
    return picked.sum(-1)


def mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over all labelled tokens of the batch (the usual LM loss)."""
    picked, mask = token_logprobs(logits, labels)
    return -picked.sum() / mask.sum().clamp(min=1)


def npo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, *, beta: float) -> torch.Tensor:
    """NPO: ``-(2/β) · mean log σ(-β (logp - ref_logp))`` over the rows (sequence log-probabilities).

    Example:
        >>> logp, ref = torch.tensor([-5.0, -2.0]), torch.tensor([-3.0, -3.0])
        >>> by_hand = -(2 / 0.5) * torch.nn.functional.logsigmoid(-0.5 * (logp - ref)).mean()
        >>> bool(torch.isclose(npo_loss(logp, ref, beta=0.5), by_hand))
        True
    """
    if logp.shape != ref_logp.shape:
        raise ShapeError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ")
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp)).mean()


def masked_mean_sq(diff: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the ``mask``-ed tokens of ``mean_d diff²`` (``diff`` ``[b, s, d]``, ``mask`` ``[b, s]``)."""
    per_token = diff.float().pow(2).mean(-1)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def rmu_loss(
    forget_h: torch.Tensor,
    forget_mask: torch.Tensor,
    control: torch.Tensor,
    retain_h: torch.Tensor | None = None,
    retain_frozen: torch.Tensor | None = None,
    retain_mask: torch.Tensor | None = None,
    *,
    alpha: float = 1.0,
) -> torch.Tensor:
    """RMU: forget activations toward ``control`` (= ``c · u``, ``[d]``), retain activations at the frozen model's.

    Example:
        >>> h, mask, u = torch.ones(1, 2, 4), torch.tensor([[1, 0]]), torch.zeros(4)
        >>> float(rmu_loss(h, mask, u))                          # one token, every coordinate 1 away
        1.0
    """
    loss = masked_mean_sq(forget_h - control.to(forget_h.dtype), forget_mask)
    if retain_h is not None and alpha:
        if retain_frozen is None or retain_mask is None:
            raise ShapeError("rmu_loss: retain_h needs retain_frozen and retain_mask")
        loss = loss + alpha * masked_mean_sq(retain_h - retain_frozen.to(retain_h.dtype), retain_mask)
    return loss


def uniform_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over labelled positions of ``-(1/V) Σ_v log p_v`` (cross-entropy from the uniform distribution).

    Example:
        >>> import math
        >>> flat = torch.zeros(1, 3, 8)                          # already uniform: the minimum, log V
        >>> round(float(uniform_ce(flat, torch.tensor([[-100, 1, 2]]))), 4) == round(math.log(8), 4)
        True
    """
    if logits.shape[:2] != labels.shape:
        raise ShapeError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [batch, seq]")
    per_position = -torch.log_softmax(logits[:, :-1].float(), dim=-1).mean(-1)
    mask = labels[:, 1:] != IGNORE_INDEX
    return (per_position * mask).sum() / mask.sum().clamp(min=1)


def router_anchor_loss(router_logits: torch.Tensor, expert: int, mask: torch.Tensor) -> torch.Tensor:
    """UOE anchor: ``-mean log softmax(logits)[expert]`` over the masked tokens (``logits`` ``[tokens, E]``).

    Example:
        >>> logits = torch.zeros(3, 4)                           # uniform router: p = 1/4 everywhere
        >>> round(float(router_anchor_loss(logits, 2, torch.ones(3, dtype=torch.bool))), 4)
        1.3863
    """
    logp = torch.log_softmax(router_logits.float(), dim=-1)[:, expert]
    mask = mask.reshape(-1).to(logp.device).float()
    return -(logp * mask).sum() / mask.sum().clamp(min=1)
