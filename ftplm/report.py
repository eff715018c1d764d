"""`ftplm report`: Markdown + a self-contained HTML page (PNG plots embedded) comparing runs side by side.

`write_report(out_dir, runs, evals, samples)` is the reusable entry (the demo and `ftplm experiment paper` call it):
runs = {label: run directory} (training curves come from their log.jsonl), evals = {label: {suite: result}} as
`ftplm eval` writes them (or aggregated across seeds: the same shape, with "std"), samples = {label: [{"prompt",
"continuation"}]}. Each section appears only when its data is there. Plots: matplotlib, Agg backend.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ftplm.api import load
from ftplm.errors import FtplmError
from ftplm.train import read_log

Block = tuple  # ("h2", text) | ("p", text) | ("table", header, rows) | ("img", path, caption) | ("pre", text)
SAMPLE_PROMPTS = ["The history of", "In mathematics, a", "The city is known for"]


# ------------------------------------------------------------------------------------------------------
# formatting
# ------------------------------------------------------------------------------------------------------
def fmt(m: dict[str, Any] | None, digits: int = 4) -> str:
    """'value [lo, hi]' or 'value ± std' or 'value' for a metric dict; '-' when absent."""
    if not m or not isinstance(m.get("value"), (int, float)):
        return "-"
    v = f"{m['value']:.{digits}g}"
    if isinstance(m.get("std"), float) and m["std"] == m["std"]:
        v += f" ± {m['std']:.2g}"
    if "ci95" in m and m["ci95"][0] == m["ci95"][0]:
        v += f" [{m['ci95'][0]:.{digits}g}, {m['ci95'][1]:.{digits}g}]"
    return v


def _error(m: dict[str, Any]) -> tuple[float, float]:
    """(below, above) error-bar lengths: the CI when there is one, else ± std, else none."""
    if "ci95" in m and m["ci95"][0] == m["ci95"][0]:
        return max(0.0, m["value"] - m["ci95"][0]), max(0.0, m["ci95"][1] - m["value"])
    s = m.get("std", 0.0)
    return (s, s) if s == s else (0.0, 0.0)


def _metric(evals: dict[str, dict[str, Any]], label: str, suite: str, key: str) -> dict[str, Any] | None:
    return evals.get(label, {}).get(suite, {}).get("metrics", {}).get(key)


# ------------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(runs: dict[str, Path], path: Path) -> Path | None:
    logs = {label: read_log(run) for label, run in runs.items() if run is not None}
    logs = {k: v for k, v in logs.items() if v}
    if not logs:
        return None
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, log in logs.items():
        train = [r for r in log if "loss" in r]
        val = [r for r in log if "val" in r]
        a.plot([r["tokens"] for r in train], [r["loss"] for r in train], label=label)
        if val:
            b.plot([r["tokens"] for r in val], [r["val"]["ppl"] for r in val], marker="o", ms=3, label=label)
    a.set(xlabel="training tokens", ylabel="train loss", title="training loss")
    b.set(xlabel="training tokens", ylabel="val perplexity", title="validation perplexity", yscale="log")
    for ax in (a, b):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_curves(
    evals: dict[str, dict[str, Any]], suite: str, keys: list[tuple[str, str]], xlabel: str, path: Path
) -> Path | None:
    """Line plots of list-valued metrics (offset curves), one panel per key."""
    have = [(k, t) for k, t in keys if any(_metric(evals, lab, suite, k) for lab in evals)]
    if not have:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(have), figsize=(5 * len(have), 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], have):
        for label in evals:
            m = _metric(evals, label, suite, key)
            if m:
                xs = m.get("offsets", list(range(1, len(m["value"]) + 1)))
                ax.plot(xs, m["value"], marker=".", label=label)
                if "std" in m and isinstance(m["std"], list):
                    lo = [v - s for v, s in zip(m["value"], m["std"])]
                    hi = [v + s for v, s in zip(m["value"], m["std"])]
                    ax.fill_between(xs, lo, hi, alpha=0.2)
        ax.set(xlabel=xlabel, title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_bars(
    evals: dict[str, dict[str, Any]], suite: str, keys: list[str], title: str, path: Path, ylabel: str = ""
) -> Path | None:
    """Grouped bars (one group per metric, one bar per label) with CI or std error bars."""
    keys = [k for k in keys if any(_metric(evals, lab, suite, k) for lab in evals)]
    labels = [lab for lab in evals if any(_metric(evals, lab, suite, k) for k in keys)]
    if not keys or not labels:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(keys) * max(1, len(labels)) / 2 + 2), 3.8))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        ms = [_metric(evals, label, suite, k) or {"value": float("nan")} for k in keys]
        errs = list(zip(*[_error(m) for m in ms]))
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(keys))]
        ax.bar(xs, [m["value"] for m in ms], width, yerr=errs, capsize=3, label=label)
    ax.set_xticks(range(len(keys)), keys, rotation=20, ha="right", fontsize=8)
    ax.set(title=title, ylabel=ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


# ------------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------------
SECTIONS = [
    # (suite, title, metric keys for the table, plot kind, plot keys)
    ("ppl", "Validation perplexity", ["ppl", "next_token_ce"], None, None),
    (
        "smoothness",
        "(a) Smoothness of state vectors",
        ["adjacent_cosine", "adjacent_cosine_centered"],
        "curve",
        [("offset_curve", "cosine(h_t, h_t+k), raw"), ("offset_curve_centered", "cosine(h_t, h_t+k), mean-centred")],
    ),
    (
        "coherence",
        "(b) Topic coherence of generated text (MiniLM judge)",
        ["prompt_continuation_cos", "half_half_cos", "distinct_2", "repeated_4gram_rate", "continuation_tokens"],
        "bars",
        ["prompt_continuation_cos", "half_half_cos", "distinct_2", "repeated_4gram_rate"],
    ),
    (
        "classify",
        "(c) Topic classification from frozen vectors (5-fold CV accuracy)",
        [
            "wiki-vital/mean",
            "wiki-vital/last",
            "wiki-vital/tfidf",
            "wiki-vital/majority",
            "bbc-news/mean",
            "bbc-news/last",
            "bbc-news/tfidf",
            "bbc-news/majority",
        ],
        "bars",
        ["wiki-vital/mean", "wiki-vital/last", "wiki-vital/tfidf", "bbc-news/mean", "bbc-news/last", "bbc-news/tfidf"],
    ),
    (
        "coding",
        "(d) Planning-ahead coding task (pass@1, greedy)",
        ["pass@1", "declared_correct", "pass@1/range", "pass@1/words", "pass@1/squares"],
        "bars",
        ["pass@1", "declared_correct", "pass@1/range", "pass@1/words", "pass@1/squares"],
    ),
    (
        "retrieval",
        "Retrieval (first sentence -> rest of article)",
        ["recall@1", "recall@10", "mrr", "judge_recall@1"],
        None,
        None,
    ),
]


def write_report(
    out_dir: str | Path,
    runs: Mapping[str, str | Path | None] | None = None,
    evals: dict[str, dict[str, Any]] | None = None,
    samples: dict[str, list[dict[str, str]]] | None = None,
    title: str = "ftplm report: FTP vs GPT",
    notes: list[str] | None = None,
    extra_tables: list[tuple[str, list[str], list[list[str]]]] | None = None,
) -> dict[str, Path]:
    """Write OUT/report.md, OUT/report.html (plots embedded) and OUT/plots/*.png; returns their paths."""
    out = Path(out_dir)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    run_paths = {k: Path(v) for k, v in (runs or {}).items() if v is not None}
    evals = evals or {}
    labels = list(dict.fromkeys([*run_paths, *evals]))
    blocks: list[Block] = [("h1", title)]
    blocks += [("p", n) for n in notes or []]
    if run_paths:
        blocks.append(("p", "Runs: " + "; ".join(f"**{k}** = `{v}`" for k, v in run_paths.items())))
    for caption, header, rows in extra_tables or []:
        blocks += [("h2", caption), ("table", header, rows)]

    if (png := plot_training(run_paths, plots / "training.png")) is not None:
        blocks += [
            ("h2", "Training curves"),
            ("img", png, "training loss and validation perplexity against training tokens"),
        ]
    for suite_name, section, table_keys, kind, plot_keys in SECTIONS:
        present = [lab for lab in labels if suite_name in evals.get(lab, {})]
        if not present:
            continue
        blocks.append(("h2", section))
        rows = [
            [k] + [fmt(_metric(evals, lab, suite_name, k)) for lab in present]
            for k in table_keys
            if any(_metric(evals, lab, suite_name, k) for lab in present)
        ]
        blocks.append(("table", ["metric", *present], rows))
        sub = {lab: evals[lab] for lab in present}
        if kind == "curve":
            png = plot_curves(sub, suite_name, plot_keys, "offset k (positions)", plots / f"{suite_name}.png")  # type: ignore[arg-type]  # curve suites list (key, label) pairs
        elif kind == "bars":
            png = plot_bars(sub, suite_name, plot_keys, section, plots / f"{suite_name}.png")  # type: ignore[arg-type]  # bar suites list keys
        else:
            png = None
        if png is not None:
            blocks.append(("img", png, section))
        if suite_name == "ppl":
            ftp = {lab: sub[lab] for lab in present if _metric(sub, lab, "ppl", "offset_acc")}
            if (
                ftp
                and (
                    png := plot_curves(
                        ftp,
                        "ppl",
                        [
                            ("offset_acc", "FTP decoder accuracy at offset k"),
                            ("offset_ce", "FTP decoder CE at offset k"),
                        ],
                        "offset k (tokens ahead)",
                        plots / "ftp_offsets.png",
                    )
                )
                is not None
            ):
                rows = [
                    [lab, " / ".join(f"{a:.3f}" for a in _metric(ftp, lab, "ppl", "offset_acc")["value"])]  # type: ignore[index]  # present: ftp is filtered on it
                    for lab in ftp
                ]
                blocks += [
                    ("h3", "FTP per-offset accuracy"),
                    ("table", ["run", "accuracy at k = 1..N"], rows),
                    ("img", png, "FTP per-offset accuracy and CE"),
                ]
        details = [(lab, evals[lab][suite_name]) for lab in present]
        blocks.append(
            (
                "p",
                "; ".join(
                    f"{lab}: n = {r.get('n', '?')}"
                    + (f", checkpoint `{r['checkpoint']}`" if r.get("checkpoint") else "")
                    for lab, r in details
                ),
            )
        )

    samples = samples or {
        lab: evals[lab]["coherence"]["examples"]
        for lab in labels
        if evals.get(lab, {}).get("coherence", {}).get("examples")
    }
    if samples:
        blocks.append(("h2", "Samples side by side (temperature 0.8, top-k 50)"))
        n = max(len(v) for v in samples.values())
        for i in range(min(3, n)):
            prompt = next((v[i]["prompt"] for v in samples.values() if len(v) > i), "")
            blocks.append(
                (
                    "table",
                    ["prompt", *samples],
                    [[prompt] + [v[i]["continuation"] if len(v) > i else "" for v in samples.values()]],
                )
            )
    md, page = render_markdown(blocks, out), render_html(blocks, title)
    paths = {"md": out / "report.md", "html": out / "report.html"}
    paths["md"].write_text(md, encoding="utf-8")
    paths["html"].write_text(page, encoding="utf-8")
    return paths


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block], out: Path) -> str:
    lines: list[str] = []
    for b in blocks:
        if b[0] in ("h1", "h2", "h3"):
            lines += ["#" * int(b[0][1]) + " " + b[1], ""]
        elif b[0] == "p":
            lines += [b[1], ""]
        elif b[0] == "table":
            lines += ["| " + " | ".join(_cell(h) for h in b[1]) + " |", "|" + "---|" * len(b[1])]
            lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in b[2]] + [""]
        elif b[0] == "img":
            lines += [f"![{b[2]}]({Path(b[1]).relative_to(out).as_posix()})", ""]
    return "\n".join(lines)


def render_html(blocks: list[Block], title: str) -> str:
    """One file, nothing external: plots as base64 data URIs."""

    def inline(text: str) -> str:
        t = html.escape(text)
        t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", t)

    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:4px 8px;"
        "vertical-align:top;font-size:14px}th{background:#f4f4f4}img{max-width:100%}code{background:#f4f4f4}"
        "</style></head><body>"
    ]
    for b in blocks:
        if b[0] in ("h1", "h2", "h3"):
            parts.append(f"<{b[0]}>{html.escape(b[1])}</{b[0]}>")
        elif b[0] == "p":
            parts.append(f"<p>{inline(b[1])}</p>")
        elif b[0] == "table":
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in b[2])
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        elif b[0] == "img":
            data = base64.b64encode(Path(b[1]).read_bytes()).decode()
            parts.append(
                f"<figure><img alt='{html.escape(b[2])}' src='data:image/png;base64,{data}'><figcaption>{html.escape(b[2])}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------------
# `ftplm report` inputs: run directories and/or eval JSON files
# ------------------------------------------------------------------------------------------------------
def collect(inputs: list[str]) -> tuple[dict[str, Path | None], dict[str, dict[str, Any]]]:
    """Runs and evals from run directories and `ftplm eval --json` files (a file may hold several runs)."""
    runs: dict[str, Path | None] = {}
    evals: dict[str, dict[str, Any]] = {}
    for item in inputs:
        path = Path(item)
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                entries = data["runs"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise FtplmError(f"{path} is not an `ftplm eval --json` file") from None
            for label, entry in entries.items():
                label = _unique(label, runs)
                run = Path(entry.get("run", ""))
                runs[label] = run if (run / "log.jsonl").is_file() else None
                evals[label] = entry.get("suites", {})
        elif path.is_dir():
            if not (path / "config.json").exists() and not (path / "log.jsonl").exists():
                raise FtplmError(f"{path} is neither a run directory nor an eval JSON file")
            runs[_unique(path.name, runs)] = path
        else:
            raise FtplmError(f"no such run directory or eval JSON file: {path}")
    return runs, evals


def _unique(label: str, taken: dict[str, Any]) -> str:
    while label in taken:
        label += "'"
    return label


def quick_samples(runs: dict[str, Path | None], max_new_tokens: int = 48) -> dict[str, list[dict[str, str]]]:
    """Three continuations per loadable run (temperature 0.8, top-k 50, seed 0) when no eval brought samples."""
    out: dict[str, list[dict[str, str]]] = {}
    for label, run in runs.items():
        if run is None or not (run / "config.json").exists():
            continue
        tm = load(run)
        out[label] = [
            {"prompt": p, "continuation": tm.generate(p, max_new_tokens, temperature=0.8, top_k=50, seed=0)}
            for p in SAMPLE_PROMPTS
        ]
    return out


def report(inputs: list[str], out_dir: str | Path, title: str = "ftplm report: FTP vs GPT") -> dict[str, Path]:
    """`ftplm report`: collect the inputs, add samples if no coherence eval brought any, write the report."""
    runs, evals = collect(inputs)
    has_samples = any(e.get("coherence", {}).get("examples") for e in evals.values())
    samples = None if has_samples else quick_samples(runs)
    return write_report(out_dir, runs, evals, samples, title)
