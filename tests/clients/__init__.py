"""Real Responses API clients, run by the acceptance tests against the gateway.

``package.json`` pins them and ``package-lock.json`` locks every dependency: the Codex CLI
(``@openai/codex``, whose native binary ships in a platform package of its own) and the Vercel AI
SDK (``ai`` with ``@ai-sdk/openai``), driven by ``vercel_ai.mjs``. ``make test`` installs them
with ``npm ci``; :func:`installed` does the same when a test needs them and they are missing or
older than the lock file.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

CLIENTS = Path(__file__).resolve().parent
NODE_MODULES = CLIENTS / "node_modules"
_lock = threading.Lock()


def installed() -> Path:
    """The clients' ``node_modules``, installed from the lock file when it is missing or stale."""
    with _lock:
        marker = NODE_MODULES / ".package-lock.json"  # npm writes it at the end of an install
        lock = CLIENTS / "package-lock.json"
        if marker.is_file() and marker.stat().st_mtime >= lock.stat().st_mtime:
            return NODE_MODULES
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm (Node.js) is needed to install the test clients")
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=CLIENTS,
            check=True,
            timeout=600,
            stdin=subprocess.DEVNULL,
        )
        return NODE_MODULES


def node() -> str:
    found = shutil.which("node")
    if found is None:
        raise RuntimeError("node (Node.js 20 or later) is needed to run the test clients")
    return found


@dataclass
class Finished:
    """A client process that ended (or was stopped at its deadline)."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool

    def describe(self) -> str:
        state = "timed out" if self.timed_out else f"exit code {self.returncode}"
        return (
            f"{' '.join(self.args)}: {state}\n--- stdout\n{self.stdout[-4000:]}\n"
            f"--- stderr\n{self.stderr[-8000:]}"
        )


def run(args: list[str], *, env: dict[str, str], cwd: Path | str, timeout: float = 90) -> Finished:
    """Runs a client in a process group of its own, so that a deadline stops it with every
    process it started (the Codex launcher starts the native binary as a child)."""
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    return Finished(args, proc.returncode, stdout, stderr, timed_out)
