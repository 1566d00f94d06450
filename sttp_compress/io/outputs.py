"""Outputs that are whole or absent, and only where the user allowed.

Every file is written under a temporary name in its own folder and renamed into place; a checkpoint
and its report folder land together (`publish`), under a lock on the checkpoint's folder, so a failure,
an interrupt or a concurrent run never leaves one without the other. Temporary names carry the writer's
process id, so leftovers of a killed run are recognised and removed by the next one.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from sttp_compress.errors import UserError

__all__ = ["check_output_path", "check_output_folder", "atomic_write", "atomic_torch_save", "publish",
           "TEMP_PREFIX"]

TEMP_PREFIX = ".sttp-tmp-"
written: list[Path] = []  # what this process has put in place, for the CLI's last word after an interrupt
_TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + r"(\d+)-")


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _check_name(path: Path, what: str) -> None:
    """Refuse a name the report could not print (not UTF-8) or the file system cannot hold (too long)."""
    try:
        os.fsencode(str(path)).decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what} {os.fsdecode(os.fsencode(str(path)))!r} is not valid UTF-8; choose a plain name") \
            from None
    folder = path.absolute().parent
    limit = _name_max(folder) if folder.is_dir() else 255
    if len(os.fsencode(path.name)) > limit:
        raise UserError(f"{what} name {path.name[:40]}... is {len(os.fsencode(path.name))} bytes long; this file "
                        f"system allows {limit}")


def _check_folder_writable(folder: Path, shown: str) -> None:
    if not folder.exists():
        raise UserError(f"cannot write {shown}: folder {folder} does not exist")
    if not folder.is_dir():
        raise UserError(f"cannot write {shown}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {shown}: folder {folder} is not writable")


def check_output_path(path: str | os.PathLike, force: bool, what: str = "output") -> Path:
    """Check, before any work, that a file may be written at `path`: a valid name in an existing writable
    folder, not a folder, and either absent or (with force) a regular file -- never a symlink or a device."""
    target = Path(path)
    _check_name(target, what)
    if target.is_symlink():
        raise UserError(f"{what} {path} is a symbolic link; refusing to replace it (give the real path)")
    if target.is_dir():
        raise UserError(f"{what} {path} is a directory; give a file name to write")
    if target.exists():
        if not target.is_file():
            raise UserError(f"{what} {path} is not a regular file; refusing to replace it")
        if not force:
            raise UserError(f"{path} exists; pass ‹force› to overwrite")
    _check_folder_writable(target.absolute().parent, str(path))
    return target


def check_output_folder(path: str | os.PathLike, force: bool, may_hold: Callable[[str], bool],
                        what: str = "report folder") -> Path:
    """Check, before any work, that a folder of outputs may be (re)placed at `path`: absent, empty, or (with
    force) holding only files that `may_hold` accepts; its nearest existing parent must be writable."""
    folder = Path(path)
    _check_name(folder, what)
    if folder.is_symlink():
        raise UserError(f"{what} {path} is a symbolic link; refusing to replace it (give the real path)")
    if folder.exists():
        if not folder.is_dir():
            raise UserError(f"{what} {path} exists and is not a folder")
        entries = [e.name for e in os.scandir(folder)]
        foreign = [n for n in entries if not may_hold(n)]
        if foreign:
            raise UserError(f"{what} {path} holds files that are not a report ({', '.join(sorted(foreign)[:3])}); "
                            "choose another folder")
        if entries and not force:
            raise UserError(f"{what} {path} exists; pass ‹force› to overwrite")
    anchor = next(p for p in [folder.absolute().parent, *folder.absolute().parents] if p.exists())
    if not anchor.is_dir() or not os.access(anchor, os.W_OK | os.X_OK):
        raise UserError(f"cannot create the {what} {path}: {anchor} is not a writable folder")
    return folder


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: Path) -> None:
    """Remove temporary files and folders that a killed writer (its process gone) left in `folder`."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            _remove(Path(entry.path))


def _temp_file(folder: Path, shown: str) -> str:
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=".tmp")
    except OSError as exc:
        raise UserError(f"cannot write {shown}: folder {folder} is not writable ({exc.strerror or exc})") from None
    os.close(fd)
    return tmp


