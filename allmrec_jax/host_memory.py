"""Host memory: XLA:CPU's large temporaries on transparent huge pages.

XLA's CPU runtime allocates each execution's temporaries as one block (about 2.5 GB for a
stage-2 training step of SmolLM2-135M at batch 4 x 320 tokens) and frees it when the call
returns. glibc serves a block that large with mmap and returns it with munmap, so every
call faults its pages in afresh: ~600,000 page faults of 4 KiB per stage-2 step.

glibc's tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) has malloc advise transparent huge
pages for its mappings: 2-MiB pages, 512 times fewer faults. Tunables are read when a
process starts, so `reexec_with_huge_pages()` runs the launcher's own command line again,
once, with the tunable added to GLIBC_TUNABLES, before the launcher has done any work. On a
2-core AVX512-BF16 CPU the main command's CF stage took 1:08 instead of 1:53 and stage 1
3:17 instead of 3:41; its stage-2 steps kept their time (14:05 for 300 steps against 14:14),
although a tight loop of stage-2 steps alone alternates 1.65 s and 3.85 s steps under it
(2.3 s steady without it).

Stage 2 and its evaluation run without them: inside `huge_pages_stopped()` (prctl
PR_SET_THP_DISABLE) the process faults in no further huge pages, and the same
tight loop runs 2.26-2.31 s every step (mean 2.27 s against 2.75 under huge pages, 2.29
without the tunable).

Measured in that tight loop and not used: glibc keeping freed memory in its heap (one
arena, no mmap, no trimming) 1.9 s per step, but fragmentation took the main command from
7 to 17.6 GB resident; tcmalloc (LD_PRELOAD) 1.7 s, a system library rather than a wheel.

Nothing happens off Linux, on another C library or glibc < 2.35, where the kernel's
transparent huge pages are "never", where GLIBC_TUNABLES already sets the tunable, or with
ALLMREC_HOST_MALLOC=default.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pathlib
import sys

ENV = "ALLMREC_HOST_MALLOC"
TUNABLE = "glibc.malloc.hugetlb"
_THP = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _glibc_version() -> tuple[int, ...] | None:
  try:
    libc = ctypes.CDLL(None)
    get = libc.gnu_get_libc_version
  except (OSError, AttributeError):
    return None
  get.restype = ctypes.c_char_p
  try:
    return tuple(int(x) for x in get().decode().split(".")[:2])
  except ValueError:
    return None


def _huge_pages_possible() -> bool:
  try:
    return "[never]" not in _THP.read_text()
  except OSError:
    return False


def wanted(environ=None) -> bool:
  """True when this process should run with the tunable and does not yet."""
  environ = os.environ if environ is None else environ
  mode = environ.get(ENV, "huge_pages")
  if mode not in ("huge_pages", "default"):
    raise ValueError(f"{ENV}={mode!r}: choose 'huge_pages' (XLA's temporaries on "
                     "transparent huge pages) or 'default' (glibc's defaults)")
  if mode == "default" or not sys.platform.startswith("linux"):
    return False
  if TUNABLE in environ.get("GLIBC_TUNABLES", ""):
    return False
  version = _glibc_version()
  return version is not None and version >= (2, 35) and _huge_pages_possible()


def reexec_with_huge_pages() -> None:
  """Replaces the process by the same command line with `glibc.malloc.hugetlb=1` in
  GLIBC_TUNABLES (same pid, so signals and schedulers see no change); returns without
  doing anything when `wanted()` is False. Call it first thing in a launcher's main; a bad
  ALLMREC_HOST_MALLOC ends the process with its one-line message."""
  try:
    if not wanted():
      return
  except ValueError as e:
    raise SystemExit(str(e)) from None
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  os.environ["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, f"{TUNABLE}=1") if t)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, list(sys.orig_argv))


PR_SET_THP_DISABLE, PR_GET_THP_DISABLE = 41, 42


@contextlib.contextmanager
def huge_pages_stopped():
  """Within the block this process faults in no new transparent huge pages (Linux prctl
  PR_SET_THP_DISABLE; pages already mapped stay, and children started inside inherit the
  setting); the previous setting is restored on exit. Stage 2 runs inside it: its
  temporaries alternate fast and slow steps under huge pages. Off Linux, or with
  ALLMREC_HOST_MALLOC=default, does nothing. Yields True when the kernel took the setting."""
  libc = None
  if os.environ.get(ENV) != "default" and sys.platform.startswith("linux"):
    try:
      libc = ctypes.CDLL(None, use_errno=True)
      before = libc.prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0)
      if before < 0 or libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
        libc = None
    except (OSError, AttributeError):
      libc = None
  try:
    yield libc is not None
  finally:
    if libc is not None:
      libc.prctl(PR_SET_THP_DISABLE, before, 0, 0, 0)
