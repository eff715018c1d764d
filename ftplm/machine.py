"""What every published figure names: the machine it was measured on, when, and the command that produced it."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; elsewhere what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def describe_machine() -> str:
    """e.g. "Intel(R) Xeon(R) Processor, 2 cores, native bf16" (+ the GPU, where there is one)."""
    bf16 = (
        "native bf16"
        if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        else "no native bf16"
    )
    text = f"{cpu_model()}, {cores()} cores, {bf16}"
    if torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name()}"
    return text


def command_line() -> str | None:
    """The `ftplm ...` command this process runs, as a user would type it again (None outside the CLI); `python -m
    ftplm ...` runs the same command."""
    script = Path(sys.argv[0]) if sys.argv else Path()
    if script.name == "ftplm" or (script.name == "__main__.py" and script.parent.name == "ftplm"):
        return " ".join(["ftplm", *(shlex.quote(a) for a in sys.argv[1:])])
    return None


def provenance() -> dict[str, str | None]:
    """command, machine and UTC date: the fields every published JSON carries."""
    return {
        "command": command_line(),
        "machine": describe_machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
