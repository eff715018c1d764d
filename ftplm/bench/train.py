"""`ftplm bench train`: training throughput of GPT and FTP on the same trunk, measured side by side.

Both models are built from one preset (FTP adds its projection and decoder), fed the same random token batches,
and stepped alternately (GPT step, FTP step, ...) after warm-up, so that machine noise hits both alike. The ratio
FTP ÷ GPT is the price of predicting N tokens per position instead of one.

Also measured in the same run: the machine's matmul peak (bf16 and fp32, square matmuls timed), model FLOPs per
token (nanoGPT / PaLM convention: 6 x matmul parameters + 12 x layers x width x context for attention; FTP adds
its projection and its decoder, which runs B*T sequences of N tokens), MFU = model FLOP/s / peak of the dtype
trained in, peak memory of a training step, and on CUDA the largest batch that fits.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ftplm.config import preset as get_preset
from ftplm.config import with_overrides
from ftplm.distributed import pick_device
from ftplm.machine import provenance
from ftplm.model import build_model, flops_per_token
from ftplm.train import autocast, make_optimizer, resolve_dtype


def _timed_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    dtype: str,
    grad_clip: float,
) -> float:
    """One full optimizer step (forward, backward, clip, AdamW) as the trainer does it; returns seconds."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with autocast(device, dtype):
        loss = model(x, y).loss
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def matmul_peak(device: torch.device, dtype: torch.dtype, max_n: int = 2048, budget_s: float = 0.3) -> dict[str, float]:
    """Best FLOP/s of square n x n matmuls; n grows from 256 to max_n while one matmul stays under budget_s / 4.

    (Emulated bf16 on CPUs without native support runs ~1 GFLOP/s: there a 2048² matmul alone would take 20 s.)
    """
    n, best = 256, 0.0
    while True:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up
        best_s, spent = float("inf"), 0.0
        while spent < budget_s or best_s == float("inf"):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            best_s, spent = min(best_s, seconds), spent + seconds
        best = 2 * n**3 / best_s
        if n >= max_n or best_s > budget_s / 4:
            return {"flops": best, "n": n}
        n *= 2


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def step_memory(step: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Peak memory of one training step. CUDA: max_memory_allocated. CPU: the process's peak RSS during the step
    (Linux: VmHWM after resetting it via /proc/self/clear_refs, with freed heap trimmed first; elsewhere ru_maxrss,
    which cannot go down). peak_mb is the whole process (both models live), step_mb what the step added on top."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        peak = torch.cuda.max_memory_allocated(device)
        return {"method": "cuda max_memory_allocated", "peak_mb": peak / 2**20, "step_mb": (peak - before) / 2**20}
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc: hand freed heap back, so RSS counts live memory only
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark
        rss = _rss_kib("VmRSS")
        step()
        rss_peak = _rss_kib("VmHWM")
        method = "VmHWM (reset per step)"
    except OSError:
        rss = rss_peak = None
    if rss is None or rss_peak is None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step()
        rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "ru_maxrss delta (a lower bound)"
    return {"method": method, "peak_mb": rss_peak / 1024, "step_mb": max(0, rss_peak - rss) / 1024}


def largest_batch(fits: Callable[[int], bool], cap: int = 1024) -> int:
    """Largest b <= cap with fits(b), assuming fits is monotone: doubling, then bisection. 0 if even 1 does not fit."""
    if not fits(1):
        return 0
    low = 1
    while low * 2 <= cap and fits(low * 2):
        low *= 2
    high = min(low * 2, cap + 1)  # fits(low) and (high > cap or not fits(high))
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def _fits_on_cuda(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    vocab: int,
    T: int,
    device: torch.device,
    dtype: str,
    grad_clip: float,
) -> Callable[[int], bool]:
    def fits(batch: int) -> bool:
        x = torch.randint(0, vocab, (batch, T), device=device)
        try:
            _timed_step(model, optimizer, x, x, device, dtype, grad_clip)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            optimizer.zero_grad(set_to_none=True)
            del x
            gc.collect()
            torch.cuda.empty_cache()

    return fits


def bench_train(
    preset: str = "small",
    steps: int = 8,
    warmup: int = 2,
    batch_size: int | None = None,
    device: str = "auto",
    dtype: str | None = None,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    max_batch: bool | None = None,
) -> dict[str, Any]:
    """Tokens/s of GPT and FTP (same trunk, same batches, interleaved steps) and FTP ÷ GPT, with MFU and memory.

    max_batch: also search the largest batch that fits (default: on CUDA only; it needs out-of-memory errors).
    """
    dev = pick_device(device)
    torch.manual_seed(seed)
    figures: dict[str, Any] = {
        **provenance(),
        "preset": preset,
        "device": str(dev),
        "steps": steps,
        "warmup": warmup,
        "models": {},
    }
    figures["threads"] = torch.get_num_threads() if dev.type == "cpu" else None
    figures["peak_flops"] = {
        name: matmul_peak(dev, dt) for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32))
    }
    setups = {}
    for model_type in ("gpt", "ftp"):
        chosen = get_preset(preset, model_type)
        cfg = with_overrides(chosen.model, overrides or {}).validate()
        tcfg = chosen.train
        model = build_model(cfg).to(dev).train()
        setups[model_type] = (model, make_optimizer(model, tcfg, dev), cfg, tcfg)
    _, _, cfg, tcfg = setups["ftp"]
    B, T = batch_size or tcfg.batch_size, cfg.block_size
    run_dtype = resolve_dtype(dtype or tcfg.dtype, dev)
    figures.update(
        batch_size=B,
        block_size=T,
        dtype=run_dtype,
        n_future=cfg.n_future,
        n_pseudo=cfg.n_pseudo,
        dec_n_layer=cfg.dec_n_layer,
        dec_n_embd=cfg.dec_n_embd,
    )
    generator = torch.Generator().manual_seed(seed)
    times: dict[str, list[float]] = {"gpt": [], "ftp": []}
    for i in range(warmup + steps):
        data = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=generator)
        x, y = data[:, :-1].to(dev), data[:, 1:].to(dev)
        order = ("gpt", "ftp") if i % 2 == 0 else ("ftp", "gpt")  # alternate who goes first
        for model_type in order:
            model, optimizer, _, tc = setups[model_type]
            seconds = _timed_step(model, optimizer, x, y, dev, run_dtype, tc.grad_clip)
            if i >= warmup:
                times[model_type].append(seconds)
    peak = figures["peak_flops"][run_dtype]["flops"]
    for model_type, (model, optimizer, mcfg, tc) in setups.items():
        median = statistics.median(times[model_type])
        fpt = flops_per_token(model)
        x = torch.randint(0, mcfg.vocab_size, (B, T), generator=generator).to(dev)
        figures["models"][model_type] = {
            "params": model.num_params(),
            "step_s_median": median,
            "step_s_all": times[model_type],
            "tokens_per_s": B * T / median,
            "flops_per_token": fpt,
            "model_flops_per_s": fpt * B * T / median,
            "mfu": fpt * B * T / median / peak,
            "memory": step_memory(
                functools.partial(_timed_step, model, optimizer, x, x, dev, run_dtype, tc.grad_clip), dev
            ),
        }
        if max_batch or (max_batch is None and dev.type == "cuda"):
            figures["models"][model_type]["max_batch_size"] = largest_batch(
                _fits_on_cuda(model, optimizer, mcfg.vocab_size, T, dev, run_dtype, tc.grad_clip)
            )
    figures["ftp_over_gpt"] = figures["models"]["ftp"]["tokens_per_s"] / figures["models"]["gpt"]["tokens_per_s"]
    _print(figures)
    return figures


