"""The launchers' host-memory setting: the process restarts once with glibc's hugetlb
tunable, and under it a large block malloc'd and touched again after a free faults in far
fewer pages than glibc's defaults, which map it afresh in 4-KiB pages each time."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from allmrec_jax import host_memory

_PROBE = textwrap.dedent("""
    import ctypes, json, resource
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    n = 256 << 20
    faults = []
    for _ in range(3):      # as the temporaries of three jitted calls
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      p = libc.malloc(n)
      ctypes.memset(p, 1, n)
      libc.free(p)
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"faults": faults, "pages": n // resource.getpagesize()}))
""")

_REEXEC = textwrap.dedent("""
    import os
    from allmrec_jax import host_memory
    print("start", os.environ.get("GLIBC_TUNABLES", ""), flush=True)
    host_memory.reexec_with_huge_pages()
    print("running", os.environ.get("GLIBC_TUNABLES", ""), flush=True)
""")


def _env(**kw):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.ENV)}
  return {**env, **kw}


def _run(code: str, env) -> str:
  return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                        text=True, check=True, timeout=120).stdout


needs_huge_pages = pytest.mark.skipif(not host_memory.wanted(_env()),
                                      reason="no glibc >= 2.35 with transparent huge pages")


@needs_huge_pages
def test_restarts_once_with_the_tunable():
  lines = _run(_REEXEC, _env(GLIBC_TUNABLES="glibc.malloc.arena_max=4")).splitlines()
  tunables = "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"
  assert lines == ["start glibc.malloc.arena_max=4", f"start {tunables}",
                   f"running {tunables}"]
  off = _run(_REEXEC, _env(**{host_memory.ENV: "default"})).splitlines()
  assert off == ["start ", "running "]


@needs_huge_pages
def test_large_blocks_fault_in_huge_pages():
  default = json.loads(_run(_PROBE, _env()))
  huge = json.loads(_run(_PROBE, _env(GLIBC_TUNABLES=f"{host_memory.TUNABLE}=1")))
  pages = default["pages"]
  assert all(f >= pages for f in default["faults"]), default    # mapped afresh each time
  # 2-MiB pages: 128 faults per round where the kernel grants them all; fewer than a tenth
  # of the 4-KiB count even where some fall back to small pages.
  assert all(f < pages // 10 for f in huge["faults"]), huge


def test_unknown_mode_is_refused():
  with pytest.raises(ValueError, match=host_memory.ENV):
    host_memory.wanted({host_memory.ENV: "tcmalloc"})
  p = subprocess.run([sys.executable, "-c", _REEXEC], env=_env(**{host_memory.ENV: "x"}),
                     capture_output=True, text=True, timeout=120, check=False)
  assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
  assert p.stderr.strip().splitlines()[-1].startswith(f"{host_memory.ENV}='x'"), p.stderr


@needs_huge_pages
def test_huge_pages_stopped_returns_to_small_pages_then_restores():
  """Under the tunable, inside huge_pages_stopped() a large block faults in 4-KiB pages
  again; on exit the process's previous setting is back."""
  inside = ("from allmrec_jax import host_memory\n"
            "with host_memory.huge_pages_stopped() as s:\n  assert s\n"
            + "".join(f"  {line}\n" for line in _PROBE.splitlines()))
  after = json.loads(_run(inside, _env(GLIBC_TUNABLES=f"{host_memory.TUNABLE}=1")))
  assert all(f >= after["pages"] for f in after["faults"]), after
  restored = ("import ctypes\nfrom allmrec_jax import host_memory\nlibc = ctypes.CDLL(None)\n"
              "with host_memory.huge_pages_stopped():\n  print(libc.prctl(42, 0, 0, 0, 0))\n"
              "print(libc.prctl(42, 0, 0, 0, 0))\n")
  assert _run(restored, _env()).split() == ["1", "0"]
  off = ("from allmrec_jax import host_memory\n"
         "with host_memory.huge_pages_stopped() as s:\n  print(s)\n")
  assert _run(off, _env(**{host_memory.ENV: "default"})).strip() == "False"
