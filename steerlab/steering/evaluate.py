"""Before/after evaluation of a refusal direction: refusal rates under ablation and addition, KL.

Example:
    >>> result = evaluate_refusal_direction(model, direction, harmful=adv, harmless=test)  # doctest: +SKIP
    >>> result.as_table()                                                                  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from steerlab.eval.logits import kl_divergence, last_token_logprobs
from steerlab.eval.refusal import refusal_rate
from steerlab.steering.direction import Direction
from steerlab.steering.ops import Ablate, AddVector

if TYPE_CHECKING:
    from steerlab.model import Model


@dataclass
class RefusalEvaluation:
    """Refusal rates (substring judge over greedy generations) and KL, with the generations kept."""

    harmful_base: float
    harmful_ablated: float
    harmless_base: float
    harmless_added: float
    kl_harmless_ablated: float
    n_harmful: int
    n_harmless: int
    max_new_tokens: int
    samples: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def as_table(self) -> str:
        """A small text table of the numbers."""
        return "\n".join(
            [
                f"{'set':<28} {'n':>4} {'baseline':>9} {'steered':>9}",
                f"{'harmful, direction ablated':<28} {self.n_harmful:>4} {self.harmful_base:>9.1%} {self.harmful_ablated:>9.1%}",
                f"{'harmless, direction added':<28} {self.n_harmless:>4} {self.harmless_base:>9.1%} {self.harmless_added:>9.1%}",
                f"KL(base || ablated) on harmless last-token distributions: {self.kl_harmless_ablated:.4f}",
            ]
        )

    def to_dict(self) -> dict:
        """JSON-ready form (with the generations)."""
        return asdict(self)


def evaluate_refusal_direction(
    model: Model,
    direction: Direction,
    *,
    harmful: Sequence[str],
    harmless: Sequence[str],
    coeff: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = True,
) -> RefusalEvaluation:
    """Greedy generations with and without the direction ablated (harmful) or added (harmless)."""
    layer = direction.layers[0]
    def gen(prompts: Sequence[str]) -> list[str]:
        return model.generate(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)

    harmful_base = gen(harmful)
    with model.apply(Ablate(direction)):
        harmful_abl = gen(harmful)
        ablated_lp = last_token_logprobs(model, harmless, batch_size=batch_size)
    harmless_base = gen(harmless)
    base_lp = last_token_logprobs(model, harmless, batch_size=batch_size)
    with model.apply(AddVector(direction, coeff=coeff, layers=[layer])):
        harmless_add = gen(harmless)
    return RefusalEvaluation(
        harmful_base=refusal_rate(harmful_base),
        harmful_ablated=refusal_rate(harmful_abl),
        harmless_base=refusal_rate(harmless_base),
        harmless_added=refusal_rate(harmless_add),
        kl_harmless_ablated=float(kl_divergence(base_lp, ablated_lp).mean()),
        n_harmful=len(harmful),
        n_harmless=len(harmless),
        max_new_tokens=max_new_tokens,
        samples={"harmful_base": harmful_base, "harmful_ablated": harmful_abl, "harmless_base": harmless_base, "harmless_added": harmless_add},
    )
