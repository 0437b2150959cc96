"""Files: atomic writes (a reader never sees a half-written file, a crash never destroys the previous one),
JSON, content digests, free-space checks and directory locks.

A directory inca locks (an output folder, an activation store) must be a real directory: one that is a symlink
is refused rather than written or deleted through (:func:`refuse_symlink`).

Every file inca writes goes through :func:`atomic_write`: a new temporary file (``O_EXCL | O_NOFOLLOW``, so
never through an existing path or symlink) in the destination's directory, fsync, then a rename over the
destination, which replaces a symlink there rather than writing through it. Files get the user's umask
(``0o666 & ~umask``), like any other tool's output, so teams can share stores and run directories.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import InCAError, first_line

TEMP_SUFFIX = ".inca-tmp"
LOCK_FILE = ".inca.lock"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file over ``path`` (same directory, so atomic).

    A full disk is a one-line :class:`~inca.errors.InCAError` naming the place; ``path`` keeps its previous
    content and the temporary file is removed.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    except OSError as exc:
        raise InCAError(f"cannot write {path.name} in {path.parent} ({exc.strerror}): choose a directory you can "
                        "write in") from None
    mode = os.fstat(fd).st_mode & 0o777  # 0o666 less the umask, as the kernel applied it
    os.close(fd)
    try:
        write(str(tmp))
        os.chmod(tmp, mode)  # writers that recreate the file (e.g. safetensors) may have narrowed it
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if _out_of_space(exc):
            raise InCAError(
                f"no space left on {path.parent} while writing {path.name}: {disk_hint(path.parent)}"
            ) from None
        raise


def _out_of_space(exc: BaseException) -> bool:
    """A full disk or quota, as an ``OSError`` or as a library's own error quoting the OS error (safetensors
    raises ``SafetensorError: ... No space left on device (os error 28)``)."""
    codes = (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, OSError):
        return exc.errno in codes
    return any(f"(os error {code})" in str(exc) for code in codes)


def disk_hint(directory: str | os.PathLike) -> str:
    """What a user with a full disk needs to know: how much is free where."""
    free = shutil.disk_usage(existing_parent(directory)).free
    return f"{free / 2**20:.0f} MiB free there; free some space or choose another directory"


def existing_parent(path: str | os.PathLike) -> Path:
    """``path`` or its nearest existing ancestor (where free space is measured before it is created)."""
    path = Path(path).absolute()
    return next(p for p in [path, *path.parents] if p.exists())


def require_free_space(directory: str | os.PathLike, needed: int, what: str) -> None:
    """Refuse to start writing ``needed`` bytes under ``directory`` when the disk does not have them."""
    free = shutil.disk_usage(existing_parent(directory)).free
    if needed > free:
        raise InCAError(
            f"{what} needs {needed / 2**30:.2f} GiB at {directory} but only {free / 2**30:.2f} GiB are free: "
            "free some space or choose another directory"
        )


def remove_stale_temps(directory: str | os.PathLike) -> int:
    """Delete temporary files that interrupted atomic writes left under ``directory`` (hold its lock first)."""
    stale = list(Path(directory).rglob(f".*{TEMP_SUFFIX}")) if Path(directory).is_dir() else []
    for file in stale:
        file.unlink(missing_ok=True)
    return len(stale)


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (an ``flock`` on ``directory/.inca.lock``) for the block.

    A second process gets a one-line error naming the holder's pid. The kernel releases the lock of a
    process that dies, so a lock left by a killed run is simply taken over; a block that ends without an error
    removes the lock file, so a finished run leaves nothing behind.
    """
    directory = Path(directory)
    while True:
        fd = _open_lock(directory, what)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise InCAError(
                f"{what} {directory} is in use by process {holder}; wait for it to finish, or use another directory"
            ) from None
        if _is_current(fd, directory / LOCK_FILE):
            break
        os.close(fd)  # its holder removed that file as it finished: lock the one that replaced it
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
        (directory / LOCK_FILE).unlink(missing_ok=True)  # still held: no other process can be using it
    finally:
        os.close(fd)


