"""A synthetic coding task that needs planning ahead, and a restricted executor that checks answers by running them.

Every problem is a function whose docstring states what to return; the answer's FIRST statement must declare a
number that is only known once the rest of the function has been planned:

    def solve():
        \"\"\"Return the numbers from 3 to 17 in steps of 4.\"\"\"
        n = 4                      <- how many append lines will follow (declared before any of them is written)
        out = []
        out.append(3)
        out.append(7)
        out.append(11)
        out.append(15)
        assert len(out) == n
        return out

Kinds: `range` (count the terms of an arithmetic progression before writing them), `words` (count the words to be
copied), `squares` (declare the SUM of the squares before writing them: `total = 26`, checked by
`assert sum(out) == total`). Problems come in four levels (LEVELS), by how many lines the first statement commits
to: 1-2 copied words at level 1, up to 8 terms or a sum of 4 squares at level 4. An answer passes when, run in a separate restricted Python process, solve() returns
the expected list, its own asserts hold, and its first statement declares the right number (checked on the syntax
tree, so the declaration cannot be skipped). The model sees the prompt (the `def` line and the docstring) and writes
the body; pass@1 = greedy completions that pass.

Train/test split of problems: a hash of a problem's canonical key puts ~20% of all keys in the held-out set; the
training corpus (`ftplm prepare --corpus coding`) never contains a held-out key.

The executor never runs generated text in this process. Each program runs in `python -I -S -B` in a fresh
temporary directory, in its own session (the whole process group is killed on timeout), without network (a new
network namespace when `unshare` is allowed, and socket calls blocked), with rlimits on CPU time, address space,
written bytes (stdout/stderr go to size-capped files) and open files, and under an audit hook that refuses process
creation, signals, file writes/deletes, sockets and ctypes. The answer comes back on stdout behind a random nonce
read from stdin before the program starts. It guards against accidents of generated code (the threat here: a
small LM's output), not against a determined attacker: Python-level sandboxes can be escaped.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HELDOUT_FRAC = 0.2
WORDS = [
    "red",
    "blue",
    "green",
    "cat",
    "dog",
    "fox",
    "bird",
    "fish",
    "tree",
    "leaf",
    "rock",
    "sand",
    "moon",
    "star",
    "sun",
    "rain",
    "snow",
    "wind",
    "fire",
    "ice",
    "apple",
    "pear",
    "plum",
    "kiwi",
    "lime",
    "milk",
    "bread",
    "salt",
    "sugar",
    "tea",
    "cup",
    "box",
    "bag",
    "hat",
    "shoe",
    "ship",
    "boat",
    "car",
    "road",
    "city",
    "king",
    "queen",
    "book",
    "pen",
    "door",
    "wall",
    "lamp",
    "bell",
    "ring",
    "song",
    "drum",
    "game",
    "ball",
    "gold",
    "iron",
    "glass",
    "wood",
    "stone",
]


@dataclass(frozen=True)
class Problem:
    key: str  # canonical identity: decides train vs held-out
    kind: str
    prompt: str  # `def solve():` + docstring; the model writes the rest
    solution: str  # a reference body (starts with a newline)
    expected: list[Any]  # what solve() must return
    declared: tuple[str, int]  # the first statement must be `name = value`
    level: int = 4  # its rung of the ladder (LEVELS)

    @property
    def program(self) -> str:
        return self.prompt + self.solution


def _body(declare: str, items: list[Any], check: str) -> str:
    lines = [declare, "out = []", *[f"out.append({x!r})" for x in items], check, "return out"]
    return "".join("\n    " + line for line in lines)


def _problem(
    kind: str, level: int, key_parts: str, doc: str, expected: list[Any], declared: tuple[str, int], check: str
) -> Problem:
    prompt = f'def solve():\n    """{doc}"""'
    body = _body(f"{declared[0]} = {declared[1]}", expected, check)
    return Problem(f"{kind}:{key_parts}", kind, prompt, body, expected, declared, level)


# The ladder: a level is the length of the plan, i.e. how many lines the declared number commits to, and which
# kinds reach that far. Level 4 is the task as first built (every model scored 0 on it at <= 4M tokens); level 1
# (one or two words to copy and count) is within reach of a small model, so the ladder shows where planning fails.
LEVELS: dict[int, dict[str, tuple[int, int]]] = {
    1: {"words": (1, 2)},
    2: {"words": (3, 3), "range": (2, 3)},
    3: {"words": (4, 5), "range": (4, 5), "squares": (2, 2)},
    4: {"words": (6, 7), "range": (6, 8), "squares": (3, 4)},
}


def make_problem(rng: random.Random, level: int | None = None) -> Problem:
    """One random problem of a level (any level when None), drawn from rng."""
    level = rng.choice(list(LEVELS)) if level is None else level
    kind = rng.choice(list(LEVELS[level]))
    count = rng.randint(*LEVELS[level][kind])
    if kind == "range":
        start, step = rng.randint(0, 40), rng.randint(1, 7)
        stop = start + step * (count - 1) + rng.randint(0, step - 1)
        expected = list(range(start, stop + 1, step))
        doc = f"Return the numbers from {start} to {stop} in steps of {step}."
        return _problem(
            kind, level, f"{start}:{stop}:{step}", doc, expected, ("n", len(expected)), "assert len(out) == n"
        )
    if kind == "words":
        words = [rng.choice(WORDS) for _ in range(count)]
        doc = f"Return the words of: {' '.join(words)}."
        return _problem(kind, level, " ".join(words), doc, words, ("n", len(words)), "assert len(out) == n")
    numbers = [rng.randint(1, 9) for _ in range(count)]
    squares = [x * x for x in numbers]
    doc = f"Return the squares of {', '.join(map(str, numbers))}."
    return _problem(
        kind, level, ",".join(map(str, numbers)), doc, squares, ("total", sum(squares)), "assert sum(out) == total"
    )


def is_heldout(key: str) -> bool:
    digest = hashlib.sha256(f"ftplm-coding:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < HELDOUT_FRAC


def problems(split: str, n: int, seed: int = 0, level: int | None = None) -> list[Problem]:
    """n problems of the 'train' or 'test' (held-out) split, of one level or (None) of all levels evenly; test
    problems are distinct, training ones may repeat."""
    rng = random.Random(f"{split}:{seed}" if level is None else f"{split}:{seed}:L{level}")
    out: list[Problem] = []
    seen: set[str] = set()
    while len(out) < n:
        p = make_problem(rng, level)
        if is_heldout(p.key) != (split == "test") or (split == "test" and p.key in seen):
            continue
        seen.add(p.key)
        out.append(p)
    return out


def training_programs(n: int = 20_000, seed: int = 0) -> Iterator[tuple[str, str]]:
    """(id, program text) of the training corpus: reference solutions of training problems only."""
    for i, p in enumerate(problems("train", n, seed)):
        yield f"coding:{i}", p.program


# ------------------------------------------------------------------------------------------------------
# the restricted executor
# ------------------------------------------------------------------------------------------------------
RUNNER = r"""
import json, resource, sys
cpu, memory, output = map(int, sys.argv[1:4])
for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory), (resource.RLIMIT_FSIZE, output),
                     (resource.RLIMIT_NOFILE, 32), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
