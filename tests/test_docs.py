"""Results pages are generated from the committed summary JSON, never hand-kept."""

from __future__ import annotations

import json
from pathlib import Path

from ftplm.cli import main
from ftplm.experiment import CLAIMS_PAGE, claims_page

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_committed_claims_page_is_what_the_json_generates():
    assert (DOCS / CLAIMS_PAGE).read_text(encoding="utf-8") == claims_page(DOCS), "run `ftplm docs`"


def _summary(value: float) -> dict:
    diff = {"value": value, "ci95": [value - 0.01, value + 0.01], "n": 10, "verdict": "FTP higher"}
    return {"command": "ftplm experiment paper --out x", "machine": "test CPU", "date": "2026-12-06", "preset": "tiny",
            "seeds": 3, "max_tokens": 1000, "equal_flops_tokens": 1600,
            "claims": [{"claim": "(a) smoother state vectors", "metric": "adjacent_cosine", "gpt-matched": diff}],
            "variant_claims": {"ftp-bow": [{"claim": "(a) smoother state vectors", "metric": "adjacent_cosine",
                                            "gpt-matched": {**diff, "value": -value, "verdict": "FTP lower"}}]}}


def test_docs_command_writes_and_checks(tmp_path, capsys):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "summary.json").write_text(json.dumps(_summary(0.25)))
    assert main(["docs", "--docs-dir", str(tmp_path), "--check"]) == 2  # no page yet
    assert main(["docs", "--docs-dir", str(tmp_path)]) in (0, None)
    page = (tmp_path / CLAIMS_PAGE).read_text()
    assert "+0.2500 [+0.2400, +0.2600] (FTP higher)" in page and "FTP bow" in page and "-0.2500" in page
    assert "test CPU" in page and "3 seed(s), 1,000 training tokens" in page
    assert main(["docs", "--docs-dir", str(tmp_path), "--check"]) in (0, None)
    (tmp_path / "exp" / "summary.json").write_text(json.dumps(_summary(0.5)))  # the JSON changed: the page is stale
    capsys.readouterr()
    assert main(["docs", "--docs-dir", str(tmp_path), "--check"]) == 2
    assert "out of date" in capsys.readouterr().err
