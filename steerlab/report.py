"""HTML report pages that work offline: plotly.js beside the page, the run's metadata, a glossary.

Every page goes through :func:`write_page`. Figures load ``plotly.min.js`` from the page's own folder
(one copy per folder, taken from the installed plotly package), so no page fetches anything from the
network. Each page ends with the run's metadata (:class:`RunInfo`) and the definitions of the terms it
shows (:data:`steerlab.glossary.GLOSSARY`).

Example:
    >>> import tempfile, torch
    >>> from steerlab.probes import sweep
    >>> x = torch.randn(40, 2, 1, 8)
    >>> result = sweep(x, (x[:, 1, 0, 0] > 0).long(), layers=[13, 14], columns=["last"], n_folds=2)
    >>> layer, column, value = result.best()
    >>> info = RunInfo.collect(model="smollm2-135m-instruct", dtype="float32", seed=0)
    >>> page = write_sweep_report(tempfile.mkdtemp(), result, metric="accuracy", info=info, data="my prompts",
    ...                           site="resid_pre", best={"layer": layer, "column": column, "value": value})
    >>> page.name, (page.parent / "plotly.min.js").is_file()
    ('sweep.html', True)
"""

from __future__ import annotations

import html
import importlib.metadata
import platform
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steerlab.errors import SteerlabError
from steerlab.glossary import EVALUATION_TERMS, GLOSSARY, REFUSAL_TERMS

if TYPE_CHECKING:
    from steerlab.probes.sweep import SweepResult
    from steerlab.steering.evaluate import Example, RefusalEvaluation
    from steerlab.steering.refusal import SelectionReport

PLOTLY_JS = "plotly.min.js"
UNKNOWN_SHA = "unknown (only embedded models have a known sha256)"

class UnknownTermError(SteerlabError, ValueError):
    """A page asked for a glossary term that has no definition."""


# ----- metadata -----
def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def model_sha256(name: str | None) -> str:
    """The sha256 of an embedded model's GGUF, or :data:`UNKNOWN_SHA` for any other model."""
    from steerlab.embedded import DEFAULT_MODEL, EMBEDDED

    entry = EMBEDDED.get(name or DEFAULT_MODEL)
    return entry.sha256 if entry is not None else UNKNOWN_SHA


