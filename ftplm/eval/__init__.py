"""Evaluation suites (`ftplm eval --suite NAME`): one file per suite, registered by name.

A suite is a function EvalContext -> dict of JSON-able results. Each result dict carries, per metric, its value,
its confidence interval where one is defined, n, and which model/checkpoint it came from (see SPEC §5).
`run_suites` evaluates one run, or two on identical data (`--against`), and adds paired differences.
"""

from __future__ import annotations

import datetime
import functools
import importlib
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ftplm.api import TextModel
    from ftplm.data import Document

SuiteFn = Callable[["EvalContext"], dict[str, Any]]
SUITES: dict[str, SuiteFn] = {}
SUITE_MODULES = ("ppl", "smoothness", "coherence", "classify", "coding", "retrieval")
PAPER_SUITES = ("ppl", "smoothness", "coherence", "classify", "coding")  # what `--suite all` runs
# Every option a suite reads (`ftplm eval --set NAME=VALUE`, eval config files): the one list that checks them.
OPTIONS: dict[str, str] = {
    "ppl_batches": "8-window batches of val perplexity (ppl)",
    "ppl_split": "split the ppl suite scores: val or test",
    "layer": "smoothness and classify read the vectors after the first L trunk blocks (default: the top)",
    "smoothness_docs": "held-out documents of the smoothness suite",
    "smoothness_split": "split the smoothness suite reads: val or test",
    "coherence_prompts": "prompts of the coherence suite",
    "coherence_samples": "continuations per prompt (at least 3)",
    "coherence_new_tokens": "tokens per continuation",
    "classify_docs": "documents per corpus of the classify suite",
    "coding_problems": "problems of the coding suite",
    "coding_new_tokens": "tokens generated per coding problem",
    "coding_workers": "processes that run the coding answers",
    "retrieval_docs": "held-out articles of the retrieval suite",
}


@dataclass
class EvalContext:
    """What a suite gets: the model under evaluation, where it came from, and how thorough to be."""

    run: Path  # run / checkpoint / saved-model directory
    model: TextModel
    data_dir: Path | None = None  # the prepared data the run trained on (held-out docs live there)
    quick: bool = False  # the demo's short version
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def size(self, name: str, full: int, quick: int) -> int:
        """A suite size: options[name] if given, else the quick or the full default."""
        return int(self.options.get(name, quick if self.quick else full))


def suite(name: str) -> Callable[[SuiteFn], SuiteFn]:
    def register(fn: SuiteFn) -> SuiteFn:
        SUITES[name] = fn
        return fn

    return register


def load_suites() -> dict[str, SuiteFn]:
    """Import every suite module (each registers itself) and return the registry."""
    for module in SUITE_MODULES:
        importlib.import_module(f"ftplm.eval.{module}")
    return SUITES


def suite_names(spec: str | list[str]) -> list[str]:
    """'all' | 'ppl' | 'ppl,smoothness' -> known suite names; unknown names are an error."""
    from ftplm.errors import FtplmError

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
def heldout_documents(data_dir: Path | None, corpus: str, splits: tuple[str, ...] = ("val", "test")) -> tuple[list[Document], str]:
    """Held-out documents of a corpus (never trained on): from the data directory's heldout.jsonl when the run's
    data holds that corpus, else read from the corpus package and split exactly as `ftplm prepare` would."""
    from ftplm.data import TokenData, split_of

    fracs = (0.05, 0.10, 0)
    if data_dir is not None and (Path(data_dir) / "heldout.jsonl").is_file():
        data = TokenData(data_dir)
        wanted = [d for s in splits for d in data.heldout(s) if d.doc_id.startswith(f"{corpus}:")]
        if wanted:
            return wanted, f"{data_dir}/heldout.jsonl ({'+'.join(splits)})"
        fracs = (data.meta.get("val_frac", 0.05), data.meta.get("test_frac", 0.10), data.meta.get("split_seed", 0))
    docs = [d for d in _corpus_documents(corpus) if split_of(d.doc_id, *fracs) in splits]
    return docs, f"{corpus} {'+'.join(splits)} split (val_frac={fracs[0]}, test_frac={fracs[1]}, seed={fracs[2]})"


@functools.lru_cache(maxsize=4)
def _corpus_documents(corpus: str) -> tuple[Document, ...]:
    """A corpus read from its package once per process (both runs of `--against` and every suite share it)."""
    from ftplm.data import documents

    return tuple(documents(corpus))


def provenance(run: Path) -> dict[str, Any]:
    """Which model files a result came from: the resolved checkpoint directory and its step."""
    import json

    from ftplm.checkpoint import resolve

    directory = resolve(run)
    real = (directory / "latest").resolve() if (directory / "latest").exists() else directory.resolve()
    info: dict[str, Any] = {"run": str(run), "checkpoint": str(real)}
    state = real / "trainer_state.json"
    if state.is_file():
        s = json.loads(state.read_text())
        info.update(step=s.get("step"), tokens=s.get("tokens"))
    return info


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
    from ftplm.api import load
    from ftplm.checkpoint import run_data_dir
    from ftplm.errors import FtplmError
    from ftplm.eval.stats import paired_diff
    from ftplm.tokenizer import load_tokenizer, same_tokenizer

    names = suite_names(suites)
    unknown = sorted(set(options or {}) - set(OPTIONS))
    if unknown:
        raise FtplmError(f"unknown eval option {unknown[0]!r}; choose from: {', '.join(OPTIONS)}")
    if "coherence" in names:
        from ftplm.eval.coherence import require_judge

        require_judge()  # before any model work
    paths = [Path(run)] + ([Path(against)] if against is not None else [])
    models = [load(p) for p in paths]  # errors (no checkpoint, corrupt files) come out as one line
    if against is not None and not same_tokenizer(models[0].tokenizer, models[1].tokenizer):
        raise FtplmError(f"{paths[0]} and {paths[1]} use different tokenizers: they cannot be evaluated on identical data")
    data = Path(data_dir) if data_dir is not None else run_data_dir(paths[0])
    if data is not None and (data / "tokenizer.json").is_file() and not same_tokenizer(
            load_tokenizer(data / "tokenizer.json"), models[0].tokenizer):
        raise FtplmError(f"the data in {data} was tokenized with another tokenizer than {paths[0]}'s")
    out: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {_cores()} cores".strip(),
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


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
