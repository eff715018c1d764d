"""Results pages are generated from the committed JSON, never hand-kept; every link in the docs leads somewhere."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ftplm.cli import main
from ftplm.results import README_BEGIN, README_END, RESULTS_PAGE, generated_pages

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_committed_results_pages_are_what_the_json_generates():
    for page, text in generated_pages(DOCS, ROOT / "README.md").items():
        assert page.read_text(encoding="utf-8") == text, f"{page} is stale: run `ftplm docs`"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", [ROOT / "README.md", *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page):
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", page.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: link to missing {target}"
        if anchor and path.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), flags=re.M)
            assert anchor in {_slug(h) for h in headings}, f"{page.name}: no heading #{anchor} in {target or page.name}"


def _summary(value: float) -> dict:
    diff = {"value": value, "ci95": [value - 0.01, value + 0.01], "n": 10, "verdict": "FTP higher"}
    return {
        "command": "ftplm experiment paper --out x",
        "machine": "test CPU",
        "date": "2026-12-06",
        "preset": "tiny",
        "seeds": 3,
        "max_tokens": 1000,
        "equal_flops_tokens": 1600,
        "claims": [{"claim": "(a) smoother state vectors", "metric": "adjacent_cosine", "gpt-matched": diff}],
        "variant_claims": {
            "ftp-bow": [
                {
                    "claim": "(a) smoother state vectors",
                    "metric": "adjacent_cosine",
                    "gpt-matched": {**diff, "value": -value, "verdict": "FTP lower"},
                }
            ]
        },
    }


def _bench_train() -> dict:
    model = {"tokens_per_s": 1000.0, "mfu": 0.5, "memory": {"step_mb": 10, "peak_mb": 20}}
    return {
        "command": "ftplm bench train --preset tiny --json t.json",
        "machine": "test CPU",
        "date": "2026-12-06",
        "preset": "tiny",
        "dtype": "fp32",
        "batch_size": 4,
        "block_size": 64,
        "ftp_over_gpt": 0.5,
        "models": {"gpt": {**model, "tokens_per_s": 2000.0}, "ftp": model},
    }


def test_docs_command_writes_and_checks(tmp_path, capsys):
    docs, readme = tmp_path / "docs", tmp_path / "README.md"
    (docs / "exp").mkdir(parents=True)
    (docs / "bench").mkdir()
    (docs / "exp" / "summary.json").write_text(json.dumps(_summary(0.25)))
    (docs / "exp" / "notes.md").write_text("A hand-written reading.\n")
    (docs / "exp-bow").mkdir()  # an experiment whose FTP model is a variant for every run: named by its fields
    (docs / "exp-bow" / "summary.json").write_text(
        json.dumps(
            {**_summary(0.1), "model_overrides": {"future_bow": 0.5}, "eval_machines": ["other CPU", "test CPU"]}
        )
    )  # one of its seeds evaluated on another machine (reused from OUT/evals): named beside the summary's
    (docs / "bench" / "train-tiny.json").write_text(json.dumps(_bench_train()))
    readme.write_text(f"# x\n\n{README_BEGIN}\nold\n{README_END}\n\nmore\n")
    args = ["docs", "--docs-dir", str(docs), "--readme", str(readme)]
    assert main([*args, "--check"]) == 2  # no results page yet
    assert main(args) in (0, None)
    page = (docs / RESULTS_PAGE).read_text()
    assert "+0.2500 [+0.2400, +0.2600] (FTP higher)" in page and "FTP bow" in page and "-0.2500" in page
    assert "test CPU" in page and "3 seed(s)" in page and "A hand-written reading." in page
    assert "**FTP as designed**" in page and "**FTP (future_bow = 0.5)**" in page
    assert page.count("some seeds evaluated on") == 1 and "test CPU (some seeds evaluated on other CPU)" in page
    assert "ftplm bench train --preset tiny" in page and "| 0.50 |" in page and "7.2 / 3.6" in page  # M tokens/hour
    text = readme.read_text()
    assert "old" not in text and "+0.250 (higher)" in text and "-0.250 (lower)" in text and text.endswith("more\n")
    assert "| FTP (future_bow = 0.5) |" in text
    assert main([*args, "--check"]) in (0, None)
    (docs / "exp" / "summary.json").write_text(json.dumps(_summary(0.5)))  # the JSON changed: the pages are stale
    capsys.readouterr()
    assert main([*args, "--check"]) == 2
    assert "out of date" in capsys.readouterr().err
    (docs / "bench" / "other.json").write_text("{}")  # not a benchmark's JSON: one line, exit 2
    assert main(args) == 2
    assert "not the JSON of" in capsys.readouterr().err