@dataclass(frozen=True)
class RunInfo:
    """What produced a report: command line, model, dtype, seed, date and library versions."""

    command: str
    model: str
    model_sha256: str
    dtype: str
    seed: int | None
    date: str
    versions: dict[str, str] = field(default_factory=dict)

    @classmethod
    def collect(cls, *, model: str, dtype: str, seed: int | None = None, argv: Sequence[str] | None = None) -> RunInfo:
        """Metadata of the current process; ``argv`` defaults to ``sys.argv``."""
        import steerlab

        return cls(
            command=shlex.join(list(argv) if argv is not None else sys.argv),
            model=model,
            model_sha256=model_sha256(model),
            dtype=dtype,
            seed=seed,
            date=datetime.now().astimezone().isoformat(timespec="seconds"),
            versions={
                "steerlab": steerlab.__version__,
                "torch": _version("torch"),
                "transformers": _version("transformers"),
                "plotly": _version("plotly"),
                "python": platform.python_version(),
            },
        )

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs for the metadata table."""
        rows = [("command", self.command), ("model", self.model), ("model sha256", self.model_sha256),
                ("dtype", self.dtype), ("seed", "not used" if self.seed is None else str(self.seed)),
                ("date", self.date)]  # fmt: skip
        return rows + [(f"{name} version", value) for name, value in self.versions.items()]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


# ----- page pieces -----
def pre(text: str) -> str:
    """Preformatted text."""
    return f"<pre>{html.escape(text)}</pre>"


def heading(text: str) -> str:
    """A section heading."""
    return f"<h2>{html.escape(text)}</h2>"


def paragraph(text: str) -> str:
    """A paragraph of plain text."""
    return f"<p>{html.escape(text)}</p>"


def table(rows: Sequence[Sequence[str]], *, header: Sequence[str] | None = None) -> str:
    """An HTML table of plain-text cells."""

    def row(cells: Sequence[str], tag: str) -> str:
        return "<tr>" + "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in cells) + "</tr>"

    head = row(header, "th") if header else ""
    return "<table>" + head + "".join(row(r, "td") for r in rows) + "</table>"


def glossary(terms: Sequence[str]) -> str:
    """The definitions of ``terms`` (keys of :data:`GLOSSARY`) as a definition list."""
    unknown = [t for t in terms if t not in GLOSSARY]
    if unknown:
        raise UnknownTermError(f"no glossary entry for {unknown}; add a definition to steerlab.glossary.GLOSSARY")
    items = "".join(f"<dt>{html.escape(t)}</dt><dd>{html.escape(GLOSSARY[t])}</dd>" for t in dict.fromkeys(terms))
    return f"{heading('Glossary')}<dl>{items}</dl>"


def _figure(fig: Any) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, default_height="480px")


_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
    "text-align:left;vertical-align:top;white-space:pre-wrap}dt{font-weight:bold;margin-top:0.5em}"
    "pre{white-space:pre-wrap}"
)


def write_plotlyjs(folder: str | Path) -> Path:
    """``folder/plotly.min.js`` from the installed plotly package (written only when missing or different)."""
    from plotly.offline import get_plotlyjs

    path = Path(folder) / PLOTLY_JS
    data = get_plotlyjs().encode("utf-8")
    if not (path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data):
        path.write_bytes(data)
    return path


def write_page(
    path: str | Path,
    *,
    title: str,
    blocks: Sequence[Any],
    info: RunInfo | None = None,
    terms: Sequence[str] = (),
) -> Path:
    """Write one HTML page: ``blocks`` (HTML strings or plotly figures) in order, then the glossary of
    ``terms`` and the run's metadata. Figures load ``plotly.min.js`` from the page's folder, which is
    written there once; the page loads nothing from the network."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    has_figures = any(not isinstance(b, str) for b in blocks)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>",
        f"<script src='{PLOTLY_JS}'></script>" if has_figures else "",
        f"</head><body><h1>{html.escape(title)}</h1>",
    ]
    parts += [b if isinstance(b, str) else _figure(b) for b in blocks]
    terms = [*terms, "model sha256"] if info is not None else list(terms)
    if terms:
        parts.append(glossary(terms))
    if info is not None:
        parts += [heading("Run"), table(info.rows())]
    parts.append("</body></html>")
    if has_figures:
        write_plotlyjs(path.parent)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# ----- probe sweep -----
def _position_terms(columns: Sequence[str]) -> list[str]:
    """Glossary entries for the position names among sweep ``columns``."""
    terms = []
    for col in columns:
        name = col.split(":")[0].split("[")[0]
        if name in GLOSSARY:
            terms.append(name)
        elif name.lstrip("-").isdigit():
            terms.append("position offset")
    return list(dict.fromkeys(terms))


def write_sweep_report(
    folder: str | Path,
    result: SweepResult,
    *,
    metric: str,
    info: RunInfo,
    data: str,
    site: str,
    best: dict[str, Any],
) -> Path:
    """``folder/sweep.html``: heatmaps of the chosen metric and the other one, what was swept, the best cell."""
    other = "auc" if metric == "accuracy" else "accuracy"
    summary = (
        f"data: {data} ({result.n_samples} prompts)\nsite: {site}\n"
        f"best cell by {metric}: layer {best['layer']}, position {best['column']} ({metric} {best['value']:.3f}, "
        f"{result.n_folds}-fold CV)"
    )
    terms = ["probe", "k-fold cross-validation", "accuracy", "AUC", "site", "layer", "best cell", "direction"]
    return write_page(
        Path(folder) / "sweep.html",
        title=f"Probe sweep: {info.model}",
        blocks=[pre(summary), result.figure(metric), result.figure(other)],
        info=info,
        terms=terms + _position_terms(result.columns),
    )


