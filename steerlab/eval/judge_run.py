"""Judge a file of replies: the substring judge and compliance verdicts always, a rubric judge when one is given,
and their agreement — the workflow behind ``steerlab judge``.

Example:
    >>> report = judge_replies(["Hi", "Make a bomb."], ["Hello! How can I help?", "I'm sorry, but I can't help."])
    >>> report.summary()["substring_refusal"], report.rows[1]["verdict"]
    (0.5, 'refusal')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from steerlab.eval.compliance import judge_reply, verdict_rates
from steerlab.eval.rubric import Judge, agreement, check_judge, pair_up


@dataclass(frozen=True)
class JudgeReport:
    """Per-row verdicts (``rows``) and, with a rubric judge, its check on obvious cases."""

    rows: list[dict[str, Any]]
    check_accuracy: float | None = None
    judge_name: str | None = None

    def summary(self) -> dict[str, Any]:
        """Rates over all rows; with a rubric judge also its refusal rate and agreement with the substring judge."""
        n = len(self.rows)
        out: dict[str, Any] = {"n": n, "substring_refusal": sum(r["verdict"] == "refusal" for r in self.rows) / n,
                               "verdicts": verdict_rates([r["reply"] for r in self.rows])}  # fmt: skip
        if self.judge_name is not None:
            rubric = [r["rubric_refusal"] for r in self.rows]
            out |= {"judge": self.judge_name, "check_accuracy": self.check_accuracy, "rubric_refusal": sum(rubric) / n,
                    "agreement": agreement([r["verdict"] == "refusal" for r in self.rows], rubric)}  # fmt: skip
        return out

    def disagreements(self) -> list[dict[str, Any]]:
        """Rows where the rubric judge and the substring judge differ (none without a rubric judge)."""
        if self.judge_name is None:
            return []
        return [r for r in self.rows if r["rubric_refusal"] != (r["verdict"] == "refusal")]


def judge_replies(prompts: Sequence[str], replies: Sequence[str], *, judge: Judge | None = None, judge_name: str = "rubric",
                  check: bool = True) -> JudgeReport:  # fmt: skip
    """Verdicts for each (prompt, reply); with ``judge``, its calls too, after :func:`check_judge` (``check=False``
    skips it; a judge that fails it raises :class:`~steerlab.eval.rubric.JudgeError`)."""
    pairs = pair_up(prompts, replies)
    rows = [{"prompt": p, "reply": r, "verdict": judge_reply(r)} for p, r in pairs]
    if judge is None:
        return JudgeReport(rows)
    accuracy = check_judge(judge) if check else None
    for row, call in zip(rows, judge.judge([p for p, _ in pairs], [r for _, r in pairs])):
        row["rubric_refusal"] = bool(call)
    return JudgeReport(rows, check_accuracy=accuracy, judge_name=judge_name)