source = open("candidate.py", encoding="utf-8").read()
write, nonce = sys.__stdout__.write, sys.stdin.readline().strip()
BLOCKED = {"os.system", "os.fork", "os.forkpty", "os.kill", "os.killpg", "os.remove", "os.rename", "os.rmdir",
           "os.truncate", "os.chmod", "os.chown", "os.mkdir", "os.symlink", "os.link", "os.utime", "os.putenv",
           "os.unsetenv", "os.chdir", "os.setuid", "builtins.input",
           "pty.spawn", "webbrowser.open", "signal.pthread_kill", "resource.setrlimit", "resource.prlimit"}
PREFIXES = ("os.exec", "os.spawn", "os.posix_spawn", "subprocess.", "socket.", "ctypes.", "shutil.", "urllib.",
            "http.", "ftplib.", "smtplib.", "_posixsubprocess", "mmap.", "sqlite3.")
WRITE_FLAGS = 0o1 | 0o2 | 0o100 | 0o1000 | 0o2000  # O_WRONLY O_RDWR O_CREAT O_TRUNC O_APPEND
def hook(event, args):
    if event in BLOCKED or event.startswith(PREFIXES):
        raise PermissionError("blocked by the ftplm sandbox: " + event)
    if event == "open":
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (mode is None and isinstance(flags, int) and flags & WRITE_FLAGS):
            raise PermissionError("blocked by the ftplm sandbox: writing files")
    if event == "import" and args[0] in ("ctypes", "_ctypes", "subprocess", "socket", "_socket", "multiprocessing"):
        raise PermissionError("blocked by the ftplm sandbox: import " + args[0])
