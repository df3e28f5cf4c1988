"""The steerlab command: the demo prints a per-layer table; bad arguments exit non-zero with a message."""

import re

from steerlab.cli import main


def test_demo_prints_a_row_per_layer(capsys):
    assert main(["demo", "--model", "smollm2-135m-instruct", "--batch-size", "6"]) == 0
    out = capsys.readouterr().out
    assert "<|im_start|>assistant" in out
    rows = [line for line in out.splitlines() if re.match(r"^\s*\d+\s+-?\d", line)]
    assert [int(r.split()[0]) for r in rows] == list(range(30))
    # harmful and harmless prompts separate at middle layers of a real model
    seps = [float(r.split()[3]) for r in rows[10:20]]
    assert all(s > 0.1 for s in seps), seps


def test_bad_model_is_a_clear_error(capsys):
    assert main(["demo", "--model", "/nonexistent/x.gguf"]) == 2
    assert "does not exist" in capsys.readouterr().err
