"""Shared by every test: one persistent XLA compilation cache for the whole run.

Many tests compile the same small programs (the tiny LLM's steps, the CF and stage-1
steps), in the pytest workers and in the pipelines they start as subprocesses. The first
compilation of a program is written to a cache folder that lives as long as the run
(removed at its end); every later compilation of the same program, in any worker or
subprocess, loads the executable instead. A cached executable is the one XLA compiled, so
no result changes.

The folder is passed by environment variable (read by JAX at import, also in the
subprocesses the tests start); a `JAX_COMPILATION_CACHE_DIR` already set is used as it is
and kept (e.g. one shared by consecutive runs).

The tests' programs are tiny, so compiling them costs far more than running them: XLA:CPU
is asked for quicker code generation (`_QUICK_COMPILE`: LLVM at optimisation level 1),
added to XLA_FLAGS unless XLA_FLAGS already sets it. The HLO programs (and so every shape,
sharding and FLOP count) are the same; only the machine code differs. Measured on a 2-core
CPU: a compile-bound tables test 119 -> 99 s, the compute-bound stage-1 learning test
159 -> 195 s (level 0 without LLVM's expensive passes: 93 s and 267 s). Set
`ALLMREC_TEST_OPTIMIZED=1` to test with XLA's default code generation.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
# Every compilation is cached, however quick or small: a tiny program compiles in tens of
# milliseconds, and a test compiles hundreds of them.
_CACHE_SETTINGS = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                   "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
_QUICK_COMPILE = ("--xla_backend_optimization_level=1",)
_owned_cache_dir: str | None = None


def pytest_configure(config):
  """Names the run's cache folder before any worker or test imports JAX (xdist workers are
  started after this hook, with this environment, so they share the folder)."""
  del config
  global _owned_cache_dir
  if not os.environ.get(_CACHE_ENV):
    _owned_cache_dir = tempfile.mkdtemp(prefix="allmrec-test-xla-cache-")
    os.environ[_CACHE_ENV] = _owned_cache_dir
  for name, value in _CACHE_SETTINGS.items():
    os.environ.setdefault(name, value)
  if os.environ.get("ALLMREC_TEST_OPTIMIZED", "") in ("", "0"):
    flags = os.environ.get("XLA_FLAGS", "").split()
    given = {f.split("=")[0] for f in flags}
    flags += [f for f in _QUICK_COMPILE if f.split("=")[0] not in given]
    os.environ["XLA_FLAGS"] = " ".join(flags)
  if "jax" in sys.modules:                 # imported already (by a plugin): too late for the
    jax = sys.modules["jax"]               # environment, so the same settings directly
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                      int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))


def pytest_unconfigure(config):
  del config
  if _owned_cache_dir is not None:
    shutil.rmtree(_owned_cache_dir, ignore_errors=True)


# The tests that take minutes, with their duration in seconds in a suite run on a 2-core
# CPU (two workers). Under xdist they run first, spread over the workers (longest first,
# each to the worker with the least listed work), so that none of them starts late on an
# otherwise finished worker.
SLOW_TESTS = {
    "tests/stage2/test_tables.py::test_scenario_parts_tiny": 290,
    "tests/stage2/test_runner_e2e.py::test_all_stages_tiny": 225,
    "tests/stage2/test_llm_shapes_e2e.py": 250,
    "tests/test_kill_resume.py::test_sigterm_and_sigkill_resume_to_identical_metrics": 140,
    "tests/stage2/test_tables.py::test_model_parts_tiny": 185,
    "tests/stage2/test_gpu_arms_script.py": 165,
    "tests/stage1/test_stage1_ml100k.py::test_ml100k_stage1_frozen_sbert_standardised": 150,
    "tests/test_multiprocess.py": 210,
    "tests/stage2/test_runner_e2e.py::test_long_config_layout_tiny": 105,
    "tests/stage2/test_tables.py::test_cross_domain_amazon_pair": 100,
    "tests/stage2/test_tables.py::test_default_parts_tiny": 85,
    "tests/stage1/test_stage1_train.py::test_data_parallel_mesh_equals_one_device": 75,
    "tests/stage2/test_stage2_resume.py::test_resume_equals_uninterrupted": 50,
}
# Files whose tests share an expensive module-scoped fixture: moved as one block.
_MOVED_WHOLE = ("tests/stage2/test_gpu_arms_script.py", "tests/stage2/test_llm_shapes_e2e.py",
                 "tests/test_multiprocess.py")


def _unit_of(nodeid: str) -> str:
  path = nodeid.split("::")[0]
  return path if path in _MOVED_WHOLE else nodeid


def pytest_collection_modifyitems(config, items):
  """Under xdist (`--dist worksteal`, set in setup.cfg) the workers' queues are the
  collection cut into equal consecutive parts; the listed slow tests are put at the head
  of those parts, balanced, and the other tests fill each part in their usual order (idle
  workers then steal from the queues' tails)."""
  workerinput = getattr(config, "workerinput", None)
  if workerinput is None or int(workerinput.get("workercount", 1)) < 2:
    return
  workers = int(workerinput["workercount"])
  units: dict[str, list] = {}
  for item in items:
    units.setdefault(_unit_of(item.nodeid), []).append(item)
  slow = sorted((u for u in units if u in SLOW_TESTS), key=lambda u: -SLOW_TESTS[u])
  rest = [u for u in units if u not in SLOW_TESTS]
  heads: list[list[str]] = [[] for _ in range(workers)]
  load = [0.0] * workers
  for u in slow:
    w = load.index(min(load))
    heads[w].append(u)
    load[w] += SLOW_TESTS[u]
  order: list = []
  left = len(items)
  for w in range(workers):
    size = left // (workers - w)     # the part worksteal hands worker w at the start
    part = [item for u in heads[w] for item in units[u]]
    while rest and len(part) < size:
      part += units[rest.pop(0)]
    order += part
    left -= len(part)
  order += [item for u in rest for item in units[u]]
  items[:] = order