def _print(f: dict[str, Any]) -> None:
    print(
        f"bench train: preset {f['preset']}, {f['device']}, {f['dtype']}, batch {f['batch_size']}x{f['block_size']}, "
        f"{f['steps']} timed steps each after {f['warmup']} warm-up (interleaved)"
    )
    peaks = ", ".join(f"{k} {v['flops'] / 1e9:,.1f} GFLOP/s ({v['n']}²)" for k, v in f["peak_flops"].items())
    print(f"measured matmul peak: {peaks}; MFU is against the {f['dtype']} peak")
    print(
        f"{'model':<6}{'params':>12}{'step (s)':>11}{'tokens/s':>11}{'GFLOP/token':>13}{'GFLOP/s':>10}{'MFU':>7}{'step MB':>9}{'peak MB':>9}"
    )
    for name, m in f["models"].items():
        print(
            f"{name:<6}{m['params']:>12,}{m['step_s_median']:>11.3f}{m['tokens_per_s']:>11,.0f}{m['flops_per_token'] / 1e9:>13.4f}"
            f"{m['model_flops_per_s'] / 1e9:>10.1f}{m['mfu']:>7.1%}{m['memory']['step_mb']:>9.0f}{m['memory']['peak_mb']:>9.0f}"
            + (f"  max batch {m['max_batch_size']}" if "max_batch_size" in m else "")
        )
    print(
        f"FTP / GPT throughput: {f['ftp_over_gpt']:.2f} (N={f['n_future']}, P={f['n_pseudo']}, "
        f"decoder {f['dec_n_layer']}x{f['dec_n_embd']})"
    )
