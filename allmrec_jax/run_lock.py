"""One writer per run folder: `workdir/run.lock`.

A launcher that writes a run (allmrec-train; allmrec-tables when it trains or writes)
holds the lock for as long as it runs; a second writer on the same folder is refused with
one line naming the holder. Readers (allmrec-recommend, allmrec-generate) never take it.

The lock file holds JSON {"pid", "host", "started", "command"} and is also `flock`ed by
its holder while it runs, so the kernel frees it when the holder dies, `kill -9` included.
A lock file left behind is stale when its process is gone on this host: it is taken over
with a warning. A lock of a live process, or of another host (whose processes cannot be
checked from here), refuses the launch; the message says which file to remove if that run
is known to be gone.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import pathlib
import socket
import sys

from absl import logging

LOCK_NAME = "run.lock"


class RunLockHeld(RuntimeError):
  """The run folder is held by another live writer; str() is the one-line message."""


def lock_path(workdir: str | os.PathLike) -> pathlib.Path:
  return pathlib.Path(workdir) / LOCK_NAME


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:          # alive, owned by another user
    return True
  return True


def read_holder(workdir: str | os.PathLike) -> dict | None:
  """The lock's JSON (pid, host, started, command), or None when there is no lock file or
  it is empty / unreadable (a writer killed between creating and filling it)."""
  try:
    text = lock_path(workdir).read_text()
  except FileNotFoundError:
    return None
  try:
    holder = json.loads(text)
  except json.JSONDecodeError:
    return None
  return holder if isinstance(holder, dict) else None


def _describe(holder: dict) -> str:
  return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
          + (f" ({holder['command']})" if holder.get("command") else ""))


class RunLock:
  """The held lock of one run folder (`release()` or leaving the `with` block frees it)."""

  def __init__(self, path: pathlib.Path, fd: int, info: dict):
    self.path, self._fd, self.info = path, fd, info

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      holder = read_holder(self.path.parent)
      if holder is not None and holder.get("pid") == self.info["pid"] and (
          holder.get("host") == self.info["host"]):
        self.path.unlink(missing_ok=True)
    finally:
      os.close(self._fd)     # closing the descriptor drops the flock
      self._fd = None

  def __enter__(self) -> RunLock:
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def acquire(workdir: str | os.PathLike, command: str | None = None) -> RunLock:
  """Takes `workdir/run.lock` for this process (the folder is created).

  Raises:
    RunLockHeld: another live process holds it (its pid, host and start time in the
      message), or a process of another host does.
  """
  path = lock_path(workdir)
  path.parent.mkdir(parents=True, exist_ok=True)
  host, pid = socket.gethostname(), os.getpid()
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise
      holder = read_holder(workdir) or {"pid": "?", "host": "?", "started": "?"}
      raise RunLockHeld(f"{path}: the run folder is in use by {_describe(holder)}; wait for "
                        "it to finish or use another --workdir") from None
    try:     # the file locked is still the one at `path` (a releasing holder unlinks it)
      if os.stat(path).st_ino == os.fstat(fd).st_ino:
        break
    except FileNotFoundError:
      pass
    os.close(fd)
  try:
    holder = read_holder(workdir)
    if holder is not None and holder.get("pid") != pid:
      if holder.get("host") != host:
        raise RunLockHeld(
            f"{path}: the run folder is held by {_describe(holder)}, another host; if that "
            "run is gone, remove the file and launch again")
      if isinstance(holder.get("pid"), int) and _pid_alive(holder["pid"]):
        raise RunLockHeld(f"{path}: the run folder is in use by {_describe(holder)}; wait "
                          "for it to finish or use another --workdir")
      logging.warning("%s: taking over the stale lock of %s (that process is gone)", path,
                      _describe(holder))
    info = {"pid": pid, "host": host,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "command": command if command is not None else " ".join(sys.argv)}
    data = (json.dumps(info) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)
    return RunLock(path, fd, info)
  except BaseException:
    os.close(fd)
    raise


def writer(program: str, workdir: str | os.PathLike,
           enabled: bool = True) -> RunLock | contextlib.nullcontext:
  """The lock of a launcher that writes `workdir`, taken now; used as `with writer(...):`.

  A held folder exits the program with one line (`SystemExit`: status 1, no traceback).
  Not `enabled` (the non-coordinator processes of a multi-host run) or a remote folder
  (gs://...): no lock.
  """
  if not enabled or not is_local(workdir):
    return contextlib.nullcontext()
  try:
    return acquire(workdir)
  except RunLockHeld as e:
    raise SystemExit(f"{program}: {e}") from None


def is_local(workdir: str | os.PathLike) -> bool:
  """False for a remote folder (gs://..., any scheme://): those are not locked."""
  return "://" not in str(workdir)
