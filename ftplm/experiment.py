"""`ftplm experiment paper`: the paper's four claims, FTP vs GPT, every seed: matched perplexity, equal tokens, equal FLOPs.

Layout under OUT (every step reuses what is already there, so an interrupted experiment continues where it stopped):

    OUT/data                     the training corpus, prepared (default wiki-vital + shakespeare + bbc-news; any
                                 corpus `ftplm prepare` accepts; the suites read wiki-vital and bbc-news from their
                                 packages when it holds neither)
    OUT/ftp-s{seed}, gpt-s{seed} training runs (same data, tokens, schedule; each keeps its latest checkpoint, GPT
                                 also MATCH_SNAPSHOTS weights-only snapshots to match perplexity against)
    OUT/gpt-flops-s{seed}        GPT trained on FTP's training FLOPs (more tokens, its own schedule; left out with
                                 skip_equal_flops, when it would be the longest run of a large budget)
    OUT/coding-data              the planning-ahead coding corpus (training programs only)
    OUT/coding-{ftp,gpt}-s{seed} models trained on it with the same budget (and coding-ftp-{variant}-s{seed})
    OUT/evals/*.json             one file per evaluated model (+ matched-s{seed}.json, summary.json)
    OUT/report/                  report.md + report.html

A seed whose run directories are gone but whose OUT/evals files are there (copied from a published experiment's
evals/, or kept from a machine whose runs did not survive) is reused as it is: seeds trained on different days add up.
A run that already reached its token budget is reused as is; a run that stopped before is resumed (started again
if it stopped before its first checkpoint; a run whose log.jsonl changed in the last two minutes is taken to be
training in another process: the experiment stops rather than writing into it). Matched perplexity: the val
perplexity of every GPT checkpoint is measured on the same fixed windows as FTP's, and the checkpoint closest to
FTP's is "GPT (matched ppl)"; the gap is reported and flagged above 3%. "GPT (equal tokens)" is the final GPT
checkpoint (same tokens and steps as FTP); FTP costs more per token (ftplm.model.flops_per_token: 1.72x GPT at
`small`), so "GPT (equal FLOPs)" is GPT trained on as many training FLOPs as FTP, i.e. on that many times more tokens.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ftplm.api import load
from ftplm.bench.decode import bench_decode
from ftplm.bench.train import bench_train
from ftplm.checkpoint import checkpoints, write_json, write_text
from ftplm.config import preset as get_preset
from ftplm.data import TokenData, prepare
from ftplm.errors import FtplmError
from ftplm.eval import run_suites
from ftplm.eval.ppl import val_perplexity
from ftplm.eval.stats import paired_seed_diff, seeds_summary
from ftplm.machine import provenance
from ftplm.model import build_model, flops_per_token
from ftplm.report import write_report
from ftplm.results import LABELS, format_diff, label_name, machines, variant_tables
from ftplm.train import RUN_CONFIG, read_log, train

TEXT_CORPUS = "wiki-vital,shakespeare,bbc-news"
TEXT_SUITES = ["ppl", "smoothness", "coherence", "classify"]
MAX_GAP = 0.03
# CPU budgets: more, smaller steps than the presets' own, evaluated often; `base` (a GPU's budgets) keeps its preset's
CPU_SCHEDULE = {"batch_size": 8, "warmup_steps": 20, "eval_interval": 25, "eval_iters": 10}
# ... but at most this many validations per run: every 25 steps, they cost ~13% of training time at 8M tokens
CPU_VALIDATIONS = 50
# weights-only snapshots a GPT run keeps to match FTP's perplexity against (train.snapshot_steps: half of them in the
# second half of the run, where the matches fall); every run keeps only its latest full checkpoint
MATCH_SNAPSHOTS = 40
# what an experiment's run holds before its first checkpoint: nothing trained to lose, so it is started again
UNSAVED = {"log.jsonl", RUN_CONFIG, "checkpoints", "snapshots"}


def train_defaults(preset: str, model_type: str, max_tokens: int) -> dict[str, Any]:
    """The training settings of an experiment's run, before the user's --train-set."""
    steps = max_tokens // (CPU_SCHEDULE["batch_size"] * get_preset(preset, "gpt").model.block_size)  # FTP: the same
    return {
        **(
            {}
            if preset == "base"
            else CPU_SCHEDULE | {"eval_interval": max(CPU_SCHEDULE["eval_interval"], steps // CPU_VALIDATIONS)}
        ),
        "keep_checkpoints": 0,
        "snapshots": MATCH_SNAPSHOTS if model_type == "gpt" else 0,
    }


BASELINES = [k for k in LABELS if k != "ftp"]
# claim -> (suite, metric): FTP is claimed to be higher on each
CLAIMS = [
    ("(a) smoother state vectors", "smoothness", "adjacent_cosine"),
    ("(a) smoother state vectors (mean-centred)", "smoothness", "adjacent_cosine_centered"),
    ("(b) topic coherence: prompt-continuation", "coherence", "prompt_continuation_cos"),
    ("(b) topic coherence: half-half", "coherence", "half_half_cos"),
    ("(c) topic classification, wiki-vital, mean-pooled", "classify", "wiki-vital/mean"),
    ("(c) topic classification, wiki-vital, last-token", "classify", "wiki-vital/last"),
    ("(c) topic classification, bbc-news, mean-pooled", "classify", "bbc-news/mean"),
    ("(c) topic classification, bbc-news, last-token", "classify", "bbc-news/last"),
    ("(d) coding pass@1", "coding", "pass@1"),
    ("(d) coding: the first statement declares the right number (the plan)", "coding", "declared_correct"),
    *((f"(d) coding pass@1, level {level}", "coding", f"pass@1/L{level}") for level in (1, 2, 3, 4)),
]


def log(msg: str) -> None:
    print(f"[experiment {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------------
# data and training, reusing what exists
# ------------------------------------------------------------------------------------------------------
def ensure_data(data_dir: Path, corpus: str, vocab_size: int = 8192, tokenizer: str = "bpe") -> Path:
    meta = data_dir / "meta.json"
    if meta.is_file():
        found = json.loads(meta.read_text()).get("corpus")
        if found != corpus:
            raise FtplmError(f"{data_dir} holds corpus {found!r}, not {corpus!r}: choose another --out")
        log(f"reusing {data_dir}")
        return data_dir
    log(f"preparing {corpus} -> {data_dir}")
    prepare(corpus, data_dir, vocab_size=vocab_size, tokenizer=tokenizer)
    return data_dir


def run_state(run: Path) -> dict[str, Any] | None:
    state = run / "latest" / "trainer_state.json"
    return json.loads(state.read_text()) if state.is_file() else None


def ensure_trained(
    run: Path,
    data: Path,
    model_type: str,
    preset: str,
    max_tokens: int,
    seed: int,
    overrides: dict[str, Any],
    busy_s: float = 120.0,
    model_overrides: dict[str, Any] | None = None,
) -> Path:
    """Train RUN to max_tokens: reuse it when done, resume it when it stopped early, else start it."""
    state = run_state(run)
    if state is not None and state["tokens"] >= max_tokens:
        log(f"reusing {run} ({state['tokens']:,} tokens, step {state['step']})")
        return run
    log_file = run / "log.jsonl"
    if log_file.is_file() and time.time() - log_file.stat().st_mtime < busy_s:
        raise FtplmError(
            f"{run} seems to be training in another process (log.jsonl changed {time.time() - log_file.stat().st_mtime:.0f}s ago): wait for it to finish"
        )
    if state is not None:
        log(f"resuming {run} from {state['tokens']:,} tokens to {max_tokens:,}")
        train(data, run, model_type=model_type, resume=True, train_overrides={"max_tokens": max_tokens}, progress=True)
    else:
        if run.exists() and any(run.iterdir()):
            if {p.name for p in run.iterdir()} - UNSAVED:
                raise FtplmError(f"{run} exists but holds no checkpoint: remove it or choose another --out")
            log(f"restarting {run}: it stopped before its first checkpoint")
            shutil.rmtree(run)
        log(f"training {run} ({model_type}, preset {preset}, {max_tokens:,} tokens, seed {seed})")
        train(
            data,
            run,
            model_type=model_type,
            preset_name=preset,
            progress=True,
            model_overrides=model_overrides,
            train_overrides={
                **train_defaults(preset, model_type, max_tokens),
                **overrides,
                "max_tokens": max_tokens,
                "seed": seed,
            },
        )
    return run


def equal_flops_tokens(preset: str, data: Path, max_tokens: int, model_overrides: dict[str, Any] | None = None) -> int:
    """The tokens GPT trains on to spend FTP's training FLOPs on max_tokens (same preset and vocabulary)."""
    vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
    with torch.device("meta"):  # shapes only
        flops = {
            t: flops_per_token(
                build_model(replace(get_preset(preset, t).model, **(model_overrides or {}), vocab_size=vocab))
            )
            for t in ("ftp", "gpt")
        }
    return round(max_tokens * flops["ftp"] / flops["gpt"])


