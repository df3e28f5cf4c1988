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


def test_refusal_command_rejects_bad_arguments(capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        main(["refusal", "--filter", "vibes"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["refusal", "--help"])
    assert exc.value.code == 0 and "--kl-max" in capsys.readouterr().out


def test_refusal_command_on_a_model_that_never_refuses_fails_clearly(capsys, tmp_path):
    # SmolLM2 does not refuse: the filter keeps no harmful prompt, which must be a clear error, not a crash
    assert main(["refusal", "--model", "smollm2-135m-instruct", "--out", str(tmp_path), "--filter", "score"]) == 2
    assert "at least one prompt" in capsys.readouterr().err
