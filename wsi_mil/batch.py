"""Batch-job plumbing shared by every per-slide stage.

Sharding over SLURM job arrays, CPU counts that respect the job's allocation,
atomic outputs, per-output locks, and the ``failures.csv`` log. Pure helpers
(``parse_shard``, ``shard_items``, ``params_digest``) are separate from I/O.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from wsi_mil.errors import ConfigError, WsiMilError, cannot_write, output_hint, path_error

log = logging.getLogger(__name__)
T = TypeVar("T")


# ---------------------------------------------------------------- CPUs
def pool_workers(pool: Any) -> int:
    """Threads of a ThreadPoolExecutor (1 for anything that does not say)."""
    return max(1, getattr(pool, "_max_workers", 1))


def available_cpus() -> int:
    """CPUs this process may use: min of affinity, cgroup quota and SLURM_CPUS_PER_TASK.

    Under ``torchrun`` the ranks of a node share them: divided by ``LOCAL_WORLD_SIZE``.
    """
    counts: list[int] = []
    try:
        counts.append(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        counts.append(os.cpu_count() or 1)
    quota = _cgroup_cpu_quota()
    if quota:
        counts.append(quota)
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm and slurm.isdigit() and int(slurm) > 0:
        counts.append(int(slurm))
    n = max(1, min(counts))
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    if local.isdigit() and int(local) > 1:
        n = max(1, n // int(local))
    return n


def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    try:  # cgroup v2
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return max(1, int(int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        q = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        p = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        if q > 0 and p > 0:
            return max(1, q // p)
    except (OSError, ValueError):
        pass
    return None


# ---------------------------------------------------------------- shards
def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"I/N"`` -> (I, N), 0 <= I < N. ``None`` reads SLURM array variables, else (0, 1)."""
    if spec is None or spec == "":
        tid = os.environ.get("SLURM_ARRAY_TASK_ID")
        cnt = os.environ.get("SLURM_ARRAY_TASK_COUNT")
        if tid is not None and cnt is not None:
            try:
                lo = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
                return _check_shard(int(tid) - lo, int(cnt))
            except ValueError as e:
                raise ConfigError(f"bad SLURM array variables: {e}") from None
        return (0, 1)
    try:
        i_s, n_s = spec.split("/")
        return _check_shard(int(i_s), int(n_s))
    except ValueError:
        raise ConfigError(
            f"--shard {spec!r} is not of the form I/N", "e.g. --shard 0/4 for the first of 4 shards"
        ) from None


def _check_shard(i: int, n: int) -> tuple[int, int]:
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"shard {i}/{n} is out of range", "use I/N with 0 <= I < N")
    return (i, n)


def shard_items(items: Sequence[T], shard: tuple[int, int], key: Callable[[T], str]) -> list[T]:
    """Items of shard I of N: round-robin over items sorted by ``key``. Disjoint, covering."""
    i, n = shard
    ordered = sorted(items, key=key)
    return [it for k, it in enumerate(ordered) if k % n == i]


