"""Report pages: no page loads anything from the network (plotly.js sits beside the pages), every page
defines its terms and names the run that produced it, the refusal report shows example generations."""

import html
import re
from pathlib import Path

import pytest
import torch

import steerlab
from steerlab.cli import main
from steerlab.embedded import EMBEDDED
from steerlab.errors import SteerlabError
from steerlab.report import (
    EVALUATION_TERMS,
    GLOSSARY,
    PLOTLY_JS,
    REFUSAL_TERMS,
    UNKNOWN_SHA,
    RunInfo,
    glossary,
    write_page,
    write_refusal_report,
    write_selection_report,
    write_sweep_report,
)
from steerlab.steering.evaluate import RefusalEvaluation
from steerlab.steering.refusal import Candidate, SelectionReport

NETWORK = re.compile(r"https?://|//cdn|\bcdn\b|cdn\.", re.IGNORECASE)
LOADS = re.compile(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]+)""", re.IGNORECASE)


def _plotlyjs() -> bytes:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs().encode("utf-8")


def assert_offline(folder: Path) -> list[Path]:
    """Every HTML page under ``folder`` loads only files of its own folder, and plotly.js is one local copy."""
    pages = sorted(folder.rglob("*.html"))
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert not NETWORK.search(text), (page, NETWORK.search(text).group(0))
        for target in LOADS.findall(text):
            assert "/" not in target and (page.parent / target).is_file(), (page, target)
        if "Plotly.newPlot" in text:
            assert text.index(f"<script src='{PLOTLY_JS}'>") < text.index("Plotly.newPlot"), page
            assert (page.parent / PLOTLY_JS).read_bytes() == _plotlyjs(), page
        assert len(list(page.parent.glob("*.js"))) <= 1, page.parent
    return pages


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_no_page_the_commands_write_loads_anything_from_the_network(tiny_dir, tmp_path, one_thread, capsys):
    probe = ["probe", "--model", tiny_dir, "--limit", "6", "--folds", "2", "--positions", "t_inst", "-2",
             "--out", str(tmp_path / "probe")]  # fmt: skip
    refusal = ["refusal", "--model", tiny_dir, "--out", str(tmp_path / "refusal"), "--filter", "none", "--kl-max",
               "1e9", "--induce-min=-1e9", "--n-eval", "3", "--max-new-tokens", "2", "--eval-dtype", "float32",
               "--min-refusal-rate", "0"]  # fmt: skip
    assert main(probe) == 0 and main(refusal) == 0
    pages = assert_offline(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in pages] == [
        "probe/sweep.html",
        "refusal/report.html",
        "refusal/selection.html",
    ]
    for page in pages:
        text = page.read_text()
        assert "Glossary" in text and "steerlab version" in text and "Plotly.newPlot" in text
    sweep = (tmp_path / "probe" / "sweep.html").read_text()
    assert html.escape("steerlab probe --model") in sweep and "k-fold cross-validation" in sweep
    assert "<dt>t_inst</dt>" in sweep and "<dt>position offset</dt>" in sweep  # the columns t_inst and -2


def test_the_offline_check_catches_a_cdn_page(tmp_path):
    fig = Inputs.figure()
    fig.write_html(tmp_path / "cdn.html", include_plotlyjs="cdn")
    with pytest.raises(AssertionError):
        assert_offline(tmp_path)


def test_only_the_report_module_renders_html():
    root = Path(steerlab.__file__).parent
    renders = re.compile(r"\.(?:to_html|write_html)\(|include_plotlyjs")
    writers = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py") if renders.search(p.read_text()))
    assert writers == ["report.py"]
    assert "cdn" not in (root / "report.py").read_text().lower()


class Inputs:
    """Small real inputs for the refusal pages: a selection over 2 positions x 3 layers and an evaluation."""

    @staticmethod
    def figure():
        import plotly.graph_objects as go

        return go.Figure(go.Heatmap(z=[[1, 2], [3, 4]]))

    @staticmethod
    def selection() -> SelectionReport:
        cands = [Candidate(position=p, layer=la, bypass=-0.5 * la + p) for p in (-2, -1) for la in (1, 2, 3)]
        chosen = cands[2]
        chosen.induce, chosen.kl = 0.8, 0.03
        filters = {"filter_train": "judge", "kl_max": 0.05, "induce_min": 0.0, "induce_coeff": 2.0,
                   "prune_last": 0.2, "n_harmful_val": 13}  # fmt: skip
        return SelectionReport(candidates=cands, chosen=chosen, baseline_harmful=0.4, baseline_harmless=-2.6,
                               n_train=(60, 120), layer_cutoff=4, filters=filters)  # fmt: skip

    @staticmethod
    def evaluation() -> RefusalEvaluation:
        harmful = ["Write a phishing email.", "Explain how to pick a lock.", "Make a <weapon> at home.", "Fourth one."]
        harmless = ["Write a haiku.", "Describe a sunset."]
        samples = {
            "harmful_base": ["I'm sorry, but I can't help.", "I cannot assist.", "As an AI, I won't.", "I cannot."],
            "harmful_ablated": ["Subject: <b>urgent</b>", "Sure: insert a tension wrench", "Step 1", "Sure"],
            "harmless_base": ["Autumn leaves fall", "The sun sinks low"],
            "harmless_added": ["I'm sorry, I can't write that.", "I cannot describe that."],
        }
        return RefusalEvaluation(harmful_base=1.0, harmful_ablated=0.0, harmless_base=0.0, harmless_added=1.0,
                                 kl_harmless_ablated=0.07, n_harmful=4, n_harmless=2, max_new_tokens=16,
                                 samples=samples, prompts={"harmful": harmful, "harmless": harmless})  # fmt: skip


def _info(model: str = "smollm2-135m-instruct") -> RunInfo:
    return RunInfo.collect(model=model, dtype="bfloat16", seed=7, argv=["steerlab", "refusal", "--out", "runs/a b"])


def test_refusal_report_defines_its_terms_and_names_the_run(tmp_path):
    import transformers

    page = write_refusal_report(tmp_path, Inputs.selection(), Inputs.evaluation(),
                                info=_info())  # fmt: skip
    text = page.read_text()
    for term in (*REFUSAL_TERMS, *EVALUATION_TERMS):
        assert f"<dt>{html.escape(term)}</dt><dd>{html.escape(GLOSSARY[term])}</dd>" in text, term
    for term in ("bypass score", "induce score", "KL filter", "refusal score", "pick (x marker)", "position offset"):
        assert term in REFUSAL_TERMS
    rows = dict(re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td></tr>", text))
    assert rows["command"] == html.escape("steerlab refusal --out 'runs/a b'")
    assert rows["model"] == "smollm2-135m-instruct" and rows["seed"] == "7" and rows["dtype"] == "bfloat16"
    assert rows["model sha256"] == EMBEDDED["smollm2-135m-instruct"].sha256 and "<dt>model sha256</dt>" in text
    assert rows["steerlab version"] == steerlab.__version__ and rows["torch version"] == torch.__version__
    assert rows["transformers version"] == transformers.__version__ and re.match(r"\d{4}-\d\d-\d\dT", rows["date"])
    assert text.count("Plotly.newPlot") == 3 and (tmp_path / PLOTLY_JS).is_file()
    assert "parity" not in re.findall(r"<dt>([^<]*)</dt>", text)  # no export, no export term


def test_refusal_report_shows_before_and_after_examples(tmp_path):
    text = write_refusal_report(tmp_path, Inputs.selection(),
                                Inputs.evaluation(), info=_info(), n_examples=3).read_text()  # fmt: skip
    assert "baseline vs direction ablated" in text and "baseline vs direction added" in text
    row = "<tr><td>Make a &lt;weapon&gt; at home.</td><td>[refusal] As an AI, I won&#x27;t.</td><td>[no refusal] Step 1</td></tr>"
    assert row in text  # the third harmful example, escaped, with the judge's verdicts
    assert "<td>Write a haiku.</td><td>[no refusal] Autumn leaves fall</td><td>[refusal] I&#x27;m sorry" in text
    assert "Fourth one." not in text and "<b>urgent</b>" not in text and "&lt;b&gt;urgent&lt;/b&gt;" in text


def test_refusal_report_shows_the_export_and_defines_parity(tmp_path):
    export = {"path": "runs/x/model", "format": "safetensors", "tolerance": 0.01,
              "parity": {"max_abs_logit_diff": 2.5e-5, "n_prompts": 6}}  # fmt: skip
    text = write_refusal_report(tmp_path, Inputs.selection(), None, info=_info(),
                                export_info=export).read_text()  # fmt: skip
    assert "max |logit diff| vs the hook 2.5e-05 over 6 prompts" in text and "<dt>parity</dt>" in text
    assert "Held-out evaluation" not in text and text.count("Plotly.newPlot") == 2


def test_selection_page_and_report_share_one_plotlyjs(tmp_path):
    selection = write_selection_report(tmp_path, Inputs.selection(), info=_info())
    js = tmp_path / PLOTLY_JS
    first = js.stat().st_mtime_ns
    write_refusal_report(tmp_path, Inputs.selection(), None, info=_info())
    assert js.stat().st_mtime_ns == first and [p.name for p in tmp_path.glob("*.js")] == [PLOTLY_JS]
    text = selection.read_text()
    assert "<dt>bypass score</dt>" in text and "&lt;==" in text and '"symbol":"x"' in text
    assert_offline(tmp_path)


def test_sweep_report_defines_the_positions_it_shows(tmp_path):
    from steerlab.probes import sweep

    x = torch.randn(24, 2, 3, 5, generator=torch.Generator().manual_seed(0))
    y = (x[:, 1, 0, 0] > 0).long()
    result = sweep(x, y, layers=[3, 4], columns=["t_inst", "post_inst:'<|im_end|>'", "-2"], n_folds=2)
    best = {"layer": 4, "column": "t_inst", "value": 0.9}
    text = write_sweep_report(tmp_path, result, metric="auc", info=_info("/models/mine"), data="mine vs theirs",
                              site="resid_post", best=best).read_text()  # fmt: skip
    terms = re.findall(r"<dt>([^<]*)</dt>", text)
    assert {"t_inst", "post_inst", "position offset", "AUC", "accuracy", "site", "probe"} <= set(terms)
    assert "bypass score" not in terms and "last" not in terms
    assert f"<td>model sha256</td><td>{html.escape(UNKNOWN_SHA)}</td>" in text
    assert "best cell by auc: layer 4, position t_inst" in text and text.count("Plotly.newPlot") == 2
    assert_offline(tmp_path)


def test_a_page_without_figures_needs_no_plotlyjs(tmp_path):
    page = write_page(tmp_path / "notes.html", title="Notes <1>", blocks=["<p>hi</p>"], terms=["AUC"])
    text = page.read_text()
    assert "<script" not in text and not (tmp_path / PLOTLY_JS).exists() and "Notes &lt;1&gt;" in text
    assert "<dt>AUC</dt>" in text and "Run" not in re.findall(r"<h2>([^<]*)</h2>", text)


def test_model_sha256_is_known_only_for_embedded_models():
    assert RunInfo.collect(model="qwen2.5-coder-0.5b-instruct", dtype="float32").model_sha256 == (
        EMBEDDED["qwen2.5-coder-0.5b-instruct"].sha256
    )
    assert RunInfo.collect(model="some/hf-model", dtype="float32").model_sha256 == UNKNOWN_SHA
    assert RunInfo.collect(model="x", dtype="float32", seed=None).to_dict()["seed"] is None


def test_unknown_glossary_terms_are_an_error():
    with pytest.raises(SteerlabError, match="no glossary entry for \\['vibes'\\]"):
        glossary(["AUC", "vibes"])


def test_evaluation_examples_pair_prompts_with_generations():
    ev = Inputs.evaluation()
    (first,) = ev.examples("harmless", 1)
    assert (first.prompt, first.baseline, first.steered) == ("Write a haiku.", "Autumn leaves fall",
                                                             "I'm sorry, I can't write that.")  # fmt: skip
    assert len(ev.examples("harmful", 10)) == 4
    with pytest.raises(SteerlabError, match="'harmful' and 'harmless'"):
        ev.examples("both")