sys.addaudithook(hook)
namespace = {"__name__": "candidate"}
exec(compile(source, "candidate.py", "exec"), namespace)
result = namespace["solve"]()
write("\n" + nonce + " " + json.dumps(result) + "\n")
sys.__stdout__.flush()
"""


@dataclass
class Execution:
    """What running one program gave: status ok | error | timeout | output_limit | killed, and solve()'s value."""

    status: str
    value: Any = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@functools.cache
def _netns_prefix() -> tuple[str, ...]:
    """`unshare --net --` when this machine lets us open a network namespace (root / user namespaces), else ()."""
    try:
        r = subprocess.run(["unshare", "--net", "--", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ()
    return ("unshare", "--net", "--") if r.returncode == 0 else ()


def run_program(source: str, timeout: float = 5.0, memory_mb: int = 512, output_bytes: int = 64_000) -> Execution:
    """Run `source` (which must define solve()) in a restricted subprocess; return solve()'s JSON value."""
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="ftplm-sandbox-") as tmp:
        d = Path(tmp)
        (d / "candidate.py").write_text(source, encoding="utf-8")
        (d / "runner.py").write_text(RUNNER, encoding="utf-8")
        limits = [
            str(int(timeout) + 1),
            str(memory_mb << 20),
            str(output_bytes),
        ]  # set by the runner before the program
        cmd = [*_netns_prefix(), sys.executable, "-I", "-S", "-B", "runner.py", *limits]
        with open(d / "stdout", "wb") as out, open(d / "stderr", "wb") as err:
            proc = subprocess.Popen(
                cmd,
                cwd=d,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
                env={"PATH": "/usr/bin:/bin"},
                start_new_session=True,
            )
            try:
                proc.communicate((nonce + "\n").encode(), timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the program and anything it left behind
                proc.wait()
        stdout = (d / "stdout").read_bytes()[-output_bytes:].decode("utf-8", errors="replace")
        stderr = (d / "stderr").read_bytes()[-2000:].decode("utf-8", errors="replace")
    if timed_out or (proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL) and not stderr):
        return Execution("timeout", detail=f"no answer within {timeout}s")
    if proc.returncode == -signal.SIGXFSZ or "File too large" in stderr:
        return Execution("output_limit", detail=f"wrote more than {output_bytes} bytes")
    for line in reversed(stdout.splitlines()):
        if line.startswith(nonce + " "):
            if proc.returncode != 0:
                break
            return Execution("ok", json.loads(line[len(nonce) + 1 :]))
    if proc.returncode is not None and proc.returncode < 0:
        return Execution("killed", detail=f"signal {-proc.returncode}: {stderr.strip().splitlines()[-1:] or ''}")
    last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {proc.returncode}"
    return Execution("error", detail=last[:300])


def declared_value(source: str) -> tuple[str, int] | None:
    """`name = <int>` when it is the first statement of solve()'s body after the docstring (parsed, not run)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "solve"), None)
    if fn is None:
        return None
    body = (
        fn.body[1:]
        if fn.body and isinstance(fn.body[0], ast.Expr) and isinstance(getattr(fn.body[0], "value", None), ast.Constant)
        else fn.body
    )
    if not body:
        return None
    first = body[0]
    if (
        isinstance(first, ast.Assign)
        and len(first.targets) == 1
        and isinstance(first.targets[0], ast.Name)
        and isinstance(first.value, ast.Constant)
        and type(first.value.value) is int
    ):
        return first.targets[0].id, first.value.value
    return None


def check(problem: Problem, completion: str, timeout: float = 5.0) -> tuple[bool, str]:
    """(passed, "reason: detail") for a completion of problem.prompt: right declaration first, runs, returns the
    expected list. Reasons: pass, no declaration, wrong declaration, error, timeout, output_limit, killed, wrong result."""
    source = problem.prompt + completion
    declared = declared_value(source)
    if declared is None:
        return False, "no declaration: no `name = <int>` first statement in solve(), or a syntax error"
    if declared != problem.declared:
        return (
            False,
            f"wrong declaration: {declared[0]} = {declared[1]}, needed {problem.declared[0]} = {problem.declared[1]}",
        )
    result = run_program(source, timeout)
    if not result.ok:
        return False, f"{result.status}: {result.detail}"
    if result.value != problem.expected:
        return False, f"wrong result: {str(result.value)[:80]}, expected {problem.expected}"
    return True, "pass"


def check_many(
    problems_: list[Problem], completions: list[str], workers: int = 2, timeout: float = 5.0
) -> list[tuple[bool, str]]:
    """check() over many problems, a few subprocesses at a time."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda pc: check(pc[0], pc[1], timeout), zip(problems_, completions)))
