"""The files of a session directory: what a call changed, how much room they take, and paths
clients give.

Paths are relative to the session directory in the registry (``report.csv``, ``out/a.png``) and
absolute under /mnt/data when shown (``/mnt/data/report.csv``). Symbolic links are never followed:
a call may leave a link to anywhere of the sandbox's filesystem, and the service (which runs
outside the sandbox) must not read or write through it.
"""

from __future__ import annotations

import mimetypes
import os
import stat
from dataclasses import dataclass

from bootstrap_svc.sandbox import FILES_ROOT

# A walk stops after this many entries: a session holding more is over its limits anyway.
MAX_ENTRIES = 20_000


class BadPath(ValueError):
    """A path a client gave that is not a file under /mnt/data."""


@dataclass(frozen=True)
class Entry:
    """One regular file found under a session directory."""

    path: str  # relative
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Tree:
    """The regular files of a session directory, and whether the walk stopped early."""

    files: dict[str, Entry]
    total_bytes: int
    truncated: bool


def walk(directory: str) -> Tree:
    """Every regular file under ``directory`` (links and special files are skipped)."""
    files: dict[str, Entry] = {}
    total = 0
    seen = 0
    stack = [""]
    while stack:
        relative = stack.pop()
        try:
            entries = list(os.scandir(os.path.join(directory, relative)))
        except OSError:
            continue
        for entry in entries:
            seen += 1
            if seen > MAX_ENTRIES:
                return Tree(files, total, truncated=True)
            path = f"{relative}/{entry.name}" if relative else entry.name
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(info.st_mode):
                stack.append(path)
            elif stat.S_ISREG(info.st_mode):
                files[path] = Entry(path, info.st_size, info.st_mtime_ns)
                total += info.st_blocks * 512 if info.st_blocks else info.st_size
    return Tree(files, total, truncated=False)


def changed(before: Tree, after: Tree) -> list[str]:
    """The paths created or modified between two walks, in path order."""
    return sorted(
        path
        for path, entry in after.files.items()
        if (old := before.files.get(path)) is None
        or (old.size, old.mtime_ns) != (entry.size, entry.mtime_ns)
    )


def shown(path: str) -> str:
    """A relative path as the sandbox sees it."""
    return f"{FILES_ROOT}/{path}"


def media_type(path: str) -> str:
    guessed, _ = mimetypes.guess_type(path, strict=False)
    return guessed or ""


def relative(path: str) -> str:
    """A client's path (absolute under /mnt/data, or relative to it) as a relative path;
    raises BadPath for anything that leaves /mnt/data or names no file."""
    if not path or "\x00" in path:
        raise BadPath("path is empty")
    if path.startswith("/"):
        if not path.startswith(FILES_ROOT + "/"):
            raise BadPath(f"path {path!r} is not under {FILES_ROOT}")
        path = path[len(FILES_ROOT) + 1 :]
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts) or path.endswith("/"):
        raise BadPath(f"path {path!r} does not name a file under {FILES_ROOT}")
    if len("/".join(parts)) > 1024:
        raise BadPath("path is longer than 1024 characters")
    return "/".join(parts)


def open_for_write(directory: str, path: str, uid: int | None) -> int:
    """Opens ``directory/path`` for writing (truncated), making missing folders, without
    following any link on the way; returns the file descriptor."""
    parts = path.split("/")
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for part in parts[:-1]:
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
                if uid is not None:
                    os.chown(part, uid, uid, dir_fd=fd, follow_symlinks=False)
            except FileExistsError:
                pass
            try:
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                raise BadPath(f"{part!r} on the way to {path!r} is not a folder") from exc
            os.close(fd)
            fd = inner
        try:
            out = os.open(
                parts[-1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644, dir_fd=fd
            )
        except IsADirectoryError as exc:
            raise BadPath(f"{path!r} is a folder") from exc
        except OSError as exc:
            if exc.errno == 40:  # ELOOP: a link where the file would go
                raise BadPath(f"{path!r} is a link") from exc
            raise
        if uid is not None:
            os.fchown(out, uid, uid)
        return out
    finally:
        os.close(fd)


def open_for_read(directory: str, path: str) -> int:
    """Opens a regular file under ``directory`` without following links; raises
    FileNotFoundError when there is no such regular file."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        parts = path.split("/")
        for part in parts[:-1]:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
        out = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
    except OSError as exc:
        raise FileNotFoundError(path) from exc
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(out).st_mode):
        os.close(out)
        raise FileNotFoundError(path)
    return out


def remove(directory: str, path: str) -> None:
    """Removes one file (never through a link)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        parts = path.split("/")
        for part in parts[:-1]:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
        os.unlink(parts[-1], dir_fd=fd)
    finally:
        os.close(fd)