def _umask() -> int:
    """The process's umask (read by setting and restoring it; not thread-safe)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _new_file_mode() -> int:
    """The permission bits a plain open() would give a new file."""
    return 0o666 & ~_umask()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(target: Path, write: Callable[[str], None]) -> str:
    """Write one file under a temporary name beside `target`, flushed to disk, with the mode a new (or the
    replaced) file would have; the temp is removed again if anything fails."""
    tmp = _temp_file(target.absolute().parent, str(target))
    try:
        write(tmp)
        mode = (target.stat().st_mode & 0o7777) if target.is_file() else _new_file_mode()
        os.chmod(tmp, mode)
        _fsync(tmp)
    except BaseException as exc:
        _remove(Path(tmp))
        if isinstance(exc, OSError):
            raise UserError(f"cannot write {target}: {exc.strerror or exc}") from None
        raise
    return tmp


@contextmanager
def _quiet_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while renames run, so an interrupt lands before or after them, not between."""
    held = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (ValueError, OSError, AttributeError):
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on a folder (flock on its descriptor) for the final renames of one output."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], force: bool = False) -> None:
    """Write a file via a temp file and a rename, so readers never see a half-written output; refuses to
    replace an existing file without `force`, and a symlink or non-regular file ever."""
    target = check_output_path(path, force)
    folder = target.absolute().parent
    remove_stale_temps(folder)
    tmp = _write_temp(target, write)
    try:
        with _quiet_signals(), _folder_lock(folder):
            check_output_path(path, force)  # another process may have made it meanwhile
            os.replace(tmp, target)
            written.append(target)
    except BaseException as exc:
        _remove(Path(tmp))
        if isinstance(exc, OSError):
            raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike, force: bool = False) -> None:
    """torch.save through atomic_write, so an interrupted save never leaves a corrupt file."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp), force=force)


def _make_parents(folder: Path) -> list[Path]:
    """Create the missing parents of `folder`; return those created, innermost first (for undoing)."""
    missing, p = [], folder.absolute().parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    try:
        folder.absolute().parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {folder.parent}: {exc.strerror or exc}") from None
    return missing


def _write_folder(target: Path, files: Mapping[str, bytes]) -> Path:
    """Write `files` into a new temporary folder beside `target`; returns it."""
    try:
        tmp = Path(tempfile.mkdtemp(dir=target.absolute().parent, prefix=f"{TEMP_PREFIX}{os.getpid()}-"))
    except OSError as exc:
        raise UserError(f"cannot create {target}: {exc.strerror or exc}") from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # what a plain mkdir gives, not mkdtemp's 0o700
        for name, data in files.items():
            (tmp / name).write_bytes(data)
            _fsync(str(tmp / name))
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, OSError):
            raise UserError(f"cannot write {target}: {exc.strerror or exc}") from None
        raise
    return tmp


def publish(checkpoint: Path, write_checkpoint: Callable[[str], None], report_dir: Path,
            render_report: Callable[[int], Mapping[str, bytes]], force: bool,
            may_hold: Callable[[str], bool]) -> None:
    """Write a checkpoint and its report folder as one unit: both land, or neither does.

    `render_report(size)` gets the checkpoint's size in bytes and returns the report's files (name -> bytes).
    Both are written in full under temporary names first (a full disk fails here, with nothing in place);
    then, under a lock on the checkpoint's folder and with interrupts held, the old report folder moves
    aside, the new one and the checkpoint are renamed in, and the old one is deleted. A concurrent run
    publishing to the same checkpoint waits for the lock, so the pair on disk always comes from one run.
    """
    folder = checkpoint.absolute().parent
    remove_stale_temps(folder)
    created = _make_parents(report_dir)
    remove_stale_temps(report_dir.absolute().parent)
    tmp_ckpt = tmp_report = None
    try:
        tmp_ckpt = _write_temp(checkpoint, write_checkpoint)
        tmp_report = _write_folder(report_dir, render_report(os.path.getsize(tmp_ckpt)))
        with _quiet_signals(), _folder_lock(folder):
            check_output_path(checkpoint, force, "output")  # a concurrent run without --force may have won
            check_output_folder(report_dir, force, may_hold)
            _swap_in(checkpoint, Path(tmp_ckpt), report_dir, tmp_report)
            tmp_ckpt = tmp_report = None
            written.extend([checkpoint, report_dir])
    except BaseException:
        for tmp in (tmp_ckpt, tmp_report):
            if tmp is not None:
                _remove(Path(tmp))
        for parent in created:
            try:
                parent.rmdir()
            except OSError:
                break
        raise


def _swap_in(checkpoint: Path, tmp_ckpt: Path, report_dir: Path, tmp_report: Path) -> None:
    """The renames of `publish`, undone in reverse if one fails."""
    aside = None
    try:
        if report_dir.exists():
            aside = report_dir.absolute().parent / f"{TEMP_PREFIX}{os.getpid()}-old-{report_dir.name[:40]}"
            os.rename(report_dir, aside)
        os.rename(tmp_report, report_dir)
        try:
            os.replace(tmp_ckpt, checkpoint)
        except OSError:
            os.rename(report_dir, tmp_report)
            raise
    except OSError as exc:
        if aside is not None and not report_dir.exists():
            os.rename(aside, report_dir)
        code = errno.errorcode.get(exc.errno or 0, "")
        raise UserError(f"cannot write {checkpoint} and {report_dir}: {exc.strerror or code or exc}") from None
    if aside is not None:
        _remove(aside)
