"""The sandbox every call of the reference execution service runs in: bubblewrap.

Why bubblewrap: it is the small, well-kept setuid-free sandbox behind Flatpak, packaged by every
distribution (Debian: ``bubblewrap``), and does exactly what a call needs from the kernel's own
mechanisms: new mount, PID, network, IPC and UTS namespaces, a root filesystem built from
read-only binds, and the whole process tree killed when its first process (or the service) dies.
nsjail does as much but is not in Debian's stable release; a hand-made ``unshare``/``chroot``
script would have to get every one of those details right itself.

One sandbox, as :meth:`Sandbox.command` builds it:

- the filesystem is ``/usr`` (read-only, with the host's ``/bin``, ``/lib``... symlinks), a
  private ``/proc``, a minimal ``/dev``, a small private ``/tmp`` and the session's own
  directory at ``/mnt/data`` (its working directory and HOME); nothing else of the host, so no
  other session's files and none of the service's;
- no network (an empty network namespace: only a loopback that is down);
- a process that is not root: when the service runs as root, each session has a uid of its own
  (``setpriv`` switches to it inside the sandbox, dropping every capability), so a session's
  process limit counts that session's processes only; when the service is not root, bubblewrap
  maps the service's uid into a user namespace of its own, whose process count is the sandbox's;
- resource limits (``prlimit``): CPU time, address space (memory), processes, file size, open
  files, no core dumps; and a wall-clock timeout, enforced by the caller killing the sandbox;
- the kernel's OOM killer picks sandboxed processes first (``choom``: ``oom_score_adj`` 1000,
  which a sandbox cannot lower), so a machine short of memory loses a sandboxed process, never
  the service.

Memory is bounded twice. Each process: RLIMIT_AS caps its address space, which stops one
allocation at once. The session as a whole: a kernel bound would need a memory cgroup per
session (a delegated cgroup v2 subtree with the memory controller, which many hosts do not give;
the Kubernetes sandbox engine of deploy/README.md gets it from the sandbox pod's own limits), so
the service watches the session's processes instead while a call runs, and kills them past the
session's limit (:mod:`bootstrap_svc.memwatch`); the PID namespace makes "the session's
processes" exact. Between calls the interpreter is frozen, so nothing there grows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FILES_ROOT = "/mnt/data"
RUNNER_PATH = "/opt/respgw/runner.py"
RUNNER_SOURCE = str(Path(__file__).with_name("sandbox_runner.py"))
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
# The host's top-level entries a program expects (merged-/usr systems make them symlinks).
_TOP_LEVEL = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
# The OOM killer's adjustment of every sandboxed process: the highest, so they go first.
OOM_SCORE_ADJ = 1000
# Python interpreters looked for, in order, when none is configured.
_PYTHONS = ("/usr/local/bin/python3", "/usr/bin/python3")


@dataclass(frozen=True)
class Limits:
    """The resource limits of one sandboxed process tree."""

    cpu_s: int
    memory_bytes: int
    processes: int
    file_bytes: int
    open_files: int = 256


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run here; the message says why and what to install or allow."""


