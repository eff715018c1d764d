"""`ftplm demo`: the main job, end to end on the embedded default corpus in about ten minutes on 2 CPU cores.

prepare wiki-vital -> train FTP and GPT (same data, same time budget) -> evaluate both -> sample from both
-> runs/demo/{summary.json, report.md} and a side-by-side table on the terminal.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ftplm.api import load
from ftplm.checkpoint import write_json
from ftplm.data import TokenData, prepare
from ftplm.train import evaluate, train

DEMO_PROMPTS = ["The history of", "In mathematics, a"]


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def prepare_once(corpus: str, data_dir: Path) -> TokenData:
    """Prepare the corpus unless an identical preparation is already there."""
    meta = data_dir / "meta.json"
    if not (meta.exists() and json.loads(meta.read_text()).get("corpus") == corpus):
        prepare(corpus, data_dir)
    return TokenData(data_dir)


def run_demo(out: Path, budget_s: float, corpus: str = "wiki-vital", preset: str = "mini") -> dict[str, Any]:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    _step(f"1. prepare {corpus}")
    data = prepare_once(corpus, out / "data")
    print(f"train {data.num_tokens('train'):,} tokens, val {data.num_tokens('val'):,} tokens, vocab {data.vocab_size}")

    runs: dict[str, Path] = {}
    for model_type in ("ftp", "gpt"):
        _step(f"2. train {model_type.upper()} ({preset} preset, {budget_s:.0f}s budget)")
        run = out / model_type
        if (run / "latest").exists():  # a previous demo: start this model afresh, atomically replacing it
            import shutil

            shutil.rmtree(run)
        train(
            data.root, run, model_type=model_type, preset_name=preset,
            train_overrides={"time_budget": budget_s, "warmup_steps": 20, "eval_interval": 10**9, "save_interval": 10**9},
        )
        runs[model_type] = run

    _step("3. evaluate (validation perplexity on the same held-out windows)")
    results: dict[str, dict[str, Any]] = {}
    models = {name: load(path) for name, path in runs.items()}
    for name, model in models.items():
        state = json.loads((runs[name] / "trainer_state.json").read_text())
        val = evaluate(model.model, data, batch_size=8, iters=40)
        results[name] = {
            "params": model.model.num_params(),
            "steps": state["step"],
            "tokens": state["tokens"],
            "train_seconds": state["elapsed"],
            "val_ppl": val["ppl"],
            "offset_acc": val.get("offset_acc"),
        }

    _step("4. samples (greedy, then temperature 0.8 / top-k 50)")
    samples: dict[str, dict[str, str]] = {name: {} for name in models}
    for prompt in DEMO_PROMPTS:
        for name, model in models.items():
            greedy = model.generate(prompt, max_new_tokens=40, temperature=0)
            sampled = model.generate(prompt, max_new_tokens=40, temperature=0.8, top_k=50, seed=0)
            samples[name][prompt] = greedy
            samples[name][prompt + " [t=0.8]"] = sampled
            print(f"[{name}] {prompt}|{greedy}")
            print(f"[{name}] {prompt}|{sampled}   (t=0.8)")

    summary = {"corpus": corpus, "preset": preset, "budget_s": budget_s, "results": results, "samples": samples}
    summary["total_seconds"] = time.perf_counter() - started
    write_json(out / "summary.json", summary)
    (out / "report.md").write_text(markdown_summary(summary))
    print_table(summary)
    return summary


def _rows(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    r = summary["results"]
    rows = [
        ("parameters", f"{r['ftp']['params'] / 1e6:.1f}M", f"{r['gpt']['params'] / 1e6:.1f}M"),
        ("train steps", str(r["ftp"]["steps"]), str(r["gpt"]["steps"])),
        ("train tokens", f"{r['ftp']['tokens']:,}", f"{r['gpt']['tokens']:,}"),
        ("val perplexity", f"{r['ftp']['val_ppl']:.2f}", f"{r['gpt']['val_ppl']:.2f}"),
    ]
    if r["ftp"].get("offset_acc"):
        accs = " / ".join(f"{a:.2f}" for a in r["ftp"]["offset_acc"])
        rows.append(("FTP accuracy at offsets 1..N", accs, "-"))
    return rows


def print_table(summary: dict[str, Any]) -> None:
    rows = _rows(summary)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':<{width}}  {'FTP':>14}  {'GPT':>14}")
    for name, ftp, gpt in rows:
        print(f"{name:<{width}}  {ftp:>14}  {gpt:>14}")
    print(f"\ndemo finished in {summary['total_seconds']:.0f}s")


def markdown_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"# ftplm demo: FTP vs GPT on {summary['corpus']}",
        "",
        f"Preset `{summary['preset']}`, {summary['budget_s']:.0f}s of training each (equal compute), "
        f"total {summary['total_seconds']:.0f}s.",
        "",
        "| | FTP | GPT |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {ftp} | {gpt} |" for name, ftp, gpt in _rows(summary)]
    lines += ["", "## Samples", ""]
    for prompt in summary["samples"]["ftp"]:
        lines += [f"**{prompt}**", "", f"- FTP: {summary['samples']['ftp'][prompt]!r}", f"- GPT: {summary['samples']['gpt'][prompt]!r}", ""]
    return "\n".join(lines) + "\n"
