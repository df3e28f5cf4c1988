"""``steerlab judge``: refusal verdicts for a JSONL file of replies — the substring judge and compliance check, and
a rubric judge on a local model (``--model``) or an OpenAI-compatible endpoint (``--endpoint``), with their
agreement."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from steerlab.cli import inputs
from steerlab.cli.args import UsageError, positive_int


def _judge(args: argparse.Namespace) -> int:
    from steerlab.data.files import read_replies
    from steerlab.eval.judge_run import judge_replies
    from steerlab.eval.rubric import EndpointJudge, LocalJudge

    if args.model is not None and args.endpoint is not None:
        raise UsageError("pass one rubric judge: --model or --endpoint, not both")
    if (args.endpoint is None) != (args.endpoint_model is None):
        raise UsageError("--endpoint and --endpoint-model go together (the server's URL and its model's name)")
    out = Path(args.out).expanduser() if args.out else None
    if out is not None:
        if out.is_dir():
            raise UsageError(f"--out {out} is a directory; pass a file name for the JSON report")
        inputs.check_parent(out, "report file")
    prompts, replies = read_replies(args.replies)
    judge, name = None, None
    if args.model is not None:
        judge, name = LocalJudge(inputs.open_model(args.model, args.dtype), batch_size=args.batch_size), args.model
    elif args.endpoint is not None:
        key = os.environ.get(args.api_key_env) if args.api_key_env else None
        if args.api_key_env and not key:
            raise UsageError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
        judge, name = EndpointJudge(args.endpoint, args.endpoint_model, api_key=key), f"{args.endpoint_model} at {args.endpoint}"
    report = judge_replies(prompts, replies, judge=judge, judge_name=name or "rubric", check=not args.no_check)
    s = report.summary()
    v = s["verdicts"]
    print(f"{s['n']} replies: substring judge refusal {s['substring_refusal']:.1%}; verdicts: compliance {v['compliance']:.1%}, "
          f"refusal {v['refusal']:.1%}, degenerate {v['degenerate']:.1%}, empty {v['empty']:.1%}")  # fmt: skip
    if judge is not None:
        a = s["agreement"]
        checked = "not checked" if s["check_accuracy"] is None else f"{s['check_accuracy']:.0%} of steerlab's obvious cases"
        print(f"rubric judge {name} ({checked}): refusal {s['rubric_refusal']:.1%}; agreement with the substring judge "
              f"{a['agreement']:.1%}, kappa {a['kappa']:.3f} ({len(report.disagreements())} disagreements)")  # fmt: skip
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"summary": s, "rows": report.rows}, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("judge", help="refusal verdicts for a JSONL file of replies; a rubric judge and its agreement")
    p.add_argument("replies", help='JSONL file, one {"prompt": "...", "reply": "..."} object per line')
    p.add_argument("--model", default=None, help="rubric judge on a local model: an embedded name, HF id or directory "
                   "(default: none, the substring judge only)")
    p.add_argument("--endpoint", default=None, help="rubric judge on an OpenAI-compatible server, e.g. http://localhost:8000/v1")
    p.add_argument("--endpoint-model", default=None, help="--endpoint: the served model's name")
    p.add_argument("--api-key-env", default=None, help="--endpoint: environment variable holding the API key")
    p.add_argument("--no-check", action="store_true", help="skip the rubric judge's check on steerlab's obvious cases")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="--model weights dtype")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--out", default=None, help="write the summary and per-reply verdicts to this JSON file")
    p.set_defaults(func=_judge)