class Sandbox:
    """Builds the command lines of sandboxed processes; see the module docstring."""

    def __init__(
        self,
        *,
        bwrap: str = "bwrap",
        python: str = "",
        tmp_bytes: int = 64 * 1024 * 1024,
        uid_base: int = 200_000,
    ) -> None:
        self.bwrap = shutil.which(bwrap) or ""
        self.python = python or next((p for p in _PYTHONS if os.path.exists(p)), "")
        self.tmp_bytes = tmp_bytes
        self.uid_base = uid_base
        self.as_root = os.geteuid() == 0
        self.setpriv = shutil.which("setpriv") or ""
        self.prlimit = shutil.which("prlimit") or ""
        self.choom = shutil.which("choom") or ""
        self.version = ""
        self.problem = ""

    @property
    def ready(self) -> bool:
        return bool(self.version) and not self.problem

    def session_uid(self, slot: int) -> int:
        """The uid the processes of the session in ``slot`` run as (root mode only)."""
        return self.uid_base + slot

    async def check(self) -> None:
        """Runs a trivial sandboxed command once; records the version, or the problem."""
        missing = [
            name
            for name, path in (
                ("bwrap (Debian: bubblewrap)", self.bwrap),
                ("prlimit", self.prlimit),
                ("choom (util-linux)", self.choom),
            )
            if not path
        ]
        if self.as_root and not self.setpriv:
            missing.append("setpriv (util-linux)")
        if not self.python:
            missing.append("a Python interpreter under /usr (--sandbox-python)")
        if missing:
            self.problem = "missing " + ", ".join(missing)
            log.error("the sandbox cannot run: calls will fail", extra={"problem": self.problem})
            return
        probe = tempfile.mkdtemp(prefix="respgw-sandbox-probe-")
        if self.as_root:
            os.chown(probe, self.session_uid(0), self.session_uid(0))
        try:
            version = await _output([self.bwrap, "--version"])
            argv = self.command(
                probe,
                self.session_uid(0),
                Limits(cpu_s=5, memory_bytes=512 << 20, processes=16, file_bytes=1 << 20),
                [
                    self.python,
                    "-I",
                    "-c",
                    "import os; open('probe', 'w').write('1'); print(os.getuid())",
                ],
            )
            uid = (await _output(argv)).strip()
            if not uid.isdigit() or (self.as_root and uid == "0"):
                raise SandboxUnavailable(f"the probe ran as uid {uid!r}")
        except (OSError, SandboxUnavailable) as exc:
            self.problem = f"bubblewrap does not run here ({exc}); it needs unprivileged user " + (
                "namespaces, or root" if not self.as_root else "namespaces (CAP_SYS_ADMIN)"
            )
            log.error("the sandbox cannot run: calls will fail", extra={"problem": self.problem})
            return
        finally:
            shutil.rmtree(probe, ignore_errors=True)
        self.version = version.strip()
        log.info(
            "sandbox ready",
            extra={"sandbox": self.version, "python": self.python, "as_root": self.as_root},
        )

    def command(self, directory: str, uid: int, limits: Limits, argv: list[str]) -> list[str]:
        """The command line that runs ``argv`` sandboxed, with ``directory`` at /mnt/data."""
        cmd = [
            # choom executes bubblewrap in its own process: the sandbox's every process inherits
            # the score.
            self.choom,
            "-n",
            str(OOM_SCORE_ADJ),
            "--",
            self.bwrap,
            "--die-with-parent",
            "--new-session",
            "--unshare-pid",
            "--unshare-net",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            "sandbox",
        ]
        if not self.as_root:
            cmd += ["--unshare-user", "--cap-drop", "ALL"]
        cmd += ["--ro-bind", "/usr", "/usr"]
        for name in _TOP_LEVEL:
            host = f"/{name}"
            if os.path.islink(host):
                cmd += ["--symlink", os.readlink(host), host]
            elif os.path.isdir(host):
                cmd += ["--ro-bind", host, host]
        for name in ("/etc/ld.so.cache", "/etc/localtime"):
            cmd += ["--ro-bind-try", name, name]
        # Folders bubblewrap makes follow the umask; these must be readable by the sandbox.
        for folder in ("/opt", "/opt/respgw", "/mnt"):
            cmd += ["--perms", "0755", "--dir", folder]
        cmd += ["--ro-bind", RUNNER_SOURCE, RUNNER_PATH]
        cmd += ["--proc", "/proc", "--dev", "/dev"]
        cmd += ["--perms", "1777", "--size", str(self.tmp_bytes), "--tmpfs", "/tmp"]
        cmd += ["--bind", directory, FILES_ROOT, "--chdir", FILES_ROOT]
        cmd += ["--clearenv"]
        env = {
            "HOME": FILES_ROOT,
            "PATH": SANDBOX_PATH,
            "LANG": "C.UTF-8",
            "TMPDIR": "/tmp",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "MPLBACKEND": "Agg",
        }
        for key, value in env.items():
            cmd += ["--setenv", key, value]
        cmd.append("--")
        if self.as_root:
            cmd += [
                self.setpriv,
                f"--reuid={uid}",
                f"--regid={uid}",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
                "--no-new-privs",
                "--",
            ]
        cmd += [
            self.prlimit,
            f"--cpu={limits.cpu_s}",
            f"--as={limits.memory_bytes}",
            f"--nproc={limits.processes}",
            f"--fsize={limits.file_bytes}",
            f"--nofile={limits.open_files}",
            "--core=0",
            "--",
            *argv,
        ]
        return cmd

    def python_command(self) -> list[str]:
        """The sandboxed interpreter of a code_interpreter session (see sandbox_runner)."""
        return [self.python, "-I", "-u", RUNNER_PATH]


class Child:
    """A sandbox process, started with :mod:`subprocess` and awaited through a pidfd.

    Not the event loop's own subprocess support: under uvloop, libuv forks with ``fork()``, which
    runs the ``pthread_atfork`` handlers of gRPC's threads in the child, and bubblewrap then
    crashed now and then (SIGSEGV) before it ran anything. ``subprocess`` uses ``vfork()``, which
    runs none, and works the same under either loop.
    """

    def __init__(
        self, argv: list[str], *, stdout: bool, stderr: bool, pass_fds: tuple[int, ...] = ()
    ) -> None:
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
            stderr=subprocess.PIPE if stderr else subprocess.DEVNULL,
            pass_fds=pass_fds,
        )

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    async def wait(self) -> int:
        """The exit status, once the process has ended (bubblewrap and sh give 128 + n for a
        process killed by signal n; Python a negative n for bubblewrap itself)."""
        status = self.popen.poll()
        if status is not None:
            return status
        loop = asyncio.get_running_loop()
        try:
            fd = os.pidfd_open(self.popen.pid)
        except (OSError, AttributeError):  # no pidfd: wait in a thread
            return await asyncio.to_thread(self.popen.wait)
        ended: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not ended.done():
                ended.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await ended
        finally:
            loop.remove_reader(fd)
            os.close(fd)
        return self.popen.wait()

    def close_pipes(self) -> None:
        """Closes the pipes nobody reads any more."""
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()

    def kill(self) -> None:
        """SIGKILL, if it still runs (the sandbox dies with its bubblewrap, --die-with-parent)."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()

    async def reader(self, name: str) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
        """An asyncio reader of the process's ``stdout`` or ``stderr`` pipe."""
        pipe = getattr(self.popen, name)
        assert pipe is not None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        return reader, transport


async def _output(argv: list[str], timeout_s: float = 20.0) -> str:
    child = Child(argv, stdout=True, stderr=True)
    out_reader, out_transport = await child.reader("stdout")
    err_reader, err_transport = await child.reader("stderr")
    try:
        out, err, status = await asyncio.wait_for(
            asyncio.gather(out_reader.read(), err_reader.read(), child.wait()), timeout_s
        )
    except TimeoutError as exc:
        child.kill()
        await child.wait()
        raise SandboxUnavailable(f"{argv[0]} did not finish in {timeout_s} s") from exc
    finally:
        out_transport.close()
        err_transport.close()
    if status != 0:
        raise SandboxUnavailable(
            f"exit status {status}: {err.decode(errors='replace').strip()[:300]}"
        )
    return out.decode(errors="replace")