# ------------------------------------------------------------------------------------------------------
# matched perplexity
# ------------------------------------------------------------------------------------------------------
def match_perplexity(ftp_run: Path, gpt_run: Path, data: Path, batches: int, cache: Path) -> dict[str, Any]:
    """Val ppl of FTP's final checkpoint and of every GPT snapshot and checkpoint on the same windows; the closest."""
    if cache.is_file() and not (ftp_run.exists() or gpt_run.exists()):
        return json.loads(cache.read_text())  # trained elsewhere (see trained_elsewhere): the match as measured
    ckpts = checkpoints(gpt_run, snapshots=True)
    if not ckpts:
        raise FtplmError(f"{gpt_run} has no checkpoints to match perplexity against")
    ftp_ckpt = (ftp_run / "latest").resolve()
    key = {"ftp": str(ftp_ckpt), "gpt": [str(c) for c in ckpts], "batches": batches}
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached
    tokens = TokenData(data)
    ppl = lambda path: val_perplexity(load(path), tokens, batches)[0]["ppl"]  # noqa: E731 - a one-line local helper
    ftp_ppl = ppl(ftp_ckpt)
    table = []
    for c in ckpts:
        state = json.loads((c / "trainer_state.json").read_text())
        table.append({"checkpoint": str(c), "step": state["step"], "tokens": state["tokens"], "ppl": ppl(c)})
        log(f"  {c.name}: val ppl {table[-1]['ppl']:.3f} (FTP {ftp_ppl:.3f})")
    best = min(table, key=lambda r: abs(r["ppl"] - ftp_ppl))
    gap = abs(best["ppl"] - ftp_ppl) / ftp_ppl
    result = {
        "key": key,
        "ftp_checkpoint": str(ftp_ckpt),
        "ftp_ppl": ftp_ppl,
        "gpt_checkpoints": table,
        "matched": best,
        "gap": gap,
        "gap_ok": gap <= MAX_GAP,
        "final": table[-1],
    }
    if not result["gap_ok"]:
        log(
            f"  WARNING: closest GPT checkpoint is {gap:.1%} away from FTP's perplexity (> {MAX_GAP:.0%}): save GPT checkpoints more often"
        )
    write_json(cache, result)
    return result