def _is_current(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path`` (not one unlinked since it was opened)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
    except FileNotFoundError:
        return False


def refuse_symlink(path: str | os.PathLike, what: str) -> None:
    """Refuse in one line a directory inca writes and deletes in that is a symlink: inca never writes or deletes
    through a link into another place (a planted one, or one to a folder the user keeps elsewhere). The path's
    parents may be links (a cache root or a run folder on another disk is common); only the directory itself,
    which inca names or is given to fill, must be real."""
    if Path(path).is_symlink():
        raise InCAError(f"{what} {path} is a symlink (to {os.readlink(path)}): inca never writes or deletes through "
                        "one; pass the directory it points to, or another one")


def check_directory(path: str | os.PathLike, what: str) -> None:
    """Refuse in one line, before any work starts, a path that cannot become a directory inca writes in: a symlink
    (see :func:`refuse_symlink`), a file, a path below a file, or a place this process cannot write."""
    path = Path(path)
    refuse_symlink(path, what)
    existing = existing_parent(path)
    if not existing.is_dir():
        where = "is a file" if existing == path.absolute() else f"is below the file {existing}"
        raise InCAError(f"{what} {path} {where}, not a directory: choose a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InCAError(f"{what} {path} cannot be written ({existing} is read-only to this process): choose a "
                        "directory you can write in")


def _open_lock(directory: Path, what: str) -> int:
    """Create ``directory`` (see :func:`check_directory`) and open its lock file, or refuse in one line."""
    check_directory(directory, what)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        return os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as exc:
        problem = (f"its {LOCK_FILE} is a symlink, which inca never makes: remove it"
                   if (directory / LOCK_FILE).is_symlink() else
                   f"cannot be used ({exc.strerror}): choose a directory you can write in")
        raise InCAError(f"{what} {directory} {problem}") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_json_file(path: str | os.PathLike, fix: str = "", what: str = "") -> Any:
    """The JSON value in ``path``; a file that cannot be read or parsed is a one-line
    :class:`~inca.errors.InCAError` naming it (as ``what``, e.g. "probe report", when given), why, and ``fix``
    (what the user can do about it)."""
    name = f"{what} {path}" if what else str(path)
    try:
        return read_json(path)
    except OSError as exc:
        problem = f"{name} is unreadable ({first_line(exc)})"
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser can follow
        problem = f"{name} is unreadable (it is not valid JSON: {first_line(exc)})"
    raise InCAError(f"{problem}; {fix}" if fix else problem)


# The largest activation store ``--cache auto`` builds unasked, in GB (1e9 bytes): inca's own choice. A ViT-B/16's
# tokens at 224 px take 0.3 MB per image and layer in float16, so 64 GB hold 4 layers of 50,000 images; a larger
# store is built on request (``--cache always``) or streamed.
DEFAULT_MAX_STORE_GB = 64.0
# The largest share of free host or GPU memory a store held there (``--cache-device``) may take: inca's own choice,
# leaving the other half to the adapters, their optimizer state and the backbone (or other jobs).
DEFAULT_MEMORY_FRACTION = 0.5


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where inca keeps stores and file-hash indexes: ``cache_dir``, else ``$INCA_CACHE``, else ``~/.cache/inca``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("INCA_CACHE", Path.home() / ".cache" / "inca")).expanduser()


def canonical_json(obj: Any) -> bytes:
    """The bytes that identify a JSON-able value: keys sorted (their order does not matter), any other value
    as its ``str``. What every digest of a value hashes."""
    return json.dumps(obj, sort_keys=True, default=str).encode()


# Hex digits of a SHA-256 that name a backbone, a task or a unit of work (fingerprints, skip keys, output names):
# inca's own choice, 64 bits, so that two different ones collide with odds of about n^2 / 2^65 (none in practice)
# while names stay short enough to read.
FINGERPRINT_LENGTH = 16


def digest(obj: Any, length: int = FINGERPRINT_LENGTH) -> str:
    """``length`` hex digits of the SHA-256 of :func:`canonical_json`: :data:`FINGERPRINT_LENGTH` for
    fingerprints and skip keys, all 64 for a manifest's checksum."""
    return hashlib.sha256(canonical_json(obj)).hexdigest()[:length]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """The SHA-256 of a file's bytes, read in chunks (stores and weights are large)."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
    return sha.hexdigest()
