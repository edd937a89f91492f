"""Starting a bootstrap service implementation as its own process on 127.0.0.1 with port 0, and
learning the port it bound from the first line of its output that names one."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NODE_EXAMPLE = REPO / "examples" / "bootstrap-node"
_PORT = re.compile(rb'"port":\s*(\d+)')


@dataclass
class Process:
    """A started implementation: its address, and where its output goes."""

    name: str
    address: str
    popen: subprocess.Popen[bytes]
    folder: str

    def output(self) -> str:
        return Path(self.folder, "output.log").read_text(errors="replace")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (a graceful stop), then SIGKILL if it does not end in time."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout_s)
        shutil.rmtree(self.folder, ignore_errors=True)


def _spawn(name: str, argv: list[str], cwd: Path, folder: str, timeout_s: float = 30.0) -> Process:
    log_path = Path(folder, "output.log")
    # Output goes to a file, not a pipe, so the process never blocks on a pipe nobody drains.
    with log_path.open("wb") as out:
        popen = subprocess.Popen(
            argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    proc = Process(name=name, address="", popen=popen, folder=folder)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        match = _PORT.search(log_path.read_bytes())
        if match:
            proc.address = f"127.0.0.1:{int(match.group(1))}"
            return proc
        if popen.poll() is not None:
            break
        time.sleep(0.05)
    text = proc.output()
    proc.stop()
    raise RuntimeError(f"{name} did not report a port within {timeout_s}s; output:\n{text}")


def start_reference() -> Process:
    """``python -m bootstrap_svc`` with a fresh work folder."""
    folder = tempfile.mkdtemp(prefix="respgw-reference-")
    argv = [sys.executable, "-m", "bootstrap_svc", "--listen", "127.0.0.1:0"]
    argv += ["--workdir", str(Path(folder, "sessions")), "--metrics-port", "0"]
    argv += ["--log-format", "json"]
    return _spawn("reference", argv, REPO, folder)


def ensure_node_modules() -> None:
    """Installs the example's locked dependencies when they are missing."""
    if (NODE_EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is needed to run the Node.js bootstrap example")
    subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=NODE_EXAMPLE,
        check=True,
        timeout=100,
        stdout=subprocess.DEVNULL,
    )


def start_node() -> Process:
    """The Node.js example (examples/bootstrap-node)."""
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is needed to run the Node.js bootstrap example")
    ensure_node_modules()
    folder = tempfile.mkdtemp(prefix="respgw-node-")
    argv = [node, "server.js", "--listen", "127.0.0.1:0"]
    return _spawn("node", argv, NODE_EXAMPLE, folder)
