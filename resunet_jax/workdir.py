"""The run directory: one training run at a time, writable before work starts, earlier
outputs kept, files written whole.

Every file a run writes for the user (reports, CSVs, cached arrays, exported models) goes
through `atomic_write`, so a crash never leaves a half-written file under a real name;
an earlier evaluation or prediction is moved aside (`keep_earlier`), never overwritten.
"""

import contextlib
import fcntl
import os
import socket
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from resunet_jax.errors import CheckpointError

LOCK_FILE = "train.lock"


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", **kwargs):
    """Opens a temporary file beside `path` and renames it to `path` once written.

    Args:
        path: the file to write.
        mode: "w" or "wb".
        **kwargs: passed to `open` (e.g. newline="" for CSV).

    Yields:
        The open temporary file. If the block raises, it is removed and `path` is left
        as it was.
    """
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def check_writable(folder: str):
    """Fails at once, naming `folder`, if files cannot be written there (read-only,
    permissions, no space left), before any expensive work whose results need it.

    Creates `folder` if needed.

    Raises:
        CheckpointError: the folder cannot be created or written.
    """
    probe = os.path.join(folder, f".write_test_{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise CheckpointError(f"{folder}: cannot write there ({e.strerror})") from e
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Holds `workdir` for one training run; a second one started there stops at once.

    Two runs in one workdir would write the same checkpoint steps over each other. The
    lock is an flock on `workdir/train.lock`, which the kernel releases when its process
    ends however it ends (kill -9 included), so no stale lock is ever left to clear; the
    file names the holder for the error. Where the file system has no flock (some Lustre
    mounts) the run goes on with a warning. Multi-host: process 0 locks for all.

    Raises:
        CheckpointError: another process holds the lock, or `workdir` cannot be written.
    """
    holder, lock = None, None
    if jax.process_index() == 0:
        check_writable(workdir)
        path = os.path.join(workdir, LOCK_FILE)
        lock = open(path, "a+")  # noqa: SIM115 (held until the run ends)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "holder unknown"
        except OSError as e:
            logging.warning("Cannot lock %s (%s): nothing stops a second run here", path, e)
        else:
            lock.truncate(0)
            lock.write(
                f"pid {os.getpid()} on {socket.gethostname()}, "
                f"since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n"
            )
            lock.flush()
    if jax.process_count() > 1:
        busy = multihost_utils.broadcast_one_to_all(np.int32(holder is not None))
        holder = holder or ("see process 0's log" if busy else None)
    try:
        if holder is not None:
            raise CheckpointError(
                f"{os.path.abspath(workdir)} is in use by another training run ({holder}); "
                "wait for it, stop it (SIGTERM saves its step) or pass another --workdir"
            )
        yield
    finally:
        if lock is not None:
            lock.close()


def keep_earlier(folder: str, report: str):
    """Moves an earlier run's output `folder` aside, if it holds `report`.

    The folder becomes `<folder>_<YYYYmmdd-HHMMSS>`, the time `report` was written, so a
    new evaluation or prediction never overwrites nor mixes with an earlier one; the log
    says where it went.
    """
    earlier = os.path.join(folder, report)
    if not os.path.exists(earlier):
        return
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(earlier)))
    kept, n = f"{folder}_{stamp}", 1
    while os.path.exists(kept):
        n += 1
        kept = f"{folder}_{stamp}_{n}"
    os.rename(folder, kept)
    logging.info("Kept the earlier %s in %s", os.path.basename(folder), kept)
