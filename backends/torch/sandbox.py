"""Run untrusted Python (a model's completion) against test cases in a separate, limited process.

What each run gets:
- its own interpreter, `python -I` (isolated mode: no user site-packages, PYTHON* variables ignored,
  the working folder not on sys.path), in a fresh temporary working folder deleted afterwards, with
  a small environment (no variables of the trainer's);
- resource limits set in the child before it executes anything (`resource.setrlimit` in
  `preexec_fn`): address space (memory), CPU seconds, size of any file written (stdout included),
  open files, no core dumps; the harness then forbids new processes and threads (RLIMIT_NPROC 0)
  before the code runs;
- a wall-clock timeout, after which its whole process group is killed;
- no network where `unshare --net` works (a new network namespace holding only a loopback that is
  down). As root, the code also runs as user `nobody` (`unshare --setuid`) when the interpreter is
  executable by `nobody`; otherwise it runs as root, and a warning says so.
  Where unshare cannot be used the network is NOT isolated: proxy variables point at an unreachable
  address, which stops well-behaved HTTP clients only, and a warning says so.

This is not a security boundary against a determined attacker: the code shares the kernel and the
filesystem (reading what the sandbox user may read, writing where it may write). Run code you would
not run on the machine yourself in a container or VM (gVisor, Firecracker).

Reward integrity: the harness reports with a random per-run nonce, read from stdin before the code
runs and never written to disk, on a copy of stdout, so exiting early (`exit(0)`, `os._exit(0)`) or
printing a fake report passes nothing. Code that digs the nonce out of the interpreter's memory, or
returns objects whose __eq__ is always True, can still fool assert-style tests; input/output tests
compare printed text and are immune to the second.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Literal

NOBODY = 65534
"""uid and gid of `nobody` (Debian, Ubuntu, Fedora, Alpine)."""
UNREACHABLE_PROXY = "http://127.0.0.1:9"
"""The discard port on the loopback: connections through this proxy fail at once."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout: float = 10.0
    """Wall-clock seconds for all tests of one completion."""
    memory_mb: int = 1024
    """Address-space limit (RLIMIT_AS) of the interpreter, in MiB."""
    cpu_seconds: int = 10
    """CPU-time limit (RLIMIT_CPU)."""
    file_size_mb: int = 16
    """Largest file the code may write, stdout included (RLIMIT_FSIZE), in MiB."""
    open_files: int = 64
    """Open file descriptors (RLIMIT_NOFILE)."""


@dataclass(frozen=True)
class TestRun:
    status: Literal["ok", "timeout", "crash"]
    """ok: the harness reported; timeout: wall-clock or CPU limit; crash: died without a report."""
    passed: int
    total: int
    detail: str = ""
    """The end of stderr when the process crashed."""


# The harness runs inside the sandbox. Each test executes the completion afresh: assert tests in a
# module named "solution" followed by the assert statement; input/output tests as "__main__" with
# the test's input on stdin, comparing printed lines (trailing whitespace ignored).
HARNESS = r'''
import io, json, os, resource, sys

def run():
    job = json.loads(sys.stdin.read())
    nonce, source, tests = job["nonce"], job["code"], job["tests"]
    del job
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    report = os.fdopen(os.dup(1), "w")
    lines = lambda text: [line.rstrip() for line in text.rstrip().splitlines()]
    results = []
    for test in tests:
        sys.stdin = io.StringIO(test.get("input", ""))
        sys.stdout = captured = io.StringIO()
        namespace = {"__name__": "solution" if "assert" in test else "__main__", "__builtins__": __builtins__}
        try:
            try:
                exec(compile(source, "<completion>", "exec"), namespace)
            except SystemExit as stop:
                if stop.code not in (None, 0):
                    raise
            if "assert" in test:
                exec(compile(test["assert"], "<test>", "exec"), namespace)
                passed = True
            else:
                passed = lines(captured.getvalue()) == lines(test["output"])
        except BaseException:
            passed = False
        results.append(passed)
    sys.stdout = sys.__stdout__
    report.write("\n" + nonce + " " + json.dumps(results) + "\n")
    report.flush()

run()
'''


def normalize_tests(tests: Any) -> list[dict[str, str]]:
    """Test cases as [{"assert": code}] or [{"input": stdin, "output": stdout}].

    Accepts a list of assert statements (strings), a list of {"input", "output"} objects, the APPS
    layout {"inputs": [...], "outputs": [...]}, or any of these JSON-encoded in a string (CSV files).
    """
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError as error:
            raise ValueError(f"tests: a string must hold JSON, got {tests[:60]!r} ({error.msg})") from None
    if isinstance(tests, dict) and {"inputs", "outputs"} <= tests.keys():
        if len(tests["inputs"]) != len(tests["outputs"]):
            raise ValueError(f"tests: {len(tests['inputs'])} inputs but {len(tests['outputs'])} outputs")
        tests = [{"input": i, "output": o} for i, o in zip(tests["inputs"], tests["outputs"])]
    if not isinstance(tests, list) or not tests:
        raise ValueError(f"tests: expected a non-empty list of assert statements or input/output pairs, "
                         f"got {type(tests).__name__}")
    cases = []
    for i, test in enumerate(tests):
        if isinstance(test, str):
            cases.append({"assert": test})
        elif isinstance(test, dict) and {"input", "output"} <= test.keys():
            cases.append({"input": str(test["input"]), "output": str(test["output"])})
        else:
            raise ValueError(f"tests[{i}]: expected an assert statement or {{'input', 'output'}}, got {test!r:.80}")
    return cases


