"""`ftplm report` / write_report: Markdown + self-contained HTML with embedded PNG plots, from runs and eval files."""

from __future__ import annotations

import base64
import json
import re

import pytest

from ftplm.cli import main
from ftplm.errors import FtplmError


def _evals(offset: float = 0.0) -> dict:
    return {
        "ppl": {
            "n": 100,
            "checkpoint": "/x/step_1",
            "metrics": {
                "ppl": {"value": 50.0 + offset, "ci95": [48.0, 52.0], "n": 100},
                "offset_acc": {"value": [0.3, 0.2, 0.1, 0.05], "offsets": [1, 2, 3, 4], "n": 100},
                "offset_ce": {"value": [3.0, 4.0, 4.5, 5.0], "offsets": [1, 2, 3, 4], "n": 100},
            },
        },
        "smoothness": {
            "n": 10,
            "metrics": {
                "adjacent_cosine": {"value": 0.9, "ci95": [0.88, 0.92], "n": 500},
                "offset_curve": {"value": [0.9 - 0.01 * k for k in range(32)], "offsets": list(range(1, 33))},
            },
        },
        "coherence": {
            "n": 3,
            "metrics": {"prompt_continuation_cos": {"value": 0.3 + offset, "ci95": [0.2, 0.4], "n": 3}},
            "examples": [{"prompt": f"prompt {i} <b>|x", "continuation": f"cont {i} {offset}"} for i in range(3)],
        },
        "classify": {"n": 60, "metrics": {"wiki-vital/mean": {"value": 0.5, "std": 0.05, "n": 60, "folds": [0.5] * 5}}},
        "coding": {"n": 500, "metrics": {"pass@1": {"value": 0.1, "ci95": [0.08, 0.12], "n": 500}}},
    }


def _check_html(path):
    page = path.read_text()
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert images and all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert not re.search(r"(src|href)=['\"](?!data:)", page)  # nothing external
    return page


def test_write_report_all_sections(tiny_ftp_run, tiny_gpt_run, tmp_path):
    from ftplm.report import write_report

    paths = write_report(
        tmp_path / "r",
        {"FTP": tiny_ftp_run, "GPT": tiny_gpt_run},
        {"FTP": _evals(), "GPT": _evals(0.1)},
        notes=["budget: tiny"],
        extra_tables=[("Extra", ["a", "b"], [["1", "2"]])],
    )
    md = paths["md"].read_text()
    for title in (
        "Training curves",
        "Validation perplexity",
        "FTP per-offset accuracy",
        "(a) Smoothness",
        "(b) Topic coherence",
        "(c) Topic classification",
        "(d) Planning-ahead coding",
        "Samples side by side",
        "Extra",
    ):
        assert title in md, title
    assert "| ppl | 50 [48, 52] | 50.1 [48, 52] |" in md
    assert "| wiki-vital/mean | 0.5 ± 0.05 | 0.5 ± 0.05 |" in md
    assert "prompt 0 <b>\\|x" in md  # table cells escaped
    for png in re.findall(r"\]\((plots/[^)]+\.png)\)", md):
        assert (tmp_path / "r" / png).is_file()
    assert {p.name for p in (tmp_path / "r" / "plots").iterdir()} == {
        "training.png",
        "smoothness.png",
        "coherence.png",
        "classify.png",
        "coding.png",
        "ftp_offsets.png",
    }
    page = _check_html(paths["html"])
    assert "prompt 0 &lt;b&gt;|x" in page and "cont 2 0.1" in page


def test_report_command_from_eval_json_and_runs(tiny_ftp_run, tiny_gpt_run, tmp_path, capsys):
    ev = tmp_path / "e.json"
    ev.write_text(
        json.dumps(
            {
                "runs": {
                    "ftp": {"run": str(tiny_ftp_run), "suites": _evals()},
                    "gpt": {"run": str(tiny_gpt_run), "suites": _evals(0.2)},
                }
            }
        )
    )
    assert main(["report", str(ev), "--out", str(tmp_path / "a")]) == 0
    md = (tmp_path / "a" / "report.md").read_text()
    assert "Training curves" in md and "| metric | ftp | gpt |" in md
    _check_html(tmp_path / "a" / "report.html")
    # run directories alone: training curves and fresh samples, no eval sections
    assert main(["report", str(tiny_ftp_run), str(tiny_gpt_run), "--out", str(tmp_path / "b")]) == 0
    md = (tmp_path / "b" / "report.md").read_text()
    assert "Training curves" in md and "Samples side by side" in md and "(a) Smoothness" not in md
    assert md.count("The history of") == 1


def test_report_bad_input(tmp_path, capsys):
    from ftplm.report import collect

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(FtplmError, match="not an `ftplm eval --json` file"):
        collect([str(bad)])
    with pytest.raises(FtplmError, match="no such run"):
        collect([str(tmp_path / "missing")])
    (tmp_path / "plain").mkdir()
    with pytest.raises(FtplmError, match="neither a run"):
        collect([str(tmp_path / "plain")])
    assert main(["report", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert not (tmp_path / "o").exists()