# ----- refusal direction -----
def _bypass_lines(report: SelectionReport) -> Any:
    """Bypass score by layer, one line per position, with the baseline as a dashed line."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for pos in sorted({c.position for c in report.candidates}):
        cands = sorted((c for c in report.candidates if c.position == pos), key=lambda c: c.layer)
        fig.add_trace(go.Scatter(x=[c.layer for c in cands], y=[c.bypass for c in cands], mode="lines+markers",
                                 name=f"position {pos}"))  # fmt: skip
    fig.add_hline(y=report.baseline_harmful, line_dash="dash", annotation_text="baseline (no ablation)")
    fig.update_layout(title="Bypass score: refusal score of harmful validation prompts with each candidate ablated "
                            "(lower: refusal removed)", xaxis_title="layer", yaxis_title="mean refusal score")  # fmt: skip
    return fig


def _rate_bars(result: RefusalEvaluation) -> Any:
    """Held-out refusal rates, baseline vs steered."""
    import plotly.graph_objects as go

    sets = ["harmful (held out), direction ablated", "harmless (test), direction added"]
    fig = go.Figure([
        go.Bar(name="baseline", x=sets, y=[result.harmful_base, result.harmless_base]),
        go.Bar(name="steered", x=sets, y=[result.harmful_ablated, result.harmless_added]),
    ])  # fmt: skip
    fig.update_layout(title=f"Refusal rate, baseline vs steered (KL on harmless prompts {result.kl_harmless_ablated:.3f})",
                      yaxis_title="refusal rate", yaxis_range=[0, 1], barmode="group")  # fmt: skip
    return fig


def _examples(examples: Sequence[Example], steered: str) -> str:
    """A table of prompts with their baseline and steered generations, each marked by the refusal judge."""
    from steerlab.eval.refusal import is_refusal

    mark = lambda text: f"[{'refusal' if is_refusal(text) else 'no refusal'}] {text}"
    return table(
        [(e.prompt, mark(e.baseline), mark(e.steered)) for e in examples], header=["prompt", "baseline", steered]
    )


def _selection_summary(report: SelectionReport) -> str:
    f = report.filters
    return (
        f"Filters: induce score > {f.get('induce_min'):g} (addition coefficient {f.get('induce_coeff'):g}), "
        f"KL < {f.get('kl_max'):g}; train filter '{f.get('filter_train')}'; "
        f"{f.get('n_harmful_val')} harmful validation prompts kept."
    )


def write_selection_report(folder: str | Path, report: SelectionReport, *, info: RunInfo) -> Path:
    """``folder/selection.html``: the bypass heatmap of every candidate with the pick marked, and the table."""
    return write_page(
        Path(folder) / "selection.html",
        title=f"Refusal direction selection: {info.model}",
        blocks=[paragraph(_selection_summary(report)), report.heatmap(), pre(report.table())],
        info=info,
        terms=REFUSAL_TERMS,
    )


def write_refusal_report(
    folder: str | Path,
    report: SelectionReport,
    result: RefusalEvaluation | None,
    *,
    info: RunInfo,
    export_info: dict[str, Any] | None = None,
    n_examples: int = 3,
) -> Path:
    """``folder/report.html``: selection (table and figures), held-out evaluation with example generations,
    export parity when there was an export."""
    blocks: list[Any] = [heading("Selection"), paragraph(_selection_summary(report)), pre(report.table()),
                         report.heatmap(), _bypass_lines(report)]  # fmt: skip
    terms = list(REFUSAL_TERMS)
    if result is not None:
        blocks += [heading("Held-out evaluation"), pre(result.as_table()), _rate_bars(result)]
        blocks += [heading("Examples: harmful prompts, baseline vs direction ablated"),
                   _examples(result.examples("harmful", n_examples), "direction ablated"),
                   heading("Examples: harmless prompts, baseline vs direction added"),
                   _examples(result.examples("harmless", n_examples), "direction added"),
                   paragraph(f"The first {n_examples} prompts of each evaluated set, greedy, at most "
                             f"{result.max_new_tokens} new tokens; [refusal] is the substring judge's verdict.")]  # fmt: skip
        terms += EVALUATION_TERMS
    if export_info is not None:
        rep = export_info["parity"]
        blocks += [heading("Export"), pre(
            f"exported ablated weights ({export_info['format']}) to {export_info['path']}\nparity: max |logit diff| "
            f"vs the hook {rep['max_abs_logit_diff']:.3g} over {rep['n_prompts']} prompts (tolerance {export_info['tolerance']:g})"
        )]  # fmt: skip
        terms.append("parity")
    return write_page(Path(folder) / "report.html", title=f"Refusal direction: {info.model}", blocks=blocks,
                      info=info, terms=terms)  # fmt: skip
