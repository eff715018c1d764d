"""Benchmarks (`ftplm bench KIND`): each prints a table and returns figures measured in one process.

One file per kind: train.py (training throughput, MFU), decode.py (speculative decoding), serve.py (HTTP load).
Ratios are always measured side by side in the same run, interleaved, after warm-up.
"""
