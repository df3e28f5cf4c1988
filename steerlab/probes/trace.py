"""Position traces: a probe applied at every token of prompts plus responses (METHODS 3).

The refusal-cliff view: score each token of template + prompt + (prefilled or generated)
response with a probe at one layer, align the sequences at their end and average. A *cliff* is
a drop of the score over the last few tokens before the model's own output.

Example:
    >>> import torch
    >>> from steerlab.probes import fit_probes
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> _ = torch.manual_seed(0); x = torch.randn(32, 1, model.d_model); y = (x[:, 0, 0] > 0).long()
    >>> probe = fit_probes(x, y, layers=[2])
    >>> tr = trace(model, probe, ["Write a poem.", "Hi"], responses=["Sure.", "Hello!"], progress=False)
    >>> len(tr.scores), bool(all(((s >= 0) & (s <= 1)).all() for s in tr.scores))
    (2, True)
    >>> offsets, mean, std = tr.aligned(align="prompt_end")
    >>> mean.shape == offsets.shape
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from steerlab.activations import collect
from steerlab.errors import EmptyInputError, InvalidValueError, ShapeError
from steerlab.probes.probe import Probe

if TYPE_CHECKING:
    from steerlab.model import Model


@dataclass(frozen=True)
class PositionTrace:
    """Per-row probe probabilities over every token; ``prompt_lengths[i]`` tokens are the prompt."""

    scores: tuple[torch.Tensor, ...]  # one [T_i] tensor per row, P(positive)
    prompt_lengths: tuple[int, ...]
    tokens: tuple[tuple[str, ...], ...]
    layer: int
    responses: tuple[str, ...] | None = None

    def aligned(self, *, align: str = "end", window: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(offsets, mean, std) over rows with sequences aligned at ``align``.

        ``align="end"``: offset 0 is each row's last token, offsets are negative before it;
        ``align="prompt_end"``: offset 0 is the first response token (last prompt token is -1).
        Rows too short for an offset are left out of that offset's mean.
        """
        if align not in ("end", "prompt_end"):
            raise InvalidValueError(f"align must be 'end' or 'prompt_end'; got {align!r}")
        anchors = [len(s) - 1 for s in self.scores] if align == "end" else list(self.prompt_lengths)
        lo = -max(anchors)
        hi = max(len(s) - 1 - a for s, a in zip(self.scores, anchors))
        if window is not None:
            lo, hi = max(lo, -window), min(hi, window)
        offsets = torch.arange(lo, hi + 1)
        grid = torch.full((len(self.scores), len(offsets)), float("nan"))
        for i, (s, a) in enumerate(zip(self.scores, anchors)):
            idx = offsets + a
            ok = (idx >= 0) & (idx < len(s))
            grid[i, ok] = s[idx[ok]]
        count = (~grid.isnan()).sum(0)
        mean = torch.nanmean(grid, 0)
        centred = torch.where(grid.isnan(), torch.zeros_like(grid), grid - mean)
        std = (centred.pow(2).sum(0) / (count - 1).clamp(min=1)).sqrt()
        return offsets, mean, std

    def cliff(self, *, last: int = 3, window: int = 10) -> torch.Tensor:
        """Per-row drop: mean score over the ``window`` tokens before the final ``last`` minus the final ``last``.

        Positive values mean the probe's score falls at the end of the sequence (a refusal cliff).
        """
        out = []
        for s in self.scores:
            if len(s) < last + 1:
                raise ShapeError(f"a row has {len(s)} tokens; cliff(last={last}) needs more")
            before = s[max(0, len(s) - last - window) : len(s) - last]
            out.append(before.mean() - s[-last:].mean())
        return torch.stack(out)

    def final(self) -> torch.Tensor:
        """The score at each row's last token (Cliff-as-a-Judge ranks by this)."""
        return torch.stack([s[-1] for s in self.scores])

    def figure(self, *, align: str = "end", window: int | None = 64, title: str | None = None):
        """Plotly line of the mean trace with a ±1 std band."""
        import plotly.graph_objects as go

        offsets, mean, std = self.aligned(align=align, window=window)
        x = offsets.tolist()
        fig = go.Figure(
            [
                go.Scatter(x=x + x[::-1], y=(mean + std).tolist() + (mean - std).tolist()[::-1], fill="toself", line={"width": 0}, opacity=0.25, name="±1 std", hoverinfo="skip"),
                go.Scatter(x=x, y=mean.tolist(), mode="lines", name="mean P(positive)"),
            ]
        )
        xlabel = "tokens before the end" if align == "end" else "tokens after the prompt"
        fig.update_layout(title=title or f"Probe trace at layer {self.layer} (n={len(self.scores)})", xaxis_title=xlabel, yaxis_title="probe probability", yaxis_range=[0, 1])
        return fig


def trace(
    model: Model,
    probe: Probe,
    prompts: Sequence[str],
    *,
    responses: Sequence[str] | None = None,
    max_new_tokens: int | None = None,
    layer: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> PositionTrace:
    """Score every token of ``prompts`` (+ ``responses``, or a greedy continuation of ``max_new_tokens``).

    ``layer`` picks one of the probe's layers (default: its only layer).
    """
    prompts = list(prompts)
    if not prompts:
        raise EmptyInputError("the prompt list is empty; pass at least one prompt")
    one = probe.one_layer(layer, width=model.d_model)
    layer = one.layers[0]
    if responses is None and max_new_tokens is not None:
        responses = model.generate(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    if responses is not None and len(responses) != len(prompts):
        raise ShapeError(f"{len(prompts)} prompts but {len(responses)} responses")
    acts = collect(model, prompts, sites=[one.site], layers=[layer], positions=["all"], responses=responses, batch_size=batch_size, progress=progress)
    flat = acts.get(one.site, "all")  # [T, 1, d]
    offsets = acts.offsets().tolist()
    probs = one.predict_proba(flat)[:, 0]
    rows = model.chat().tokenize(prompts, responses=responses)
    return PositionTrace(
        scores=tuple(probs[offsets[i] : offsets[i + 1]] for i in range(len(prompts))),
        prompt_lengths=tuple(r[3] for r in rows),
        tokens=tuple(tuple(model.tokenizer.convert_ids_to_tokens(r[0])) for r in rows),
        layer=layer,
        responses=tuple(responses) if responses is not None else None,
    )