# ------------------------------------------------------------------------------------------------------
# evaluation (cached per model) and aggregation across seeds
# ------------------------------------------------------------------------------------------------------
def fresh(cached: dict[str, Any], path: Path) -> bool:
    """Whether a model's cached results stand: they were measured on this checkpoint, or the checkpoint is gone
    (a seed trained elsewhere, see trained_elsewhere), so they are all there is."""
    return cached.get("checkpoint") == str(path.resolve()) or (bool(cached) and not path.exists())


def evaluate_cached(
    path: Path, suites: list[str], data: Path, cache: Path, quick: bool, options: dict[str, Any]
) -> dict[str, Any]:
    """{suite: result (with per-item scores)} of one model, read from `cache` when it already holds those suites."""
    have = json.loads(cache.read_text()) if cache.is_file() else {}
    if fresh(have, path) and all(s in have.get("suites", {}) for s in suites):
        log(f"reusing {cache}")
        return have["suites"]
    log(f"evaluating {path} on {', '.join(suites)}")
    result = run_suites(
        path, suites, quick=quick, options=options, data_dir=data, keep_items=True, progress=lambda m: log("  " + m)
    )
    entry = next(iter(result["runs"].values()))
    write_json(
        cache,
        {
            "checkpoint": str(path.resolve()),
            "date": result["date"],
            "machine": result["machine"],
            "suites": entry["suites"],
        },
    )
    return entry["suites"]


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Suite results of several seeds -> the same shape, each metric's value = mean over seeds, with std and per_seed.

    One seed: the result as is (its bootstrap CIs). Curves (list values) are averaged elementwise. Intervals: see
    ftplm.eval.stats.seeds_summary.
    """
    private = ("_items", "_item_weights")
    if len(per_seed) == 1:
        return {s: {k: v for k, v in r.items() if k not in private} for s, r in per_seed[0].items()}
    out: dict[str, Any] = {}
    for suite_name in per_seed[0]:
        results = [r[suite_name] for r in per_seed if suite_name in r]
        metrics: dict[str, Any] = {}
        for key, m in results[0]["metrics"].items():
            values = [r["metrics"][key]["value"] for r in results if key in r["metrics"]]
            if isinstance(m["value"], list):
                arr = np.array(values, dtype=float)
                metrics[key] = {
                    **{k: v for k, v in m.items() if k not in ("value", "std", "ci95", "folds")},
                    "value": arr.mean(0).tolist(),
                    "std": arr.std(0, ddof=1).tolist() if len(arr) > 1 else None,
                }
            else:
                items = [r.get("_items", {}).get(key) for r in results]
                weights = [r.get("_item_weights", {}).get(key) for r in results]
                metrics[key] = {
                    **seeds_summary(
                        values, items if None not in items else None, weights=weights if None not in weights else None
                    ),
                    "per_seed": values,
                }
        first = {
            k: v for k, v in results[0].items() if k not in ("metrics", *private, "checkpoint", "run", "step", "tokens")
        }
        out[suite_name] = {
            **first,
            "metrics": metrics,
            "seeds": len(results),
            "checkpoints": [r.get("checkpoint") for r in results],
        }
    return out


def claim_rows(
    evals_by_seed: dict[str, list[dict[str, Any]]],
    coding: dict[str, list[dict[str, Any]]],
    seed: int,
    ftp: str = "ftp",
    baselines: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Per claim: FTP - GPT (matched and equal tokens), paired over the same items within each seed, with the
    hierarchical CI over seeds and items (ftplm.eval.stats.paired_seed_diff). baselines: column -> label of the
    GPT results it compares with (a variant has a matched checkpoint of its own)."""
    rows = []
    for claim, suite_name, metric in CLAIMS:
        source = coding if suite_name == "coding" else evals_by_seed
        row: dict[str, Any] = {"claim": claim, "suite": suite_name, "metric": metric}
        for column, other in (baselines or {k: k for k in BASELINES}).items():
            a, b = [], []
            for ra, rb in zip(source.get(ftp, []), source.get(other, [])):
                ia = ra.get(suite_name, {}).get("_items", {}).get(metric)
                ib = rb.get(suite_name, {}).get("_items", {}).get(metric)
                if ia is not None and ib is not None and len(ia) == len(ib) and len(ia):
                    a.append(ia)
                    b.append(ib)
            if a:
                d = paired_seed_diff(a, b, seed)
                lo, hi = d["ci95"]
                d["verdict"] = "FTP higher" if lo > 0 else "FTP lower" if hi < 0 else "no significant difference"
                row[column] = d
        rows.append(row)
    return rows


