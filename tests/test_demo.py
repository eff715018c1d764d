"""The main job end to end, shrunk: tiny preset, a few seconds of training per model."""

import json

from ftplm.demo import run_demo


def test_demo_end_to_end(tmp_path, tiny_corpus, capsys):
    sizes = {
        "ppl_batches": 2,
        "smoothness_docs": 8,
        "coherence_prompts": 2,
        "coherence_new_tokens": 16,
        "classify_docs": 60,
    }
    summary = run_demo(tmp_path / "demo", budget_s=3, corpus=str(tiny_corpus), preset="tiny", eval_options=sizes)
    out = capsys.readouterr().out
    assert "FTP" in out and "GPT" in out and "val perplexity" in out
    saved = json.loads((tmp_path / "demo" / "summary.json").read_text())
    for name in ("ftp", "gpt"):
        r = saved["results"][name]
        assert r["steps"] > 0 and r["val_ppl"] > 1
        assert (tmp_path / "demo" / name / "model.safetensors").exists()
    assert len(saved["results"]["ftp"]["offset_acc"]) == 4
    report_md = (tmp_path / "demo" / "report.md").read_text()
    assert report_md.startswith("# ftplm demo") and "Side by side" in report_md and "val perplexity" in report_md
    page = (tmp_path / "demo" / "report.html").read_text()
    assert "data:image/png;base64," in page  # self-contained: plots embedded
    assert (tmp_path / "demo" / "plots" / "training.png").stat().st_size > 0
    assert (tmp_path / "demo" / "plots" / "smoothness.png").stat().st_size > 0
    assert summary["samples"]["ftp"] and summary["samples"]["gpt"]
    for suite_name in ("ppl", "smoothness", "coherence", "classify"):
        assert saved["results"]["ftp"]["suites"][suite_name]["metrics"], suite_name
    spec = saved["speculative"]
    assert spec["identical"] and spec["tau"] >= 1 and spec["speedup"] > 0  # lossless on the trained model
