"""A refusal gate's tuning rows: every tuning prompt measured once under each branch.

:func:`measure_tuning_rows` generates every tuning prompt under each branch of a gate (the plain model, the
``refuse`` intervention, each ``comply`` option), judges each reply, and measures KL(plain ‖ branch) of the next
token on the ordinary prompts; the guard scores every prompt once.
:func:`~steerlab.measure.gate_band.choose_band` then picks the comply option and band most likely to meet the bar
(over-refusal, refusal on harmful at least the plain model's, KL), and ``choice.gate(guard, refuse=, comply=)``
builds the gate.

Tune on prompts the guard was not fitted on, and measure the gate on others again: the choice only transfers as
far as the tuning prompts resemble what the gate will see.

Example:
    >>> from steerlab import AddVector, Ablate
    >>> from steerlab.data import DEMO_HARMFUL, DEMO_HARMLESS
    >>> from steerlab.probes import LatentGuard
    >>> from steerlab.testing import tiny_direction, tiny_model
    >>> model = tiny_model("llama")
    >>> guard = LatentGuard.fit(model, DEMO_HARMFUL[:6], DEMO_HARMLESS[:6], layers=[1])
    >>> d = tiny_direction(model, layer=1)
    >>> sets = {"safe": DEMO_HARMLESS[6:9], "harmful": DEMO_HARMFUL[6:9], "ordinary": DEMO_HARMLESS[9:]}  # new to the guard
    >>> rows = measure_tuning_rows(model, guard, sets, refuse=AddVector(d, coeff=4.0), comply={"ablate": Ablate(d)},
    ...                            max_new_tokens=2)
    >>> rows.comply, sorted(rows.refused["safe"])
    (('ablate',), ['ablate', 'plain', 'refuse'])
    >>> from steerlab.measure.gate_band import choose_band
    >>> choice = choose_band(rows, max_kl=100.0, draws=20, min_share=0.0)   # a random model: loose limits
    >>> gated = choice.gate(guard, refuse=AddVector(d, coeff=4.0), comply=Ablate(d))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from steerlab.errors import EmptyInputError, InvalidValueError
from steerlab.eval.compliance import judge_reply
from steerlab.eval.logits import kl_divergence, last_token_logprobs
from steerlab.measure.gate_band import FIXED_BRANCHES, TuningRows
from steerlab.probes.guard import warn_in_sample

if TYPE_CHECKING:
    from steerlab.model import Model


def _is_refusal(text: str) -> bool:
    return judge_reply(text) == "refusal"


def measure_tuning_rows(
    model: Model,
    guard: Any,
    sets: Mapping[str, Sequence[str]],
    *,
    refuse: Any,
    comply: Mapping[str, Any],
    safe: str = "safe",
    harmful: Sequence[str] = ("harmful",),
    ordinary: str = "ordinary",
    max_new_tokens: int = 24,
    refused: Callable[[str], bool] = _is_refusal,
    batch_size: int = 16,
) -> TuningRows:
    """Every prompt of ``sets`` generated (greedy) under the plain model, ``refuse`` and each ``comply`` option;
    ``refused(text)`` judges each reply (default: the substring judge's ``"refusal"`` verdict). An
    :class:`~steerlab.errors.InSampleWarning` names the prompts the guard records it was fitted on."""
    harmful = (harmful,) if isinstance(harmful, str) else tuple(harmful)
    if not comply:
        raise EmptyInputError("comply needs at least one named intervention, e.g. {'ablate': Ablate(direction)}")
    clash = [name for name in comply if name in FIXED_BRANCHES]
    if clash:
        raise InvalidValueError(f"comply options cannot be named {clash}: 'plain' and 'refuse' are the gate's other branches")
    branches = {"refuse": refuse, **comply}
    warn_in_sample(guard, {name: list(sets.get(name, ())) for name in (safe, *harmful, ordinary)}, doing="tuning")
    scores, judged, kl = {}, {}, {}
    for name in (safe, *harmful, ordinary):
        prompts = list(sets.get(name, ()))
        if not prompts:
            raise EmptyInputError(f"sets[{name!r}] needs prompts")
        scores[name] = guard.score(prompts, batch_size=batch_size).double()
        gen = {"max_new_tokens": max_new_tokens, "batch_size": batch_size}
        texts = {"plain": model.generate(prompts, **gen)}
        for branch, iv in branches.items():
            with model.apply(iv):
                texts[branch] = model.generate(prompts, **gen)
        judged[name] = {b: [float(bool(refused(t))) for t in ts] for b, ts in texts.items()}
        if name == ordinary:
            plain = last_token_logprobs(model, prompts, batch_size=batch_size)
            for branch, iv in branches.items():
                with model.apply(iv):
                    kl[branch] = kl_divergence(plain, last_token_logprobs(model, prompts, batch_size=batch_size)).clamp_min(0.0)
    return TuningRows(scores, judged, kl, safe=safe, harmful=harmful, ordinary=ordinary)


__all__ = ["measure_tuning_rows"]