def speculative_cached(path: Path, cache: Path) -> dict[str, Any]:
    """Self-speculative drafting of one FTP model (bench decode: 8 held-out prompts of 32 tokens, 64 new ones, plain
    and 'ftp', greedy and T = 1; less in a short context), cached like the suites."""
    have = json.loads(cache.read_text()) if cache.is_file() else {}
    if fresh(have, path):
        return have["results"]
    log(f"self-speculative decoding of {path}")
    block = json.loads((path / "config.json").read_text())["block_size"]
    prompt = min(32, block // 4)
    results = bench_decode(
        path, prompts=8, max_new_tokens=min(64, block - prompt), prompt_tokens=prompt, methods=["plain", "ftp"]
    )["results"]
    write_json(cache, {"checkpoint": str(path.resolve()), "results": results})
    return results


def throughput_cached(preset: str, model_overrides: dict[str, Any], vocab: int, cache: Path) -> float:
    """FTP's training tokens/s ÷ GPT's for these model settings, from `bench train` (the two models' steps
    interleaved in one process, so machine noise hits both alike), cached. Not from the runs' own wall clock: on a
    machine shared for part of a run (tests, another training) one GPT seed's rate was 3.6x another's."""
    key = {"preset": preset, "model_overrides": model_overrides, "vocab_size": vocab}
    have = json.loads(cache.read_text()) if cache.is_file() else {}
    if have.get("key") == key:
        return have["ftp_over_gpt"]
    log(f"training throughput of FTP {model_overrides or ''} against GPT (bench train --preset {preset})")
    ratio = bench_train(preset, overrides={**model_overrides, "vocab_size": vocab})["ftp_over_gpt"]
    write_json(cache, {"key": key, "ftp_over_gpt": ratio})
    return ratio


def model_rows(
    ftp_labels: list[str], evals: dict[str, Any], decode: dict[str, Any], throughput: dict[str, float]
) -> list[list[str]]:
    """Rows of the variants table besides the claims: per-offset accuracy, training throughput against GPT's, and
    self-speculative τ and speedup (greedy / T = 1)."""

    def offsets(label: str) -> str:
        acc = evals[label_name(label)].get("ppl", {}).get("metrics", {}).get("offset_acc", {}).get("value")
        return " / ".join(f"{a:.3f}" for a in acc) if acc else "-"

    def spec(label: str, key: str, fmt: str) -> str:
        values = [decode[label][mode]["ftp"][key] for mode in decode[label]]
        return " / ".join("-" if v is None else format(v, fmt) for v in values)

    return [
        ["per-offset accuracy (k = 1..N)", "offset_acc", *(offsets(x) for x in ftp_labels)],
        ["training tokens/s ÷ GPT's (bench train)", "throughput", *(f"{throughput[x]:.2f}" for x in ftp_labels)],
        ["self-speculative τ (greedy / T = 1)", "tau", *(spec(x, "tau", ".2f") for x in ftp_labels)],
        ["self-speculative speedup (greedy / T = 1)", "speedup", *(spec(x, "speedup", ".2f") for x in ftp_labels)],
    ]


def match_seed(
    out: Path,
    data: Path,
    ftp_labels: list[str],
    seed: int,
    ppl_batches: int,
    matched: dict[str, list[dict[str, Any]]],
    prefix: str = "",
) -> dict[str, Path]:
    """Each FTP model of a seed matched to the GPT checkpoint closest to its val perplexity (cached; appended to
    `matched`). Returns the FTP models' and their matched checkpoints' paths by label. prefix: "coding-" for the
    coding models."""
    paths: dict[str, Path] = {}
    for label in ftp_labels:
        log(f"seed {seed}: matching GPT checkpoints to {prefix}{label}'s val perplexity")
        cache = match_cache(out, label, seed, prefix)
        m = match_perplexity(out / f"{prefix}{label}-s{seed}", out / f"{prefix}gpt-s{seed}", data, ppl_batches, cache)
        matched[label].append(m)
        paths[label] = out / f"{prefix}{label}-s{seed}" / "latest"
        paths[matched_label(label)] = Path(m["matched"]["checkpoint"])
    return paths


def match_cache(out: Path, ftp_label: str, seed: int, prefix: str = "") -> Path:
    """OUT/evals/{prefix}matched-s{seed}.json, or matched-{variant}: an FTP model's match to GPT checkpoints."""
    name = "matched" if ftp_label == "ftp" else f"matched-{ftp_label}"
    return out / "evals" / f"{prefix}{name}-s{seed}.json"


def trained_elsewhere(out: Path, seed: int, ftp_labels: list[str], prefix: str = "") -> bool:
    """A seed whose runs are gone but whose matches are in OUT/evals (copied there from a published experiment, or
    kept from a session whose run directories did not survive): its results are reused as they are and nothing of it
    is trained again. This is how seeds trained on different days add up to one experiment."""
    runs = [out / f"{prefix}{label}-s{seed}" for label in (*ftp_labels, "gpt", "gpt-flops")]
    return not any(r.exists() for r in runs) and all(match_cache(out, x, seed, prefix).is_file() for x in ftp_labels)


def matched_label(ftp_label: str) -> str:
    """The label of the GPT checkpoint matched to an FTP model: gpt-matched, or gpt-matched-{variant}."""
    return "gpt-matched" + ftp_label.removeprefix("ftp")


def band_label(ftp_label: str) -> str:
    """The label of the GPT checkpoints within MAX_GAP of an FTP model's perplexity: gpt-band, or gpt-band-{variant}."""
    return "gpt-band" + ftp_label.removeprefix("ftp")


def perplexity_band(match: dict[str, Any]) -> list[dict[str, Any]]:
    """GPT checkpoints within MAX_GAP of FTP's val perplexity (the matched one among them). A probe's accuracy moves
    by a few points from one checkpoint to the next, so FTP is also compared with their average."""
    return [c for c in match["gpt_checkpoints"] if abs(c["ppl"] / match["ftp_ppl"] - 1) <= MAX_GAP]


def mean_items(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Suite results of several checkpoints on the same items -> one result whose per-item scores are their means
    (only what claim_rows reads: each suite's `_items`)."""
    merged: dict[str, Any] = {}
    for suite_name in results[0]:
        items = [r[suite_name].get("_items", {}) for r in results]
        merged[suite_name] = {
            "_items": {
                metric: np.mean([np.asarray(i[metric], dtype=np.float64) for i in items], axis=0).tolist()
                for metric in items[0]
                if all(metric in i and len(i[metric]) == len(items[0][metric]) for i in items)
            }
        }
    return merged


# ------------------------------------------------------------------------------------------------------
# the experiment
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PaperExperiment:
    """The settings of `ftplm experiment paper`, checked before any training.

    variants: name -> model fields of an FTP variant trained beside the paper's design (OUT/ftp-{name}-s{seed}),
    each compared with the same GPT runs at its own matched perplexity. options: eval suite sizes;
    train_overrides / model_overrides: training and model fields of every run over the preset. corpus, tokenizer:
    the training data, as `ftplm prepare` takes them.
    """

    preset: str = "small"
    seeds: int = 3
    max_tokens: int = 200_000
    coding_max_tokens: int | None = None
    coding_seeds: int | None = None
    quick: bool = False
    skip_coding: bool = False
    skip_equal_flops: bool = False
    ppl_batches: int = 20
    options: dict[str, Any] = field(default_factory=dict)
    train_overrides: dict[str, Any] = field(default_factory=dict)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    corpus: str = TEXT_CORPUS
    tokenizer: str = "bpe"

    def __post_init__(self) -> None:
        if self.seeds < 1 or (self.coding_seeds is not None and self.coding_seeds < 1):
            raise FtplmError(f"--seeds and --coding-seeds must be at least 1, got {self.seeds}, {self.coding_seeds}")
        if (
            self.max_tokens < 1
            or (self.coding_max_tokens is not None and self.coding_max_tokens < 1)
            or self.ppl_batches < 1
        ):
            raise FtplmError("--max-tokens, --coding-max-tokens and --ppl-batches must be positive")


# what match_and_evaluate gathers, seed by seed: matches per FTP label, suite results per label, bands per FTP label
Found = tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]]]
LOG_TRAIN_RECORDS = 200  # training-loss points a run's compact log keeps (every validation is kept)


