"""`ftplm demo`: the main job, end to end on the embedded default corpus in about ten minutes on 2 CPU cores.

prepare wiki-vital -> train FTP and GPT (same data, same time budget) -> evaluate both -> sample from both
-> runs/demo/{summary.json, eval.json, report.md, report.html, plots/} and a side-by-side table on the terminal.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ftplm.api import TextModel, load
from ftplm.checkpoint import write_json
from ftplm.data import TokenData, prepare
from ftplm.eval import run_suites
from ftplm.generate import Sampling, SpecStats, generate
from ftplm.report import write_report
from ftplm.train import train

DEMO_PROMPTS = ["The history of", "In mathematics, a"]
DEMO_SUITES = ["ppl", "smoothness", "coherence", "classify"]


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def prepare_once(corpus: str, data_dir: Path) -> TokenData:
    """Prepare the corpus unless an identical preparation is already there."""
    meta = data_dir / "meta.json"
    if not (meta.exists() and json.loads(meta.read_text()).get("corpus") == corpus):
        prepare(corpus, data_dir)
    return TokenData(data_dir)


def run_demo(
    out: Path,
    budget_s: float,
    corpus: str = "wiki-vital",
    preset: str = "mini",
    eval_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the main job into `out`; eval_options override the quick suite sizes (see EvalContext.size)."""
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
            shutil.rmtree(run)
        train(
            data.root,
            run,
            model_type=model_type,
            preset_name=preset,
            train_overrides={
                "time_budget": budget_s,
                "warmup_steps": 20,
                "eval_interval": 10**9,
                "save_interval": 10**9,
            },
        )
        runs[model_type] = run

    _step("3. evaluate both on identical held-out data (short versions of the paper suites)")

    evals = run_suites(
        runs["ftp"], DEMO_SUITES, against=runs["gpt"], quick=True, options=eval_options, data_dir=data.root
    )
    write_json(out / "eval.json", evals)
    labels = dict(zip(("ftp", "gpt"), evals["runs"]))
    models = {name: load(path) for name, path in runs.items()}
    results: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        state = json.loads((runs[name] / "trainer_state.json").read_text())
        results[name] = {
            "params": model.model.num_params(),
            "steps": state["step"],
            "tokens": state["tokens"],
            "train_seconds": state["elapsed"],
            "suites": evals["runs"][labels[name]]["suites"],
        }
        ppl_metrics = results[name]["suites"]["ppl"]["metrics"]
        results[name]["val_ppl"] = ppl_metrics["ppl"]["value"]
        results[name]["offset_acc"] = ppl_metrics.get("offset_acc", {}).get("value")

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

    _step("5. plain vs self-speculative decoding of the FTP model (greedy, lossless)")
    speculative = speculative_check(models["ftp"], data)

    summary = {
        "corpus": corpus,
        "preset": preset,
        "budget_s": budget_s,
        "results": results,
        "samples": samples,
        "speculative": speculative,
    }
    summary["total_seconds"] = time.perf_counter() - started
    write_json(out / "summary.json", summary)
    paths = write_demo_report(out, runs, summary)
    print_table(summary)
    print(f"report: {paths['md']}  {paths['html']}")
    return summary


def write_demo_report(out: Path, runs: dict[str, Path], summary: dict[str, Any]) -> dict[str, Path]:
    """The demo's report: its side-by-side table on top, then the same sections and plots as `ftplm report`."""
    labels = {"ftp": "FTP", "gpt": "GPT"}
    results = summary["results"]
    samples = {
        labels[name]: [{"prompt": prompt, "continuation": text} for prompt, text in by_prompt.items()]
        for name, by_prompt in summary["samples"].items()
    }
    return write_report(
        out,
        runs={labels[name]: run for name, run in runs.items()},
        evals={labels[name]: results[name]["suites"] for name in runs},
        samples=samples,
        title=f"ftplm demo: FTP vs GPT on {summary['corpus']}",
        notes=[
            f"Preset `{summary['preset']}`, {summary['budget_s']:.0f}s of training each (equal training time), "
            f"total {summary['total_seconds']:.0f}s. Short versions of the evaluation suites (`ftplm eval --quick`)."
        ],
        extra_tables=[("Side by side", ["", "FTP", "GPT"], [list(row) for row in _rows(summary)])],
    )