# ---------------------------------------------------------------- fingerprints
def file_fingerprint(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """Cheap identity of an input file or directory: size (bytes) + mtime (ns)."""
    if path is None:
        return None
    p = Path(path)
    st = p.stat()
    if p.is_dir():  # zarr/mrxs folders: newest mtime and total size of the tree
        size, mtime = 0, st.st_mtime_ns
        for sub in p.rglob("*"):
            s = sub.stat()
            size += s.st_size
            mtime = max(mtime, s.st_mtime_ns)
        return {"size": size, "mtime_ns": mtime}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def params_digest(params: dict[str, Any]) -> str:
    """Stable short hash of a JSON-able parameter dict (order-independent)."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------- output folders
def make_output_dir(path: str | os.PathLike, option: str) -> Path:
    """``mkdir -p path``, checked writable: a stage makes its output folder up front, so a
    path that cannot be a folder is one ConfigError naming it and ``option`` (the option
    that chose it, e.g. ``--work``), not an error per slide or an internal error."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        err = path_error(e, output_hint(option))
        if err is None:
            raise
        raise err from e
    if not os.access(p, os.W_OK | os.X_OK):  # made by someone else, or read-only
        try:
            read_only = bool(os.statvfs(p).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        reason = os.strerror(errno.EROFS if read_only else errno.EACCES)
        raise cannot_write(p, reason, output_hint(option))
    return p


def check_output_dir(path: str | os.PathLike, option: str) -> None:
    """ConfigError if a file stands where folder ``path`` (or one of its parents) should
    be; creates nothing. Permissions are left to :func:`make_output_dir`: a folder that is
    only written to on a failure (``W/failures.csv``) may well be read-only."""
    p = Path(path)
    blocker = next((q for q in (p, *p.parents) if os.path.lexists(q)), None)
    if blocker is None or not os.path.exists(blocker) or blocker.is_dir():
        return
    reason = os.strerror(errno.EEXIST if blocker == p else errno.ENOTDIR)
    raise cannot_write(p, reason, output_hint(option))


# ---------------------------------------------------------------- atomic outputs
def tmp_sibling(final: Path) -> Path:
    """A unique temporary name next to ``final`` (same filesystem, so rename is atomic)."""
    return final.with_name(
        f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    )


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path to write a file *or directory* to; rename onto ``final`` on success.

    On any exception the temp path is removed and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(final)
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            old = tmp_sibling(final)
            os.replace(final, old)  # directories cannot be replaced by rename in one step
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def remove_stale_tmps(final: str | os.PathLike) -> None:
    """Temp files or folders of ``final`` (``.NAME.tmp-*``) left by killed runs; call it only
    while holding ``final``'s :func:`output_lock`, so no live writer owns them."""
    final = Path(final)
    for p in final.parent.glob(f".{final.name}.tmp-*"):
        _remove(p)


def clean_stale_tmp(folder: Path, max_age_s: float = 0) -> None:
    """Remove leftover ``.NAME.tmp-*`` entries (from killed runs) older than ``max_age_s``."""
    import time

    if not folder.is_dir():
        return
    now = time.time()
    for p in folder.glob(".*.tmp-*"):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime >= max_age_s:
                _remove(p)


@contextlib.contextmanager
def output_lock(final: str | os.PathLike, blocking: bool = False) -> Iterator[bool]:
    """Advisory lock on ``<final>.lock``; yields True if held, False if another process has it.

    Two processes on the same shard therefore never write the same output at once. The
    lock file is removed when the holder releases it, so finished runs leave no ``*.lock``
    files (an empty ``.locks`` folder holding it goes too); a SIGKILLed holder leaves one,
    which the next holder reuses and removes.
    """
    lock_path = Path(final).with_name(Path(final).name + ".lock")
    fd = _acquire_lock_file(lock_path, blocking)
    if fd is None:
        yield False
        return
    try:
        yield True
    finally:
        _release_lock_file(lock_path, fd)


def _acquire_lock_file(lock_path: Path, blocking: bool) -> int | None:
    """An fd holding ``flock(LOCK_EX)`` on the file now at ``lock_path``; None if taken.

    Race-free with holders that unlink the file on release: after locking, the path must
    still name the inode we locked; if a releasing holder unlinked it meanwhile, we locked
    an orphan and start again on a fresh file.
    """
    while True:
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except (FileNotFoundError, FileExistsError):
            # a releasing holder removed the empty .locks folder between our mkdir and open
            # (FileNotFoundError), or between mkdir's EEXIST and its is_dir check
            # (FileExistsError): make it again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.stat(lock_path), os.fstat(fd))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _release_lock_file(lock_path: Path, fd: int) -> None:
    # unlink while still holding the lock: a waiter that then gets the old inode sees it
    # is no longer at lock_path and retries on a new file
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        if lock_path.parent.name == ".locks":
            with contextlib.suppress(OSError):  # not empty: another output is locked there
                lock_path.parent.rmdir()
    finally:
        os.close(fd)  # releases the flock


# ---------------------------------------------------------------- failures
FAILURE_COLUMNS = ["time", "stage", "slide_id", "path", "reason"]


def record_failure(
    work: str | os.PathLike, stage: str, slide_id: str, path: Any, reason: str
) -> None:
    """Append one row to ``W/failures.csv`` (locked, so shards can share it)."""
    f = Path(work) / "failures.csv"
    f.parent.mkdir(parents=True, exist_ok=True)
    with open(f, "a+", newline="") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0, os.SEEK_END)
        w = csv.writer(fh)
        if fh.tell() == 0:
            w.writerow(FAILURE_COLUMNS)
        now = _dt.datetime.now().isoformat(timespec="seconds")
        w.writerow(
            [now, stage, slide_id, "" if path is None else str(path), reason.replace("\n", " ")]
        )
        fh.flush()
        fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass
class BatchResult:
    """Outcome of a per-slide stage. ``exit_code``: 0 all done, 1 some slides failed."""

    stage: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    #: slides whose output another process was writing (see :class:`Busy`)
    busy: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    warnings: dict[str, str] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def summary(self) -> str:
        s = (
            f"{self.stage}: {len(self.done)} done, {len(self.skipped)} up to date, "
            f"{len(self.failed)} failed"
        )
        if self.busy:
            s += f", {len(self.busy)} left to another process writing them"
        if self.warnings:
            s += f", {len(self.warnings)} with warnings"
        for sid, why in self.failed.items():
            s += f"\n  FAILED {sid}: {why}"
        for sid, why in self.warnings.items():
            s += f"\n  WARNING {sid}: {why}"
        return s


class Skip(Exception):
    """Raised by a per-slide function when its output is already complete and current."""


class Busy(Skip):
    """Raised by a per-slide function when another process holds the output's lock (it is
    writing that output now): left to it, and counted apart from the up-to-date slides."""


class SlideWarning(Exception):
    """Raised by a per-slide function that finished but wants a warning recorded (e.g. no tissue)."""


def run_per_slide(
    stage: str,
    items: Sequence[T],
    fn: Callable[[T], Any],
    work: str | os.PathLike,
    slide_id: Callable[[T], str],
    slide_path: Callable[[T], Any] = lambda _: None,
    progress: bool = True,
    debug: bool = False,
    processes: int = 1,
) -> BatchResult:
    """Run ``fn`` on every item, keep going past failures, log them to ``W/failures.csv``.

    ``fn`` raises :class:`Skip` for up-to-date outputs and :class:`SlideWarning` for a
    finished slide worth a warning. Any other exception marks the slide failed.

    ``processes > 1``: that many slides at once, each in a worker process (``spawn``), for
    batches of many small images whose per-slide work is mostly serial. ``fn`` must then
    pickle (a module-level function or a ``functools.partial`` of one); failures are
    recorded here as usual, and the done/skipped lists are in order of completion.
    """
    from tqdm.auto import tqdm

    res = BatchResult(stage)
    bar = tqdm(total=len(items), desc=stage, unit="slide", disable=not progress, leave=True)
    try:
        for it, (status, message) in _run_items(items, fn, processes, debug, bar, slide_id):
            sid = slide_id(it)
            if status == "done":
                res.done.append(sid)
            elif status == "skip":
                res.skipped.append(sid)
            elif status == "busy":
                res.busy.append(sid)
            elif status == "warn":
                res.done.append(sid)
                res.warnings[sid] = message
                log.warning("%s: %s", sid, message)
            else:
                res.failed[sid] = message
                log.error("%s failed: %s", sid, message)
                record_failure(work, stage, sid, slide_path(it), message)
    finally:
        bar.close()
    return res


def call_for_slide(fn: Callable[[T], Any], item: T, debug: bool = False) -> tuple[str, str]:
    """``fn(item)`` as ``(status, message)``: ``done``, ``skip``, ``busy``, ``warn`` (the
    warning) or ``fail`` (the reason). Plain strings, so the outcome crosses process boundaries."""
    try:
        fn(item)
        return "done", ""
    except Busy:
        return "busy", ""
    except Skip:
        return "skip", ""
    except SlideWarning as w:
        return "warn", str(w)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - a bad slide must not stop the batch
        if debug:
            log.exception("%r failed", item)
        return "fail", str(e) if isinstance(e, WsiMilError) else f"{type(e).__name__}: {e}"


def _run_items(
    items: Sequence[T],
    fn: Callable[[T], Any],
    processes: int,
    debug: bool,
    bar: Any,
    slide_id: Callable[[T], str],
) -> Iterator[tuple[T, tuple[str, str]]]:
    """(item, outcome) for every item: in order in this process, or as worker processes finish."""
    if processes <= 1 or len(items) <= 1:
        for it in items:
            bar.set_postfix_str(slide_id(it), refresh=False)
            yield it, call_for_slide(fn, it, debug)
            bar.update(1)
        return
    from concurrent.futures import FIRST_COMPLETED, wait
    from concurrent.futures.process import BrokenProcessPool

    n_proc = min(processes, len(items))
    todo = list(reversed(items))  # popped from the end: in order
    running: dict[Any, T] = {}
    pool = process_pool(n_proc)
    died = (
        "its worker process died (out of memory?); run again (finished slides are skipped), "
        "with fewer --processes"
    )
    try:
        while todo or running:
            # at most one slide per process in flight: an interrupt or a dead worker then
            # costs only the slides being worked on
            while todo and len(running) < n_proc:
                try:
                    running[pool.submit(call_for_slide, fn, todo[-1], debug)] = todo[-1]
                    todo.pop()
                except BrokenProcessPool:  # broke since the last wait: start a new one
                    stop_pool(pool)
                    pool = process_pool(n_proc)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            broken = False
            for fut in done:
                it = running.pop(fut)
                bar.set_postfix_str(slide_id(it), refresh=False)
                try:
                    outcome = fut.result()
                except BrokenProcessPool:  # a worker was killed: its pool goes with it
                    outcome, broken = ("fail", died), True
                yield it, outcome
                bar.update(1)
            if broken:  # the slides still running died with the pool; the rest go on in a new one
                for it in running.values():
                    yield it, ("fail", died)
                    bar.update(1)
                running.clear()
                stop_pool(pool)
                pool = process_pool(n_proc)
    except BaseException:
        stop_pool(pool, kill=True)  # Ctrl-C: do not wait for the slides being worked on
        raise
    stop_pool(pool)


def process_pool(n: int) -> Any:
    """``n`` worker processes (spawn, not fork: this process may hold threads) whose logging
    is set up like this process's, so their warnings read like ours."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    root = logging.getLogger()
    # the format string this process's handler was given (a Formatter keeps it as _fmt)
    formats = [getattr(h.formatter, "_fmt", None) for h in root.handlers if h.formatter]
    fmt = next((f for f in formats if f), None)
    return ProcessPoolExecutor(
        n,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker_logging,
        initargs=(root.level, fmt),
    )


def _init_worker_logging(level: int, fmt: str | None) -> None:
    import sys

    logging.basicConfig(level=level, format=fmt or "%(levelname)s: %(message)s", stream=sys.stderr)


def stop_pool(pool: Any, kill: bool = False) -> None:
    """Shut ``pool`` down; ``kill``: end its worker processes now instead of waiting for them."""
    if kill:
        terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
        if terminate is not None:
            terminate()
        else:
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
    pool.shutdown(wait=not kill, cancel_futures=True)