def keep_log(out: Path, run_name: str) -> None:
    """OUT/evals/logs/RUN/log.jsonl: every validation of a run and about LOG_TRAIN_RECORDS of its training records,
    so the report still draws its training curves when the run directory is gone (see trained_elsewhere)."""
    records = read_log(out / run_name)
    train_rows = [i for i, r in enumerate(records) if "val" not in r]
    kept_train = {*train_rows[:: max(1, len(train_rows) // LOG_TRAIN_RECORDS)], *train_rows[-1:]}
    kept = [r for i, r in enumerate(records) if "val" in r or i in kept_train]
    if kept:
        (out / "evals" / "logs" / run_name).mkdir(parents=True, exist_ok=True)
        write_text(out / "evals" / "logs" / run_name / "log.jsonl", "".join(json.dumps(r) + "\n" for r in kept))


def train_seed(
    out: Path,
    data: Path,
    spec: PaperExperiment,
    seed: int,
    ftp_models: dict[str, dict[str, Any]],
    flops_tokens: int | None,
) -> None:
    """One seed's text runs: every FTP model, GPT, and GPT at equal FLOPs (only its final checkpoint is evaluated:
    no snapshots) unless it is left out."""
    runs: list[tuple[str, str, int, dict[str, Any], dict[str, Any]]] = [
        (f"{label}-s{seed}", "ftp", spec.max_tokens, {}, model_set) for label, model_set in ftp_models.items()
    ]
    runs.append((f"gpt-s{seed}", "gpt", spec.max_tokens, {}, spec.model_overrides))
    if flops_tokens is not None:
        runs.append((f"gpt-flops-s{seed}", "gpt", flops_tokens, {"snapshots": 0}, spec.model_overrides))
    for name, model_type, tokens, extra, model_set in runs:
        overrides = {**spec.train_overrides, **extra}
        ensure_trained(out / name, data, model_type, spec.preset, tokens, seed, overrides, model_overrides=model_set)
        keep_log(out, name)


def paper_experiment(out: str | Path, spec: PaperExperiment | None = None, **fields: Any) -> dict[str, Any]:
    """Train (or reuse), match perplexity, evaluate every suite for every seed, aggregate, write the report.
    spec: the experiment's settings (or its fields as keywords)."""
    spec = spec or PaperExperiment(**fields)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    evals_dir = out / "evals"
    evals_dir.mkdir(exist_ok=True)
    started = time.perf_counter()
    options = {"ppl_batches": spec.ppl_batches, **spec.options}  # the ppl suite scores the windows matching used
    overrides = dict(spec.train_overrides)

    data = ensure_data(out / "data", spec.corpus, tokenizer=spec.tokenizer)
    flops_tokens = (
        None if spec.skip_equal_flops else equal_flops_tokens(spec.preset, data, spec.max_tokens, spec.model_overrides)
    )
    ftp_models = {"ftp": dict(spec.model_overrides)} | {
        f"ftp-{name}": {**spec.model_overrides, **v} for name, v in spec.variants.items()
    }
    found: Found = ({label: [] for label in ftp_models}, {}, {})
    for seed in range(spec.seeds):
        if trained_elsewhere(out, seed, list(ftp_models)):
            log(f"seed {seed}: no runs, its results in {evals_dir}: reused as they are")
        else:
            train_seed(out, data, spec, seed, ftp_models, flops_tokens)
        match_and_evaluate(
            out, data, seed, list(ftp_models), spec.ppl_batches, spec.quick, options, flops_tokens is not None, found
        )
    matched, by_label, bands = found
    coding_by_label: dict[str, Any] = {}
    coding_matched: dict[str, list[dict[str, Any]]] = {}
    if not spec.skip_coding:
        coding_by_label, coding_matched = coding_experiment(
            out,
            spec.preset,
            spec.coding_max_tokens or spec.max_tokens,
            spec.coding_seeds or spec.seeds,
            overrides,
            ftp_models,
            spec.model_overrides,
            spec.ppl_batches,
            spec.quick,
            options,
        )

    evals = {
        label_name(k): {**aggregate(v), **(aggregate(coding_by_label[k]) if k in coding_by_label else {})}
        for k, v in by_label.items()
    }
    decode = (
        {
            label: speculative_cached(out / f"{label}-s0" / "latest", evals_dir / f"decode-{label}-s0.json")
            for label in ftp_models
        }
        if spec.variants
        else {}
    )
    vocab = TokenData(data).vocab_size
    throughput = {
        label: throughput_cached(spec.preset, model_set, vocab, evals_dir / f"throughput-{label}.json")
        for label, model_set in (ftp_models.items() if spec.variants else ())
    }
    summary = {
        **provenance(),
        "preset": spec.preset,
        "seeds": spec.seeds,
        "corpus": spec.corpus,
        "tokenizer": spec.tokenizer,
        "max_tokens": spec.max_tokens,
        "equal_flops_tokens": flops_tokens,
        "coding_max_tokens": None if spec.skip_coding else (spec.coding_max_tokens or spec.max_tokens),
        "quick": spec.quick,
        "options": options,
        "model_overrides": spec.model_overrides,
        "variants": spec.variants,
        "matched": [_public(m) for m in matched["ftp"]],
        "variant_matched": {label: [_public(m) for m in ms] for label, ms in matched.items() if label != "ftp"},
        "coding_seeds": None if spec.skip_coding else (spec.coding_seeds or spec.seeds),
        "coding_matched": [_public(m) for m in coding_matched.get("ftp", [])],
        "variant_coding_matched": {
            label: [_public(m) for m in ms] for label, ms in coding_matched.items() if label != "ftp"
        },
        "evals": evals,
        "claims": claim_rows(by_label | bands, coding_by_label, 0),
        "variant_claims": {
            label: claim_rows(
                by_label | bands,
                coding_by_label,
                0,
                label,
                {
                    "gpt-matched": matched_label(label),
                    "gpt-band": band_label(label),
                    "gpt-tokens": "gpt-tokens",
                    "gpt-flops": "gpt-flops",
                },
            )
            for label in ftp_models
            if label != "ftp"
        },
        "variant_rows": model_rows(list(ftp_models), evals, decode, throughput) if spec.variants else [],
        "speculative": decode,
        "eval_machines": sorted(
            {
                m
                for p in evals_dir.glob("*.json")
                if p.name != "summary.json" and (m := json.loads(p.read_text()).get("machine"))
            }
        ),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(evals_dir / "summary.json", summary)
    experiment_report(out, summary, by_label, list(ftp_models), matched)
    return summary


def _public(match: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in match.items() if k != "key"}


def match_and_evaluate(
    out: Path,
    data: Path,
    seed: int,
    ftp_labels: list[str],
    ppl_batches: int,
    quick: bool,
    options: dict[str, Any],
    equal_flops: bool,
    found: Found,
) -> None:
    """One seed: each FTP model matched to the GPT checkpoint closest to its perplexity; every suite of every model
    and of every GPT checkpoint within MAX_GAP of it (cached). Appends to found = (the matches per FTP label, the suite
    results per label, each FTP model's band of GPT checkpoints with per-item scores averaged over the band). Called
    as soon as the seed is trained, so a seed's results are in OUT/evals before the next seed starts."""
    matched, by_label, bands = found
    evals_dir = out / "evals"
    paths = {"gpt-tokens": out / f"gpt-s{seed}" / "latest"}
    if equal_flops:
        paths["gpt-flops"] = out / f"gpt-flops-s{seed}" / "latest"
    paths |= match_seed(out, data, ftp_labels, seed, ppl_batches, matched)
    for label, path in paths.items():
        by_label.setdefault(label, []).append(
            evaluate_cached(path, TEXT_SUITES, data, evals_dir / f"{label}-s{seed}.json", quick, options)
        )
    # evaluated already: the matched checkpoints (one FTP model's may fall in another's band) and GPT's final
    # checkpoint (the weights of gpt-tokens)
    known = {ms[-1]["final"]["checkpoint"]: by_label["gpt-tokens"][-1] for ms in matched.values()}
    known |= {ms[-1]["matched"]["checkpoint"]: by_label[matched_label(label)][-1] for label, ms in matched.items()}
    for label in ftp_labels:
        band = [
            known.get(c["checkpoint"])
            or evaluate_cached(
                Path(c["checkpoint"]),
                TEXT_SUITES,
                data,
                evals_dir / f"gpt-s{seed}-step{c['step']}.json",
                quick,
                options,
            )
            for c in perplexity_band(matched[label][-1])
        ]
        if band:
            bands.setdefault(band_label(label), []).append(mean_items(band))


def coding_experiment(
    out: Path,
    preset: str,
    budget: int,
    seeds: int,
    overrides: dict[str, Any],
    ftp_models: dict[str, dict[str, Any]],
    model_overrides: dict[str, Any] | None,
    ppl_batches: int,
    quick: bool,
    options: dict[str, Any],
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]]]:
    """Per seed, every FTP model (the design and each variant) and GPT trained on the coding corpus, each FTP model
    matched to the GPT checkpoint of its perplexity, all scored on the coding suite. Returns the results per label
    and the matches per FTP label, seed by seed."""
    cdata = ensure_data(out / "coding-data", "coding", vocab_size=2048)
    runs = {label: ("ftp", model_set) for label, model_set in ftp_models.items()} | {"gpt": ("gpt", model_overrides)}
    results: dict[str, list[dict[str, Any]]] = {}
    matches: dict[str, list[dict[str, Any]]] = {label: [] for label in ftp_models}
    for seed in range(seeds):
        if not trained_elsewhere(out, seed, list(ftp_models), "coding-"):
            for label, (model_type, model_set) in runs.items():
                run = out / f"coding-{label}-s{seed}"
                ensure_trained(run, cdata, model_type, preset, budget, seed, overrides, model_overrides=model_set)
        paths = {"gpt-tokens": out / f"coding-gpt-s{seed}" / "latest"}
        paths |= match_seed(out, cdata, list(ftp_models), seed, ppl_batches, matches, "coding-")
        for label, path in paths.items():
            cache = out / "evals" / f"coding-{label}-s{seed}.json"
            results.setdefault(label, []).append(evaluate_cached(path, ["coding"], cdata, cache, quick, options))
    return results, matches


def experiment_report(
    out: Path,
    summary: dict[str, Any],
    by_label: dict[str, list[dict[str, Any]]],
    ftp_labels: list[str],
    matched: dict[str, list[dict[str, Any]]],
) -> None:
    """OUT/report/report.md + .html from the summary."""

    seeds, variants = summary["seeds"], summary["variants"]
    flops = by_label.get("gpt-flops", [])  # empty when GPT at equal FLOPs was left out: so is its column

    def match_row(name: str, m: dict[str, Any], flops_ppl: str) -> list[str]:
        return [
            name,
            f"{m['ftp_ppl']:.3f}",
            f"{m['matched']['ppl']:.3f} (step {m['matched']['step']})",
            f"{m['gap']:.2%}" + ("" if m["gap_ok"] else " > 3%!"),
            f"{m['final']['ppl']:.3f} (step {m['final']['step']})",
            *([flops_ppl] if flops else []),
        ]

    match_rows = [
        match_row(f"s{s}", m, f"{flops[s]['ppl']['metrics']['ppl']['value']:.3f}" if flops else "")
        for s, m in enumerate(matched["ftp"])
    ]
    coding_matched = {"ftp": summary["coding_matched"], **summary["variant_coding_matched"]}
    for label, ms in coding_matched.items():
        name = "" if label == "ftp" else f", {label_name(label)}"
        match_rows += [match_row(f"coding s{seed}{name}", m, "-") for seed, m in enumerate(ms)]
    baselines = [k for k in BASELINES if flops or k != "gpt-flops"]
    claim_table = [[r["claim"], r["metric"], *(format_diff(r.get(k)) for k in baselines)] for r in summary["claims"]]
    gpts = ("gpt", "gpt-flops") if flops else ("gpt",)
    # a seed trained elsewhere draws its curves from the compact logs it left in OUT/evals (keep_log)
    names = [f"{t}-s{s}" for s in range(seeds) for t in (*ftp_labels, *gpts)]
    runs = {name: out / name if (out / name).exists() else out / "evals" / "logs" / name for name in names}
    runs = {name: run for name, run in runs.items() if run.exists()}
    samples = {
        label_name(k): v[0]["coherence"]["examples"]
        for k, v in by_label.items()
        if v and v[0].get("coherence", {}).get("examples")
    }
    command = summary["command"]
    notes = [
        f"Preset `{summary['preset']}`, {seeds} seed(s), {summary['max_tokens']:,} training tokens per text model "
        + (
            f"({summary['equal_flops_tokens']:,} for GPT at equal FLOPs)"
            if summary["equal_flops_tokens"]
            else "(GPT at equal FLOPs not trained)"
        )
        + (
            ""
            if summary["coding_max_tokens"] is None
            else f", {summary['coding_max_tokens']:,} per coding model ({summary['coding_seeds']} seed(s))"
        )
        + f"; {'quick' if summary['quick'] else 'full'} suite sizes"
        + "".join(f", {k} = {v}" for k, v in summary["model_overrides"].items())
        + ".",
        f"Date {summary['date']}, machine {machines(summary)}" + (f", command `{command}`" if command else "") + ".",
        "Values are means over seeds ± std across seeds, with a 95% CI in brackets: a hierarchical bootstrap (seeds, "
        "then items within seeds) where the metric has per-item scores, else a t interval over seeds (one seed: a "
        "bootstrap over items). Differences are FTP − GPT over the same prompts / documents / problems within each "
        "seed, averaged over seeds, with the hierarchical bootstrap 95% CI.",
    ]
    paths = write_report(
        out / "report",
        runs,
        summary["evals"],
        samples,
        title="ftplm experiment paper: FTP vs GPT",
        notes=notes,
        extra_tables=[
            (
                "Matched perplexity (val ppl on identical windows)",
                ["seed", "FTP", "GPT matched checkpoint", "gap", "GPT (equal tokens)"]
                + (["GPT (equal FLOPs)"] if flops else []),
                match_rows,
            ),
            (
                "The paper's claims: FTP − GPT",
                ["claim", "metric", *(f"vs {LABELS[k]}" for k in baselines)],
                claim_table,
            ),
            *variant_tables(variants, summary["claims"], summary["variant_claims"], matched, summary["variant_rows"]),
        ],
    )
    log(f"report: {paths['md']} / {paths['html']} ({summary['seconds']:.0f}s)")