def speculative_check(model: TextModel, data: TokenData, n_prompts: int = 4, new_tokens: int = 64) -> dict[str, Any]:
    """Time plain and FTP self-speculative greedy decoding on held-out prompts; both must give the same tokens."""
    prompts = [model.encode(d.text)[:32] for d in data.heldout("val", limit=n_prompts)]
    model.generate_ids(prompts[0], 8, temperature=0, stop_at_eos=False, speculative="ftp")  # warm-up
    seconds = {"plain": 0.0, "ftp": 0.0}
    stats = SpecStats()
    identical = True
    for ids in prompts:
        t0 = time.perf_counter()
        plain = model.generate_ids(ids, new_tokens, temperature=0, stop_at_eos=False)
        seconds["plain"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        spec = _speculative_ids(model, ids, new_tokens, stats)
        seconds["ftp"] += time.perf_counter() - t0
        identical &= spec == plain
    result = {
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "plain_s": seconds["plain"],
        "speculative_s": seconds["ftp"],
        "speedup": seconds["plain"] / seconds["ftp"],
        "tau": stats.tau,
        "identical": identical,
    }
    print(
        f"plain {seconds['plain']:.2f}s, speculative {seconds['ftp']:.2f}s: speedup {result['speedup']:.2f}x, "
        f"tau {stats.tau:.2f}, identical output: {identical}"
    )
    return result


def _speculative_ids(model: TextModel, ids: list[int], new_tokens: int, stats: Any) -> list[int]:
    idx = torch.tensor([ids], device=model.device)
    return generate(model.model, idx, new_tokens, Sampling(0), speculative="ftp", stats=stats)[0, len(ids) :].tolist()


def _metric(result: dict[str, Any], suite: str, key: str, fmt: str = "{:.3f}") -> str:
    m = result["suites"].get(suite, {}).get("metrics", {}).get(key)
    if m is None:
        return "-"
    text = fmt.format(m["value"])
    if "ci95" in m:
        text += f" ±{(m['ci95'][1] - m['ci95'][0]) / 2:.3f}"
    elif "std" in m:
        text += f" ±{m['std']:.3f}"
    return text


def _rows(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    r = summary["results"]
    rows = [
        ("parameters", f"{r['ftp']['params'] / 1e6:.1f}M", f"{r['gpt']['params'] / 1e6:.1f}M"),
        ("train steps", str(r["ftp"]["steps"]), str(r["gpt"]["steps"])),
        ("train tokens", f"{r['ftp']['tokens']:,}", f"{r['gpt']['tokens']:,}"),
    ]
    for label, suite_name, key, fmt in [
        ("val perplexity", "ppl", "ppl", "{:.2f}"),
        ("smoothness: adjacent cosine", "smoothness", "adjacent_cosine", "{:.3f}"),
        ("  (mean-centred)", "smoothness", "adjacent_cosine_centered", "{:.3f}"),
        ("coherence: cos(prompt, text)", "coherence", "prompt_continuation_cos", "{:.3f}"),
        ("  distinct-2", "coherence", "distinct_2", "{:.3f}"),
        ("topic accuracy (wiki-vital, mean)", "classify", "wiki-vital/mean", "{:.3f}"),
        ("topic accuracy (wiki-vital, last)", "classify", "wiki-vital/last", "{:.3f}"),
    ]:
        rows.append((label, _metric(r["ftp"], suite_name, key, fmt), _metric(r["gpt"], suite_name, key, fmt)))
    acc = r["ftp"]["suites"].get("ppl", {}).get("metrics", {}).get("offset_acc")
    if acc:
        rows.append(("FTP accuracy at offsets 1..N", " / ".join(f"{a:.2f}" for a in acc["value"]), "-"))
    spec = summary.get("speculative")
    if spec:
        rows.append(("speculative speedup (tau)", f"{spec['speedup']:.2f}x ({spec['tau']:.2f})", "-"))
    return rows


def print_table(summary: dict[str, Any]) -> None:
    rows = _rows(summary)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':<{width}}  {'FTP':>14}  {'GPT':>14}")
    for name, ftp, gpt in rows:
        print(f"{name:<{width}}  {ftp:>14}  {gpt:>14}")
    print(f"\ndemo finished in {summary['total_seconds']:.0f}s")