def run_tests(code: str, tests: list[dict[str, str]], *, limits: SandboxLimits = SandboxLimits(),
              python: str | None = None) -> TestRun:
    """Run `code` against `tests` (see `normalize_tests`) in a fresh sandboxed interpreter."""
    prefix, python, owner, _ = isolation(python)
    nonce = secrets.token_hex(16)
    job = json.dumps({"code": code, "tests": tests, "nonce": nonce}).encode()
    with tempfile.TemporaryDirectory(prefix="aha-sandbox-", ignore_cleanup_errors=True) as work, \
            tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        if owner is not None:
            os.chown(work, owner, owner)
        process = subprocess.Popen([*prefix, python, "-I", "-c", HARNESS], stdin=subprocess.PIPE, stdout=stdout,
                                   stderr=stderr, cwd=work, env=_environment(work), start_new_session=True,
                                   preexec_fn=functools.partial(_set_limits, limits))
        try:
            process.communicate(job, timeout=limits.timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(process)
        process.wait()
        output, errors = _read(stdout, limits), _read(stderr, limits)
    if timed_out or process.returncode == -signal.SIGXCPU:
        return TestRun("timeout", 0, len(tests))
    for line in reversed(output.splitlines()):
        if line.startswith(nonce + " "):
            results = json.loads(line[len(nonce) + 1:])
            return TestRun("ok", sum(map(bool, results)), len(tests))
    return TestRun("crash", 0, len(tests), detail=errors[-2000:] or f"exit status {process.returncode}")


def isolation(python: str | None = None) -> tuple[tuple[str, ...], str, int | None, str]:
    """(command prefix, interpreter, owner to give the work folder, description) of the strongest
    isolation that works here; probed once, with a warning when it is weaker than "no network,
    unprivileged user".

    python None: the training interpreter; as root, when `nobody` cannot execute it (a virtual
    environment under /root, say), the system `python3` as `nobody` (standard library only)
    rather than the training interpreter as root.
    """
    return _probe_isolation(python)


@functools.cache
def _probe_isolation(python: str | None) -> tuple[tuple[str, ...], str, int | None, str]:
    unshare = shutil.which("unshare")
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    interpreters = [python] if python else [sys.executable, *([system_python] if system_python else [])]
    candidates = []
    if unshare and os.geteuid() == 0:
        drop = (unshare, "--net", "--setuid", str(NOBODY), "--setgid", str(NOBODY))
        candidates = [(drop, exe, NOBODY, f"no network, user nobody, {exe}") for exe in interpreters]
        candidates.append(((unshare, "--net"), interpreters[0], None,
                           f"no network, but as root ({interpreters[0]} is not executable by nobody): "
                           "the code can write wherever root can"))
    elif unshare:
        candidates = [((unshare, "--map-root-user", "--net"), interpreters[0], None,
                       f"no network, as the current user, {interpreters[0]}")]
    for prefix, exe, owner, description in candidates:
        try:
            probe = subprocess.run([*prefix, exe, "-I", "-c", "pass"], cwd="/", capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            if (owner is None and os.geteuid() == 0) or exe != interpreters[0]:
                warnings.warn(f"code sandbox: {description}", RuntimeWarning, stacklevel=4)
            return prefix, exe, owner, description
    description = (f"network NOT isolated (unshare --net is not available), {interpreters[0]}: proxies point "
                   "nowhere, which stops only well-behaved HTTP clients")
    warnings.warn(f"code sandbox: {description}", RuntimeWarning, stacklevel=4)
    return (), interpreters[0], None, description


def _set_limits(limits: SandboxLimits) -> None:
    """preexec_fn: runs in the child between fork and exec."""
    mib = 1 << 20
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mib, limits.memory_mb * mib))
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size_mb * mib, limits.file_size_mb * mib))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _environment(work: str) -> dict[str, str]:
    proxies = {name: UNREACHABLE_PROXY for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY",
                                                      "HTTPS_PROXY", "ALL_PROXY")}
    return {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", **proxies}


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


def _read(file, limits: SandboxLimits) -> str:
    file.seek(0)
    return file.read(limits.file_size_mb << 20).decode("utf-8", errors="replace")
