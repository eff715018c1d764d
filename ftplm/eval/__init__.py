"""Evaluation suites (`ftplm eval --suite NAME`): one file per suite, registered by name.

A suite is a function EvalContext -> dict of JSON-able results. Each result dict carries, per metric, its value,
its confidence interval where one is defined, n, and which model/checkpoint it came from (docs/evaluation.md).
`run_suites` evaluates one run, or two on identical data (`--against`), and adds paired differences.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftplm.api import load
from ftplm.checkpoint import run_data_dir
from ftplm.errors import FtplmError

# the suites register themselves on import: SUITES is the one list of them (CLI choices, reports, docs)
from ftplm.eval import classify, coding, coherence, ppl, retrieval, smoothness  # noqa: F401 - imported to register
from ftplm.eval.base import OPTIONS, PAPER_SUITES, SUITES, EvalContext, SuiteFn, heldout_documents, provenance, suite
from ftplm.eval.coherence import require_judge
from ftplm.eval.stats import paired_diff
from ftplm.machine import describe_machine
from ftplm.tokenizer import load_tokenizer, same_tokenizer

__all__ = [
    "OPTIONS",
    "PAPER_SUITES",
    "SUITES",
    "EvalContext",
    "SuiteFn",
    "headline",
    "heldout_documents",
    "load_suites",
    "provenance",
    "run_suites",
    "suite",
    "suite_names",
]


def load_suites() -> dict[str, SuiteFn]:
    """The registry of suites (every suite module has registered itself on import)."""
    return SUITES


def suite_names(spec: str | list[str]) -> list[str]:
    """'all' | 'ppl' | 'ppl,smoothness' -> known suite names; unknown names are an error."""
    load_suites()
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    out: list[str] = []
    for name in names:
        for n in PAPER_SUITES if name == "all" else [name]:
            if n not in SUITES:
                raise FtplmError(f"unknown suite {n!r}; choose from: all, {', '.join(SUITES)}")
            if n not in out:
                out.append(n)
    if not out:
        raise FtplmError("no suite given")
    return out


# ------------------------------------------------------------------------------------------------------
# held-out documents and model provenance
# ------------------------------------------------------------------------------------------------------
def _label(run: Path, taken: set[str]) -> str:
    label = Path(run).name or str(run)
    while label in taken:
        label += "'"
    return label


def run_suites(
    run: str | Path,
    suites: str | list[str] = "all",
    against: str | Path | None = None,
    quick: bool = False,
    seed: int = 0,
    options: dict[str, Any] | None = None,
    data_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = print,
    keep_items: bool = False,
) -> dict[str, Any]:
    """Evaluate RUN (and AGAINST on the same data, same prompts, same seeds) on the given suites.

    Returns {"runs": {label: {...provenance, "suites": {name: result}}}, "diff": {suite: {metric: A - B}}, ...}.
    With two runs, per-item scores of the same prompts/documents give paired differences with bootstrap CIs;
    keep_items leaves those per-item scores in each result (as "_items") for differences computed later.
    """

    names = suite_names(suites)
    unknown = sorted(set(options or {}) - set(OPTIONS))
    if unknown:
        raise FtplmError(f"unknown eval option {unknown[0]!r}; choose from: {', '.join(OPTIONS)}")
    if "coherence" in names:
        require_judge()  # before any model work
    paths = [Path(run)] + ([Path(against)] if against is not None else [])
    models = [load(p) for p in paths]  # errors (no checkpoint, corrupt files) come out as one line
    if against is not None and not same_tokenizer(models[0].tokenizer, models[1].tokenizer):
        raise FtplmError(
            f"{paths[0]} and {paths[1]} use different tokenizers: they cannot be evaluated on identical data"
        )
    data = Path(data_dir) if data_dir is not None else run_data_dir(paths[0])
    if (
        data is not None
        and (data / "tokenizer.json").is_file()
        and not same_tokenizer(load_tokenizer(data / "tokenizer.json"), models[0].tokenizer)
    ):
        raise FtplmError(f"the data in {data} was tokenized with another tokenizer than {paths[0]}'s")
    out: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "data_dir": str(data) if data else None,
        "quick": quick,
        "seed": seed,
        "runs": {},
    }
    labels: list[str] = []
    items: list[dict[str, dict[str, Any]]] = []
    for path, model in zip(paths, models):
        label = _label(path, set(labels))
        labels.append(label)
        entry = {**provenance(path), "model_type": model.config.model_type, "suites": {}}
        per_item: dict[str, Any] = {}
        for name in names:
            if progress:
                progress(f"[{label}] {name} ...")
            ctx = EvalContext(path, model, data, quick, seed, dict(options or {}))
            t0 = time.perf_counter()
            result = SUITES[name](ctx)
            result["seconds"] = round(time.perf_counter() - t0, 2)
            per_item[name] = result.get("_items", {}) if keep_items else result.pop("_items", {})
            if not keep_items:
                result.pop("_item_weights", None)
            entry["suites"][name] = result
            if progress:
                progress(f"[{label}] {name}: {headline(result)} ({result['seconds']:.0f}s)")
        out["runs"][label] = entry
        items.append(per_item)
    if len(items) == 2:
        out["diff"] = {"of": f"{labels[0]} - {labels[1]}"}
        for name in names:
            a, b = items[0].get(name, {}), items[1].get(name, {})
            d = {m: paired_diff(a[m], b[m], seed) for m in a if m in b and len(a[m]) == len(b[m]) and len(a[m])}
            if d:
                out["diff"][name] = d
    return out


def headline(result: dict[str, Any]) -> str:
    """One line: the suite's main metrics with their intervals."""
    parts = []
    for key in result.get("headline", []):
        m = result["metrics"].get(key)
        if m is None:
            continue
        if "ci95" in m and m["ci95"][0] == m["ci95"][0]:
            parts.append(f"{key} {m['value']:.4g} [{m['ci95'][0]:.4g}, {m['ci95'][1]:.4g}]")
        elif "std" in m:
            parts.append(f"{key} {m['value']:.4g} ± {m['std']:.2g}")
        else:
            parts.append(f"{key} {m['value']:.4g}")
    return "; ".join(parts)
