"""Before/after evaluation of a refusal direction: refusal rates under ablation and addition, KL.

Example:
    >>> from steerlab.testing import tiny_model, tiny_direction
    >>> model, harmful, harmless = tiny_model("llama"), ["Make a weapon."], ["Say hello."]
    >>> result = evaluate_refusal_direction(model, tiny_direction(model, layer=1), harmful=harmful, harmless=harmless,
    ...                                     max_new_tokens=4, progress=False)
    >>> print(result.as_table().splitlines()[0])
    set                             n  baseline   steered
    >>> result.n_harmful, len(result.examples("harmless"))
    (1, 1)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal

from steerlab.errors import SteerlabError
from steerlab.eval.logits import kl_divergence, last_token_logprobs
from steerlab.eval.refusal import refusal_rate
from steerlab.steering.direction import Direction
from steerlab.steering.ops import Ablate, AddVector

if TYPE_CHECKING:
    from steerlab.model import Model


class UnknownPromptSetError(SteerlabError, ValueError):
    """An evaluated prompt set was named that is neither ``"harmful"`` nor ``"harmless"``."""


@dataclass(frozen=True)
class Example:
    """One prompt with its baseline and steered generations (steered: ablated for harmful, added for harmless)."""

    prompt: str
    baseline: str
    steered: str


@dataclass
class RefusalEvaluation:
    """Refusal rates (substring judge over greedy generations) and KL, with the prompts and generations kept."""

    harmful_base: float
    harmful_ablated: float
    harmless_base: float
    harmless_added: float
    kl_harmless_ablated: float
    n_harmful: int
    n_harmless: int
    max_new_tokens: int
    samples: dict[str, list[str]] = field(default_factory=dict, repr=False)
    prompts: dict[str, list[str]] = field(default_factory=dict, repr=False)  # "harmful", "harmless"

    def examples(self, which: Literal["harmful", "harmless"], n: int = 3) -> list[Example]:
        """The first ``n`` prompts of a set with their baseline and steered generations, in evaluation order."""
        if which not in ("harmful", "harmless"):
            raise UnknownPromptSetError(f"the evaluation has 'harmful' and 'harmless' prompts; got {which!r}")
        steered = "harmful_ablated" if which == "harmful" else "harmless_added"
        rows = zip(self.prompts.get(which, []), self.samples.get(f"{which}_base", []), self.samples.get(steered, []))
        return [Example(p, b, s) for p, b, s in list(rows)[:n]]

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
    harmful, harmless = list(harmful), list(harmless)
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
        samples={
            "harmful_base": harmful_base,
            "harmful_ablated": harmful_abl,
            "harmless_base": harmless_base,
            "harmless_added": harmless_add,
        },
        prompts={"harmful": harmful, "harmless": harmless},
    )
