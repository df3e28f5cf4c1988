"""A generation policy applied with ``model.apply`` instead of passed to ``model.generate(policy=...)``.

Inside ``with model.apply(policy) as session:`` every ``model.generate(prompts)`` call decodes with the policy
(:class:`~steerlab.interventions.gated.GatedRefusal`, ``ADAGuard``, ``RefusalTokens``) and returns plain texts, as
generation without a policy does, so evaluation code written for ``generate`` runs under the policy unchanged; the
policy's per-row outputs (scores, actions) collect in ``session.policy_outputs``. A policy acts only in
``generate``: any other forward pass of the model in the scope raises instead of silently running the plain model,
and a scope that never generated raises on exit (the policy did not act).

Example:
    >>> from steerlab import AddVector, Ablate
    >>> from steerlab.data import DEMO_HARMFUL, DEMO_HARMLESS
    >>> from steerlab.interventions.gated import GatedRefusal
    >>> from steerlab.probes import LatentGuard
    >>> from steerlab.testing import tiny_direction, tiny_model
    >>> model = tiny_model("llama")
    >>> d = tiny_direction(model, layer=1)
    >>> guard = LatentGuard.fit(model, DEMO_HARMFUL, DEMO_HARMLESS, layers=[1]).bind(model)
    >>> with model.apply(GatedRefusal(guard, refuse=AddVector(d), comply=Ablate(d))) as session:
    ...     texts = model.generate(["Hi", "Write a haiku."], max_new_tokens=3)
    >>> [type(t).__name__ for t in texts], len(session.policy_outputs)
    (['str', 'str'], 2)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from steerlab.errors import GenerationStateError, InterventionNotFiredError, InvalidValueError

if TYPE_CHECKING:
    from steerlab.hooks import HookSession
    from steerlab.model import Model


@dataclass
class PolicyScope:
    """The policy applied on a model, and whether its generation loop is running (owned by :func:`applied_policy`)."""

    policy: Any
    session: HookSession
    generating: bool = False


_SCOPES: dict[int, PolicyScope] = {}  # id(model.hf) -> its applied policy


def active_policy(model: Model) -> PolicyScope | None:
    """The policy applied on ``model`` (``None`` outside such a scope)."""
    return _SCOPES.get(id(model.hf))


@contextmanager
def applied_policy(model: Model, policy: Any, session: HookSession) -> Iterator[PolicyScope]:
    """Make ``policy`` the one ``model.generate`` decodes with until the block ends (see the module docs)."""
    if active_policy(model) is not None:
        raise InvalidValueError(f"{type(active_policy(model).policy).__name__} is already applied on this model; "
                                "apply one generation policy at a time")  # fmt: skip
    scope = PolicyScope(policy, session)

    def outside_generate(module, args, kwargs) -> None:
        if not scope.generating:
            raise GenerationStateError(f"{type(policy).__name__} is applied (model.apply) and acts only in model.generate; "
                                       "this forward pass ran outside it. Run other passes outside the `with` block")  # fmt: skip

    handle = model.hf.register_forward_pre_hook(outside_generate, with_kwargs=True)
    _SCOPES[id(model.hf)] = scope
    try:
        yield scope
    finally:
        handle.remove()
        _SCOPES.pop(id(model.hf), None)
    if session.check_fired and not session.policy_outputs:
        raise InterventionNotFiredError(f"{type(policy).__name__} was applied but model.generate never ran in the scope; "
                                        "generate inside the `with` block (or pass check_fired=False)")  # fmt: skip
