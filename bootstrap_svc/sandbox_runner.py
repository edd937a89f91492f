"""The Python interpreter of one code_interpreter session, run INSIDE its sandbox.

It is started once per session (``python -I -u runner.py``) and then runs call after call in one
namespace, so variables and imports survive from one call to the next. It uses the standard
library only and never imports the gateway: the sandbox has nothing else.

Protocol, on the control socket whose file descriptor is the first argument (the service holds the
other end):

- the runner sends ``{"ready": true}`` once it is up;
- the service sends one call: a JSON header line ``{"size": N, "cpu_s": C}`` carrying, as
  SCM_RIGHTS, the write ends of two fresh pipes (the call's stdout and stderr), then N bytes of
  UTF-8 code;
- the runner points file descriptors 1 and 2 at those pipes, runs the code (printing the repr of
  a last bare expression, as a notebook does), kills every other process left in the sandbox,
  points 1 and 2 back at /dev/null (so the service sees the pipes end) and answers one JSON line:
  ``{"exit_code": 0 | 1 | n, "exc_type": name or null, "errno": n or null}``.

A process the code forked that comes back here exits at once instead of answering.
"""

from __future__ import annotations

import array
import ast
import builtins
import json
import os
import resource
import signal
import socket
import sys
import time
import traceback
from types import TracebackType
from typing import Any

CELL = "<cell>"


class _Control:
    """The runner's end of the control socket: header lines with file descriptors, then bytes."""

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)
        os.set_inheritable(fd, False)
        self.buffer = b""

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def header(self) -> tuple[dict[str, Any] | None, list[int]]:
        fds: list[int] = []
        while b"\n" not in self.buffer:
            data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(2 * 4))
            for level, kind, raw in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(raw[: len(raw) - len(raw) % received.itemsize])
                    fds.extend(received)
            if not data:
                return None, fds
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        header: dict[str, Any] = json.loads(line)
        return header, fds

    def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            data = self.sock.recv(max(65536, size - len(self.buffer)))
            if not data:
                break
            self.buffer += data
        out, self.buffer = self.buffer[:size], self.buffer[size:]
        return out


def _user_traceback(tb: TracebackType | None) -> TracebackType | None:
    """The traceback from the first frame of the user's code on (the runner's frames cut)."""
    while tb is not None and tb.tb_frame.f_code.co_filename != CELL:
        tb = tb.tb_next
    return tb


def _run_cell(code: str, namespace: dict[str, Any]) -> None:
    tree = ast.parse(code, CELL, "exec")
    last: ast.Expression | None = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body[-1].value)
        tree.body.pop()
    exec(compile(tree, CELL, "exec"), namespace)
    if last is not None:
        value = eval(compile(last, CELL, "eval"), namespace)
        if value is not None:
            print(repr(value))


def _cpu_used() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _limit_cpu(seconds: float) -> None:
    """This call may use ``seconds`` of CPU more than the interpreter used so far (the hard limit,
    set from outside, caps the interpreter's whole life)."""
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = int(_cpu_used() + seconds) + 1
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _kill_others(me: int) -> None:
    """Kills every process of the sandbox but its init (pid 1) and the runner, and reaps the
    runner's children: nothing a call started outlives it."""
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in (1, me):
            try:
                os.kill(int(name), signal.SIGKILL)
            except OSError:
                pass
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.01)


def _point_output(out_fd: int, err_fd: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)


def _run(code: str, fds: list[int], cpu_s: float, namespace: dict[str, Any]) -> dict[str, Any]:
    me = os.getpid()
    if len(fds) >= 2:
        _point_output(fds[0], fds[1])
    for fd in fds:
        os.close(fd)
    os.chdir(os.environ.get("HOME", "/"))
    _limit_cpu(cpu_s)
    result: dict[str, Any] = {"exit_code": 0, "exc_type": None, "errno": None}
    try:
        _run_cell(code, namespace)
    except SystemExit as exc:
        if os.getpid() != me:
            os._exit(0)
        if isinstance(exc.code, int):
            result["exit_code"] = exc.code
        elif exc.code is not None:
            print(exc.code, file=sys.stderr)
            result["exit_code"] = 1
    except BaseException as exc:
        if os.getpid() != me:
            os._exit(1)
        result = {
            "exit_code": 1,
            "exc_type": type(exc).__name__,
            "errno": getattr(exc, "errno", None),
        }
        try:
            traceback.print_exception(type(exc), exc, _user_traceback(exc.__traceback__))
        except BaseException:  # printing can fail too (a MemoryError): the type is enough
            pass
    if os.getpid() != me:
        os._exit(0)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    _kill_others(me)
    devnull = os.open(os.devnull, os.O_WRONLY)
    _point_output(devnull, devnull)
    os.close(devnull)
    return result


def main() -> None:
    control = _Control(int(sys.argv[1]))
    sys.stdin = open(os.devnull)  # the interpreter's own stdin, for its whole life
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    control.send({"ready": True})
    # Until a call brings its own pipes, output goes nowhere (the start-up pipe is closed).
    devnull = os.open(os.devnull, os.O_WRONLY)
    _point_output(devnull, devnull)
    os.close(devnull)
    while True:
        header, fds = control.header()
        if header is None:
            return
        code = control.exactly(int(header.get("size", 0))).decode("utf-8", "replace")
        control.send(_run(code, fds, float(header.get("cpu_s", 30)), namespace))


if __name__ == "__main__":
    main()
