"""The `ftplm` command. Each subcommand is a plain typed function; its arguments come from the signature.

Positional parameters become positional arguments, keyword-only ones become --options (required when they have
no default), `bool` becomes a flag, `Literal[...]` becomes choices, `list[T]` a repeatable option, and the
"Args:" section of the docstring gives each one its help. Bad input anywhere ends as one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys
import typing
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np

from ftplm import __version__
from ftplm.api import load
from ftplm.bench.decode import bench_decode as run_bench_decode
from ftplm.bench.train import bench_train as run_bench_train
from ftplm.checkpoint import run_data_dir, write_json, write_text
from ftplm.config import (
    ModelConfig,
    TrainConfig,
    load_config_file,
    parse_duration,
    parse_override,
    with_overrides,
    write_config_file,
)
from ftplm.data import prepare as run_prepare
from ftplm.demo import run_demo
from ftplm.errors import FtplmError
from ftplm.eval import OPTIONS, headline, run_suites
from ftplm.experiment import TEXT_CORPUS, PaperExperiment, paper_experiment
from ftplm.generate import GenerationConfig
from ftplm.gpucheck import gpu_check
from ftplm.machine import command_line
from ftplm.report import report as run_report
from ftplm.results import generated_pages
from ftplm.train import train as run_train

COMMANDS: dict[str, Callable[..., Any]] = {}
# command -> {list option: the field names a --config file may give it}, e.g. train: {"set": model + train fields}
ConfigFields = Callable[[], dict[str, set[str]]]
CONFIG_FIELDS: dict[str, ConfigFields] = {}
Drafters = Literal["ftp", "ftp-recycling", "ftp-lookup", "recycling", "lookup"]  # ftplm.drafters' registry


def command(
    fn: Callable[..., Any] | None = None, *, name: str | None = None, config: ConfigFields | None = None
) -> Any:
    """Register a subcommand; a name with a space ("bench train") makes a nested subcommand. config: the command
    takes --config FILE, whose keys are its own options or the fields of its repeatable --set-like options."""

    def register(f: Callable[..., Any]) -> Callable[..., Any]:
        key = name or f.__name__.rstrip("_").replace("_", "-")
        COMMANDS[key] = f
        if config is not None:
            CONFIG_FIELDS[key] = config
        return f

    return register(fn) if fn is not None else register


# ------------------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------------------
@command
def prepare(
    *,
    corpus: str,
    out: str,
    vocab_size: int = 8192,
    tokenizer: str = "bpe",
    val_frac: float = 0.05,
    test_frac: float = 0.10,
    seed: int = 0,
    max_heldout_docs: int = 10_000,
    tokenizer_docs: int | None = None,
    workers: int = 1,
) -> None:
    """Split a corpus into train/val/test documents, train the tokenizer, write token shards: one pass over the
    corpus (a streamed dataset is downloaded once).

    Args:
        corpus: shakespeare, wiki-vital, bbc-news, python-code, a .txt/.jsonl file or folder, or an HF dataset
            name; several joined by commas (e.g. wiki-vital,shakespeare)
        out: data directory to write (replaced atomically if it is an earlier ftplm data directory)
        vocab_size: BPE vocabulary size (ignored with --tokenizer gpt2)
        tokenizer: bpe = byte-level BPE trained on the training split; gpt2 = GPT-2's own 50257-token vocabulary;
            or the tokenizer of a run, saved model, data directory or tokenizer.json (data for `train --init-from`)
        val_frac: fraction of documents held out for validation
        test_frac: fraction of documents held out for testing (classification, coherence prompts)
        seed: seed of the document split
        max_heldout_docs: at most this many documents per held-out split (a large corpus holds out smaller
            fractions: 5% of OpenWebText would be 400k documents)
        tokenizer_docs: train the BPE on the first this many training documents only (default: all of them, up to
            1 GB of text)
        workers: tokenizer processes (1: in this process, whose tokenizer already uses every core)
    """
    meta = run_prepare(
        corpus,
        out,
        vocab_size,
        tokenizer,
        val_frac,
        test_frac,
        seed,
        tokenizer_docs=tokenizer_docs,
        max_heldout_docs=max_heldout_docs,
        workers=workers,
    )
    splits = ", ".join(f"{s} {v['tokens']:,} tokens / {v['documents']:,} docs" for s, v in meta["splits"].items())
    print(f"prepared {out}: vocab {meta['vocab_size']}; {splits}")


def _split_overrides(items: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """--set key=value pairs, routed to the model or the training config by field name."""
    model_fields = {f.name for f in fields(ModelConfig)}
    train_fields = {f.name for f in fields(TrainConfig)}
    model_over: dict[str, Any] = {}
    train_over: dict[str, Any] = {}
    for item in items:
        key, value = parse_override(item)
        if key in model_fields:
            model_over[key] = value
        elif key in train_fields:
            train_over[key] = value
        else:
            raise FtplmError(f"--set: unknown config field {key!r}")
    return model_over, train_over


def _model_and_train_fields() -> dict[str, set[str]]:
    return {
        "set": {f.name for f in fields(ModelConfig) if f.name != "model_type"} | {f.name for f in fields(TrainConfig)}
    }


@command(config=_model_and_train_fields)
def train(
    *,
    out: str,
    data: str | None = None,
    model: Literal["ftp", "gpt"] | None = None,
    preset: Literal["tiny", "mini", "small", "base"] = "small",
    max_steps: int | None = None,
    max_tokens: int | None = None,
    time_budget: str | None = None,
    resume: bool = False,
    batch_size: int | None = None,
    grad_accum: int | None = None,
    learning_rate: float | None = None,
    seed: int | None = None,
    dtype: Literal["auto", "bf16", "fp32"] | None = None,
    device: str = "auto",
    set: list[str] = [],  # noqa: A002 - the option is called --set
    no_progress: bool = False,
    strategy: Literal["ddp", "fsdp"] = "ddp",
    backend: Literal["auto", "gloo", "nccl"] = "auto",
    dist_timeout: float = 1800.0,
    logger: list[str] = [],
    init_from: str | None = None,
    config: str | None = None,
) -> None:
    """Train an FTP model or its GPT baseline on a prepared data directory (several processes: torchrun -m ftplm train).

    Args:
        out: run directory (checkpoints, log.jsonl, run_config.yaml); must not hold a run unless --resume
        data: data directory from `ftplm prepare` (required, here or in --config)
        model: ftp (future token prediction) or gpt (the baseline); default ftp, or --init-from's type
        preset: model + training size: tiny (tests), mini (the demo), small (CPU, ~1h with native bf16), base (the paper's scale, GPU)
        max_steps: stop after this many optimizer steps
        max_tokens: stop after this many training tokens
        time_budget: stop after this much training time, e.g. 90s, 5m, 1.5h
        resume: continue the run in --out exactly where its latest checkpoint stopped
        batch_size: sequences per micro-batch (default from the preset)
        grad_accum: micro-batches per optimizer step
        learning_rate: peak learning rate
        seed: training seed (batches and initialisation)
        dtype: auto (default: bf16 autocast where the hardware has native bf16, else fp32), bf16 or fp32
        device: auto, cpu or cuda
        set: any config field, e.g. --set n_future=8 --set gamma=0.9 (repeatable)
        no_progress: no progress bar
        strategy: under torchrun: ddp (replicate the model) or fsdp (shard parameters, gradients and optimizer
            state with FSDP2, for models that do not fit one device)
        backend: under torchrun: process-group backend; auto = nccl on CUDA, gloo on CPU
        dist_timeout: under torchrun: seconds to wait for peers (joining, and each collective) before failing
        logger: also log to csv (RUN/metrics.csv), tensorboard (RUN/tensorboard) or wandb (offline unless
            WANDB_MODE=online); repeatable; log.jsonl is always written
        init_from: start from the weights of this run, checkpoint or saved model (same tokenizer), with a fresh
            optimizer and schedule: continued pretraining or fine-tuning on --data
        config: YAML or JSON file of settings: any option above or --set field (flags given here win); the
            resolved settings are saved as RUN/run_config.yaml
    """
    if data is None:  # a resumed run knows its data
        found = run_data_dir(out) if resume and (Path(out) / "latest").exists() else None
        if found is None:
            raise FtplmError("say which data to train on: --data DIR (or data: in --config)")
        data = str(found)
    model_over, train_over = _split_overrides(set)
    if logger:
        train_over["loggers"] = logger
    explicit = {
        "max_steps": max_steps,
        "max_tokens": max_tokens,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "learning_rate": learning_rate,
        "seed": seed,
        "dtype": dtype,
        "time_budget": parse_duration(time_budget) if time_budget is not None else None,
    }
    train_over.update({k: v for k, v in explicit.items() if v is not None})
    if resume and model_over:
        raise FtplmError("--resume continues a run with its own model config; model fields cannot be changed")
    info = run_train(
        data,
        out,
        model_type=model,
        preset_name=preset,
        model_overrides=model_over,
        train_overrides=train_over,
        resume=resume,
        device=device,
        progress=not no_progress,
        strategy=strategy,
        backend=backend,
        dist_timeout=dist_timeout,
        init_from=init_from,
    )
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun only rank 0 reports
    ppl = f", val ppl {info.val['ppl']:.2f}" if info.val else ""
    print(
        f"trained {info.model_type} to step {info.step} ({info.tokens:,} tokens, {info.elapsed:.0f}s){ppl}; saved {out}"
    )


@command
def generate(
    run: str,
    *,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    speculative: Literal["none", "auto", Drafters] = "none",
    draft_len: int | None = None,
    tree: bool = False,
    adaptive: bool = False,
) -> None:
    """Continue a prompt with a trained model and print the text.

    Args:
        run: run directory or saved model
        prompt: text to continue
        max_new_tokens: tokens to generate (fewer if the context fills up or the model ends the text)
        temperature: sampling temperature; 0 = greedy
        top_k: sample only among the k most likely tokens
        top_p: nucleus sampling: the smallest set of tokens with this much probability
        seed: random seed for reproducible samples
        speculative: lossless faster decoding: ftp (FTP models draft with their own decoder), ftp-recycling (ftp,
            extended by Token Recycling), ftp-lookup (ftp or prompt lookup, whichever pays), recycling (Token
            Recycling), lookup (prompt lookup) or auto (ftp-lookup for FTP models; lookup for GPT when greedy, none
            when sampling); same output as none
        draft_len: tokens drafted per step (default per drafter; ftp: at most n_future-1)
        tree: verify a tree of draft candidates instead of a single chain (recycling always drafts a tree)
        adaptive: choose each step's draft length (up to draft_len) from the acceptances so far
    """
    if not prompt:
        raise FtplmError("the prompt is empty")
    config = GenerationConfig(
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        speculative=speculative,
        draft_len=draft_len,
        tree=tree or None,
        adaptive=adaptive,
    )  # checked before loading
    print(load(run).generate(prompt, config))


@command
def export(run: str, out: str, *, format: Literal["hf"] = "hf") -> None:  # noqa: A002 - the option is called --format
    """Export a trained model for other tools: a Hugging Face transformers directory (model, config, tokenizer).

    Args:
        run: run directory or saved model
        out: directory to write (must not exist, or be empty); written atomically
        format: hf = GPT runs as plain GPT-2, FTP runs with their modeling code (load with trust_remote_code=True)
    """
    from ftplm.hf.export import export_hf

    exported = export_hf(run, out)
    remote = ", trust_remote_code=True" if exported.model_type == "ftp" else ""
    print(f'exported {run} ({exported.model_type}) to {out}: AutoModelForCausalLM.from_pretrained("{out}"{remote})')


@command
def embed(run: str, *, input: str, out: str, pooling: Literal["mean", "last"] = "mean") -> None:  # noqa: A002 - the option is called --input
    """Embed texts with a trained model's state vectors and save them as a (n_texts, n_embd) .npy array.

    Args:
        run: run directory or saved model
        input: texts to embed: a .jsonl file with a "text" field per line, or a text file with one text per line
        out: .npy file to write (float32, L2-normalised rows in input order)
        pooling: mean = average of the per-token state vectors; last = the final token's vector
    """
    src, dst = Path(input), Path(out)
    if not src.is_file():
        raise FtplmError(f"no such file: {src}")
    if dst.suffix != ".npy":
        raise FtplmError(f"--out must end in .npy, got {dst}")
    lines = [line for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    if src.suffix == ".jsonl":
        try:
            texts = [json.loads(line)["text"] for line in lines]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise FtplmError(f'{src}: every line must be a JSON object with a "text" field ({e})') from None
    else:
        texts = lines
    if not texts:
        raise FtplmError(f"{src} holds no texts")
    vectors = load(run).embed(texts, pooling)
    tmp = dst.with_name(dst.name + ".tmp.npy")
    np.save(tmp, vectors)
    tmp.replace(dst)  # atomic: a failed run leaves an existing --out untouched
    print(f"embedded {len(texts)} texts -> {dst} {vectors.shape}")


@command
def demo(
    *,
    out: str = "runs/demo",
    budget: str = "150s",
    corpus: str = "wiki-vital",
    preset: Literal["tiny", "mini", "small"] = "mini",
) -> None:
    """The main job: prepare data, train FTP and GPT for a fixed time each, compare them, write a report.

    Args:
        out: directory for data, runs and the report
        budget: training time for each model, e.g. 150s or 3m
        corpus: corpus to train on
        preset: model size
    """
    run_demo(Path(out), parse_duration(budget), corpus, preset)


def _eval_options() -> dict[str, set[str]]:
    return {"set": set(OPTIONS)}


@command(name="eval", config=_eval_options)
def eval_(
    run: str,
    *,
    suite: Literal["all", "ppl", "smoothness", "coherence", "classify", "coding", "retrieval"] = "all",
    against: str | None = None,
    json: str | None = None,
    quick: bool = False,
    seed: int = 0,
    data: str | None = None,
    set: list[str] = [],  # noqa: A002 - the option is called --set
    config: str | None = None,
) -> None:
    """Measure a run (and another on identical data) with the evaluation suites: metrics, 95% CIs, n, checkpoint.

    Args:
        run: run directory, checkpoint directory or saved model
        suite: all = ppl, smoothness, coherence, classify, coding; or one of them (retrieval: extra)
        against: a second run evaluated on the same data, prompts and seeds; paired differences RUN - AGAINST
        json: write all results to this JSON file (the input of `ftplm report`)
        quick: small suite sizes (the demo's, and the tests')
        seed: seed of document choice, sampling and bootstrap
        data: prepared data directory (default: the one the run was trained on)
        set: suite size, e.g. --set coherence_prompts=50 --set classify_docs=500 --set coding_problems=1000;
            --set layer=L: smoothness and classify read the vectors after the first L trunk blocks (default: the top)
        config: YAML or JSON file of settings: any option above or --set field (flags given here win); the
            resolved settings are saved in the --json file under "config"
    """
    options = dict(parse_override(item) for item in set)
    result = run_suites(run, suite, against, quick=quick, seed=seed, options=options, data_dir=data)
    result["config"] = {"suite": suite, "against": against, "quick": quick, "seed": seed, "data": data, **options}
    for name, d in result.get("diff", {}).items():
        if isinstance(d, dict):
            print(f"{result['diff']['of']} {name}: {headline({'metrics': d, 'headline': list(d)})}")
    _emit(result, json)


@command
def report(run_a: str, run_b: str | None = None, *, out: str, title: str = "ftplm report: FTP vs GPT") -> None:
    """Markdown + self-contained HTML report with PNG plots comparing two runs (or `ftplm eval --json` files).

    Args:
        run_a: a run directory, or an `ftplm eval --json` file (which may hold both runs)
        run_b: a second run directory or eval JSON file
        out: directory for report.md, report.html and plots/
        title: the report's title
    """
    paths = run_report([x for x in (run_a, run_b) if x], out, title)
    print(f"wrote {paths['md']} and {paths['html']}")


def _experiment_fields() -> dict[str, set[str]]:
    model = {f.name for f in fields(ModelConfig) if f.name not in ("model_type", "vocab_size")}
    return {"set": set(OPTIONS), "train_set": {f.name for f in fields(TrainConfig)}, "model_set": model}


@command(name="experiment paper", config=_experiment_fields)
def experiment_paper(
    *,
    out: str = "runs/paper",
    preset: Literal["tiny", "mini", "small", "base"] = "small",
    seeds: int = 3,
    max_tokens: int = 200_000,
    coding_max_tokens: int | None = None,
    coding_seeds: int | None = None,
    quick: bool = False,
    skip_coding: bool = False,
    skip_equal_flops: bool = False,
    ppl_batches: int = 20,
    set: list[str] = [],  # noqa: A002 - the option is called --set
    train_set: list[str] = [],
    model_set: list[str] = [],
    variant: list[str] = [],
    corpus: str = TEXT_CORPUS,
    tokenizer: str = "bpe",
    config: str | None = None,
) -> None:
    """The paper's four claims: train FTP and GPT per seed (or reuse/resume runs in OUT), match perplexity, evaluate, report.

    Args:
        out: experiment directory: data, ftp-s{seed}, gpt-s{seed}, coding-*, evals/, report/ (existing runs are reused)
        preset: model size of every run
        seeds: training seeds 0..seeds-1 of every model
        max_tokens: training tokens per text model
        coding_max_tokens: training tokens per coding model (default: --max-tokens)
        coding_seeds: seeds of the coding models (default: --seeds)
        quick: small suite sizes (a smoke run of the whole pipeline)
        skip_coding: leave out the coding task (its corpus, models and suite)
        skip_equal_flops: leave out GPT at equal FLOPs (the longest run of an experiment: ~1.7x GPT's tokens)
        ppl_batches: 8-window batches for every val perplexity (FTP and each GPT checkpoint: same windows)
        set: suite size, e.g. --set coherence_prompts=50 (see `ftplm eval --help`)
        train_set: training config for runs started here, e.g. --train-set save_interval=10
        model_set: model config of every run over the preset, e.g. an FTP variant: --model-set decoder_inputs=masked
            (FTP-only fields leave GPT unchanged)
        variant: an FTP variant trained beside the paper's design and compared with the same GPT runs at its own
            matched perplexity, NAME:FIELD=VALUE[,FIELD=VALUE], e.g. --variant masked:decoder_inputs=masked
        corpus: training corpus, anything `ftplm prepare` takes (e.g. a streamed Hugging Face dataset:
            --corpus Skylion007/openwebtext); the topic suites read wiki-vital and bbc-news from their packages
        tokenizer: bpe (trained on the corpus) or gpt2
        config: YAML or JSON file of settings: any option above, eval --set field or training field (flags given
            here win); the resolved settings are saved as OUT/experiment_config.yaml
    """
    options, train_overrides = dict(parse_override(x) for x in set), dict(parse_override(x) for x in train_set)
    model_overrides = dict(parse_override(x) for x in model_set)
    variants = dict(_variant(x) for x in variant)
    resolved = {
        "preset": preset,
        "seeds": seeds,
        "max_tokens": max_tokens,
        "coding_max_tokens": coding_max_tokens,
        "coding_seeds": coding_seeds,
        "quick": quick,
        "skip_coding": skip_coding,
        "skip_equal_flops": skip_equal_flops,
        "ppl_batches": ppl_batches,
        **options,
        **train_overrides,
        **model_overrides,
        **({"variant": variant} if variant else {}),
        "corpus": corpus,
        "tokenizer": tokenizer,
    }
    spec = PaperExperiment(
        preset=preset,
        seeds=seeds,
        max_tokens=max_tokens,
        coding_max_tokens=coding_max_tokens,
        coding_seeds=coding_seeds,
        quick=quick,
        skip_coding=skip_coding,
        skip_equal_flops=skip_equal_flops,
        ppl_batches=ppl_batches,
        options=options,
        train_overrides=train_overrides,
        model_overrides=model_overrides,
        variants=variants,
        corpus=corpus,
        tokenizer=tokenizer,
    )  # checked before anything is written
    Path(out).mkdir(parents=True, exist_ok=True)
    write_config_file(
        Path(out) / "experiment_config.yaml",
        resolved,
        f"The settings of this experiment, resolved.\nftplm experiment paper --config THIS_FILE --out {out} runs it again.",
    )
    paper_experiment(out, spec)


def _variant(text: str) -> tuple[str, dict[str, Any]]:
    """NAME:FIELD=VALUE[,FIELD=VALUE] -> (NAME, {FIELD: VALUE}), checked now (not after hours of training) as an
    FTP model config."""
    name, _, settings = text.partition(":")
    if not name or not name.replace("-", "").replace("_", "").isalnum() or not settings:
        raise FtplmError(
            f"--variant expects NAME:FIELD=VALUE[,FIELD=VALUE] (NAME letters, digits, - or _), got {text!r}"
        )
    overrides = dict(parse_override(x) for x in settings.split(","))
    with_overrides(ModelConfig(), overrides).validate()
    return name, overrides


@command
def docs(*, docs_dir: str = "docs", readme: str = "README.md", check: bool = False) -> None:
    """Regenerate the results pages from the committed JSON: docs/results.md and the README's results table.

    Args:
        docs_dir: the documentation directory (experiments' docs/*/summary.json, benchmarks' docs/bench/*.json)
        readme: the README whose results table is regenerated ("" for none)
        check: write nothing; fail if a page differs from what the JSON generates
    """
    root = Path(docs_dir)
    if not root.is_dir():
        raise FtplmError(f"no such directory: {root}")
    if readme and not Path(readme).is_file():
        raise FtplmError(f"no such file: {readme}")
    pages = generated_pages(root, Path(readme) if readme else None)
    if check:
        stale = [str(p) for p, text in pages.items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
        if stale:
            raise FtplmError(f"out of date: {', '.join(stale)}: run `ftplm docs`")
        print("results pages are up to date")
        return
    for page, text in pages.items():
        write_text(page, text)
        print(f"wrote {page}")


@command(name="gpu-check")
def gpu_check_(
    *,
    out: str = "gpu-check",
    preset: Literal["tiny", "mini", "small", "base"] | None = None,
    steps: int = 40,
    data: str | None = None,
) -> None:
    """The GPU checks in one run (`make gpu-check`): CUDA tests, bench train, train + kill + resume, bench decode, DDP.

    Args:
        out: directory for the runs and OUT/gpu-check.json (rewritten after every step)
        preset: model size (default: base on CUDA, tiny elsewhere)
        steps: training steps of each short run (killed halfway, then resumed)
        data: a prepared data directory (default: wiki-vital, or the Python standard library, prepared into OUT/data)
    """
    gpu_check(out, preset, steps, data)


@command(name="bench train")
def bench_train(
    *,
    preset: Literal["tiny", "mini", "small", "base"] = "small",
    steps: int = 8,
    warmup: int = 2,
    batch_size: int | None = None,
    dtype: Literal["auto", "bf16", "fp32"] | None = None,
    set: list[str] = [],  # noqa: A002 - the option is called --set
    json: str | None = None,
) -> None:
    """Training throughput of GPT and FTP with the same trunk, measured interleaved in one run, and their ratio.

    Args:
        preset: model size
        steps: timed steps per model (interleaved)
        warmup: untimed steps per model first
        batch_size: sequences per step (default from the preset)
        dtype: training dtype (default: the preset's, auto)
        set: model config field, e.g. --set dec_n_embd=128 --set n_future=8 (repeatable)
        json: also write the figures to this JSON file
    """
    model_over, train_over = _split_overrides(set)
    if train_over:
        raise FtplmError(f"bench train takes model fields only with --set, not {', '.join(train_over)}")
    _emit(
        run_bench_train(
            preset=preset, steps=steps, warmup=warmup, batch_size=batch_size, dtype=dtype, overrides=model_over
        ),
        json,
    )


@command
def serve(
    run: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    speculative: Literal["auto", "none", Drafters] = "auto",
    adaptive: bool = False,
    max_tokens_cap: int | None = None,
) -> None:
    """OpenAI-compatible HTTP server: /v1/completions (streaming too), /v1/embeddings, /v1/models, /health.

    Args:
        run: run directory or saved model
        host: interface to listen on (127.0.0.1 = this machine only)
        port: TCP port
        model_name: the model id clients pass as "model" (default: the run directory's name)
        speculative: auto = per request: ftp-lookup for FTP models; lookup for greedy GPT requests, plain for
            sampled ones; or a drafter, or none
        adaptive: with a drafter, choose each round's draft length from the acceptances so far
        max_tokens_cap: the largest max_tokens a request may ask for (default: the model's context length)
    """
    from ftplm.serve import serve as run_serve

    if not 0 <= port <= 65535:
        raise FtplmError(f"--port must be in 0..65535, got {port}")
    run_serve(
        run,
        host,
        port,
        model_name=model_name,
        speculative=None if speculative == "none" else speculative,
        adaptive=adaptive,
        max_tokens_cap=max_tokens_cap,
    )


@command(name="bench serve")
def bench_serve(
    run: str,
    *,
    clients: int = 50,
    requests: int = 500,
    max_tokens: int = 8,
    speculative: Literal["auto", "none", Drafters] = "auto",
    json: str | None = None,
) -> None:
    """HTTP load on a loopback server for RUN: p50/p99 latency, throughput, error counts.

    Args:
        run: run directory or saved model
        clients: concurrent clients
        requests: requests in all (half streamed, half greedy, half sampled)
        max_tokens: tokens per completion
        speculative: auto = per request: ftp-lookup for FTP models; lookup for greedy GPT requests, plain for
            sampled ones; or a drafter, or none
        json: also write the figures to this JSON file
    """
    from ftplm.bench.serve import bench_serve as run_bench

    if clients < 1 or requests < 1 or max_tokens < 1:
        raise FtplmError("--clients, --requests and --max-tokens must be positive")
    _emit(run_bench(run, clients, requests, max_tokens, None if speculative == "none" else speculative), json)


@command(name="bench decode")
def bench_decode(
    run: str,
    *,
    prompts: int = 8,
    max_new_tokens: int | None = None,
    prompt_tokens: int | None = None,
    method: list[str] = [],
    temperature: list[float] = [],
    seed: int = 0,
    threads: int | None = None,
    batch_size: int = 1,
    json: str | None = None,
) -> None:
    """Plain vs speculative decoding speed (tokens/s, speedup, tau) on held-out prompts, greedy and temperature 1.

    Args:
        run: run directory (its held-out validation documents give the prompts)
        prompts: number of held-out prompts
        max_new_tokens: tokens generated per prompt, no stop at EOS (default 128, or what the context leaves)
        prompt_tokens: prompt length in tokens (default 64, or a quarter of a shorter context)
        method: plain, ftp, ftp-adaptive, ftp-tree, ftp-recycling, ftp-lookup, recycling, recycling-adaptive,
            lookup (repeatable; default all that apply to the model); oracle-K, greedy only, is the ceiling for
            drafts K deep: plain greedy decoding's own next K tokens, drafted at no cost
        temperature: sampling temperatures to measure, 0 = greedy (repeatable; default 0 and 1)
        seed: sampling seed
        threads: torch CPU threads (default: torch's, one per core)
        batch_size: prompts generated together (plain decoding batched too; speculative: verified together)
        json: also write the figures to this JSON file
    """
    temperatures = tuple(temperature) or (0.0, 1.0)
    _emit(
        run_bench_decode(
            run, prompts, max_new_tokens, prompt_tokens, method or None, temperatures, seed, threads, batch_size
        ),
        json,
    )


@command(name="lm-eval")
def lm_eval_(*args: str) -> None:
    """lm-evaluation-harness with the `ftplm` model registered: `ftplm lm-eval --model ftplm --model_args pretrained=RUN --tasks ...`.

    Args:
        args: lm-eval's own arguments, passed on verbatim (`ftplm lm-eval --help` lists them); local tasks over
            held-out documents: `ftplm lm-eval-tasks`, then --tasks ftplm_heldout --include_path DIR
    """
    try:
        from ftplm.lmeval import run_cli
    except ImportError as e:
        raise FtplmError(str(e)) from None
    run_cli(list(args))


@command(name="lm-eval-tasks")
def lm_eval_tasks(
    *, data: str, out: str, docs: int = 200, split: Literal["test", "val"] = "test", seed: int = 0
) -> None:
    """Write lm-eval tasks (JSONL + YAML) over a data directory's held-out documents, for `ftplm lm-eval --include_path OUT`.

    Args:
        data: data directory from `ftplm prepare`
        out: directory for the tasks: ftplm_heldout_ppl (perplexity), ftplm_heldout_continuation and
            ftplm_heldout_topic (multiple choice), ftplm_heldout_next_word (generation); tag ftplm_heldout = all of them
        docs: held-out documents to use (the first ones)
        split: held-out split to read
        seed: seed of the multiple-choice distractors and their order
    """
    try:
        from ftplm.lmeval import write_tasks
    except ImportError as e:
        raise FtplmError(str(e)) from None
    names = write_tasks(data, out, docs, split, seed)
    print(f"wrote {len(names)} tasks to {out}: {', '.join(names)} (tag: ftplm_heldout)")


def _emit(result: dict[str, Any], json_path: str | None) -> None:
    """Write a benchmark's figures to --json (atomically) when asked, with the command that produced them; the
    benchmark prints its own table."""
    if json_path:
        write_json(Path(json_path), {"command": command_line(), **result})


# ------------------------------------------------------------------------------------------------------
# the parser, from signatures
# ------------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, exit 2 (argparse prints usage + error)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _param_help(doc: str) -> dict[str, str]:
    helps: dict[str, str] = {}
    if "Args:" not in doc:
        return helps
    current = None
    for line in doc.split("Args:", 1)[1].splitlines():
        m = re.match(r"\s+(\w+): (.*)", line)
        if m and (current is None or len(line) - len(line.lstrip()) <= 8):
            current = m.group(1)
            helps[current] = m.group(2).strip()
        elif current and line.strip():
            helps[current] += " " + line.strip()
    return helps


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, getattr(__import__("types"), "UnionType", Union)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _add_params(parser: argparse.ArgumentParser, fn: Callable[..., Any], suppress_defaults: bool = False) -> None:
    """Arguments from fn's signature; suppress_defaults leaves out what was not given (to tell it from a default)."""
    doc = inspect.getdoc(fn) or ""
    helps = _param_help(doc)
    hints = typing.get_type_hints(fn)
    for name, param in inspect.signature(fn).parameters.items():
        tp = _unwrap_optional(hints.get(name, str))
        kwargs: dict[str, Any] = {"help": helps.get(name, "").replace("%", "%%")}
        if typing.get_origin(tp) is Literal:
            kwargs["choices"] = list(typing.get_args(tp))
        elif typing.get_origin(tp) is list:
            kwargs.update(action="append", default=[], type=(typing.get_args(tp) or (str,))[0])
        elif tp is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = tp
        if param.kind is inspect.Parameter.VAR_POSITIONAL:  # the rest of the line, verbatim: main passes it on
            parser.add_argument(name, nargs=argparse.REMAINDER, help=kwargs["help"])
            continue
        if param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
            if param.default is not inspect.Parameter.empty:
                kwargs.update(nargs="?", default=param.default)
            parser.add_argument(name, **kwargs)
            continue
        flag = "--" + name.replace("_", "-")
        if param.default is inspect.Parameter.empty:
            kwargs["required"] = True
        elif "default" not in kwargs:
            kwargs["default"] = param.default
            if param.default not in (None, False) and kwargs["help"]:
                kwargs["help"] += f" (default: {param.default})"
        if suppress_defaults:
            kwargs["default"] = argparse.SUPPRESS
        parser.add_argument(flag, dest=name, **kwargs)


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ftplm", description="Future Token Prediction language models: train, evaluate, generate, serve."
    )
    parser.add_argument("--version", action="version", version=f"ftplm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    groups: dict[str, Any] = {}
    for name, fn in COMMANDS.items():
        doc = inspect.getdoc(fn) or ""
        summary = doc.split("\n\n")[0]
        summary_help = summary.replace("%", "%%")  # argparse %-formats help strings ("95% CIs")
        if " " in name:  # nested: "bench train" -> `ftplm bench train`
            group, leaf = name.split(" ", 1)
            if group not in groups:
                gp = sub.add_parser(group, help=f"{group} subcommands", description=f"{group} subcommands")
                groups[group] = gp.add_subparsers(
                    dest="subcommand", metavar="KIND", parser_class=_Parser, required=True
                )
            p = groups[group].add_parser(leaf, help=summary_help, description=summary)
        else:
            p = sub.add_parser(name, help=summary_help, description=summary)
        _add_params(p, fn, suppress_defaults)
        p.set_defaults(_fn=fn)
    return parser


def _with_config_file(name: str, kwargs: dict[str, Any], argv: list[str] | None) -> dict[str, Any]:
    """Arguments with a --config file's settings filled in: a key is one of the command's options (used unless
    given on the command line) or a field of one of its repeatable options (put before the command line's own
    items, so that those win). Unknown keys and values of the wrong type are one-line errors."""
    path = kwargs["config"]
    settings = load_config_file(path)
    given = set(vars(build_parser(suppress_defaults=True).parse_args(argv)))
    fields = CONFIG_FIELDS[name]()
    fn = COMMANDS[name]
    hints = typing.get_type_hints(fn)
    given |= {item.split("=", 1)[0].strip() for option in fields for item in kwargs[option]}  # --set k=v gives k
    from_file: dict[str, list[str]] = {option: [] for option in fields}
    unknown = []
    for key, value in settings.items():
        option = next((o for o, names in fields.items() if key in names), None)
        if key in hints and key not in fields and key not in ("config", "return"):
            value = _config_value(value, hints[key], f"{path}: {key}")  # checked even where a flag wins
            if key not in given:
                kwargs[key] = value
        elif option is not None:
            from_file[option].append(f"{key}={json.dumps(value)}")
        else:
            unknown.append(key)
    if unknown:
        raise FtplmError(
            f"{path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"for `ftplm {name}` (see --help)"
        )
    return {**kwargs, **{option: items + kwargs[option] for option, items in from_file.items()}}


def _config_value(value: Any, tp: Any, where: str) -> Any:
    """A config file's value checked against the option's type (YAML gives str/int/float/bool/list/None)."""
    optional = tp is not _unwrap_optional(tp)
    tp = _unwrap_optional(tp)
    if value is None and optional:
        return None
    if typing.get_origin(tp) is list:
        items = value if isinstance(value, list) else [value]
        return [_config_value(v, (typing.get_args(tp) or (str,))[0], where) for v in items]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, (str, int, float)) and not isinstance(value, bool),
    }
    if typing.get_origin(tp) is Literal:
        if value not in typing.get_args(tp):
            raise FtplmError(f"{where} must be one of {', '.join(map(str, typing.get_args(tp)))}, got {value!r}")
        return value
    if not ok.get(tp, True):
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]
        raise FtplmError(f"{where} must be {kind}, got {value!r}")
    return tp(value) if tp in (float, str) else value


def _call(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Run a command: its own errors are one line and exit 2, never a traceback."""
    try:
        fn(*args, **kwargs)
    except FtplmError as e:
        print(f"ftplm {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ftplm {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except SystemExit as e:  # a wrapped command line's own exit (`ftplm lm-eval --help`, its usage errors)
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    return 0


def _takes_rest(name: str) -> bool:
    """Whether a command takes the rest of the line verbatim (*args: `ftplm lm-eval`), --help included."""
    return any(
        p.kind is inspect.Parameter.VAR_POSITIONAL for p in inspect.signature(COMMANDS[name]).parameters.values()
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS and _takes_rest(argv[0]):
        return _call(argv[0], COMMANDS[argv[0]], *argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_fn", None):
        parser.print_help()
        return 2
    kwargs = {k: v for k, v in vars(args).items() if k not in ("_fn", "command", "subcommand")}
    name = " ".join(filter(None, (args.command, getattr(args, "subcommand", None))))

    def run() -> None:
        args._fn(**(_with_config_file(name, kwargs, argv) if kwargs.get("config") else kwargs))

    return _call(args.command, run)


if __name__ == "__main__":
    sys.exit(main())
