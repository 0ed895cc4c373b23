"""One writer per run folder (allmrec_jax/run_lock.py): two real processes contend for a
folder, a lock left by a killed process is taken over, and a second launch of the real
launcher on a held folder is refused with one line."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest

from allmrec_jax import run_lock
from allmrec_jax import testing

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A process that takes the lock, says so on stdout, and holds it until its stdin closes.
_HOLDER = """
import sys
from allmrec_jax import run_lock
try:
  lock = run_lock.acquire(sys.argv[1], command="holder")
except run_lock.RunLockHeld as e:
  print("HELD", e, flush=True)
  sys.exit(3)
print("ACQUIRED", flush=True)
sys.stdin.read()
lock.release()
print("RELEASED", flush=True)
"""


def _holder(workdir):
  p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir)], cwd=ROOT,
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
  return p, p.stdout.readline().strip()


def test_two_processes_contend(tmp_path):
  work = tmp_path / "run"
  a, first = _holder(work)
  try:
    assert first == "ACQUIRED"
    info = json.loads((work / run_lock.LOCK_NAME).read_text())
    assert info["pid"] == a.pid and info["host"] == socket.gethostname()
    assert info["command"] == "holder" and info["started"]
    b, second = _holder(work)
    assert b.wait(timeout=60) == 3
    assert second.startswith("HELD") and f"pid {a.pid}" in second
    with pytest.raises(run_lock.RunLockHeld, match=f"pid {a.pid} on "):
      run_lock.acquire(work)
    a.stdin.close()
    assert a.stdout.readline().strip() == "RELEASED" and a.wait(timeout=60) == 0
  finally:
    if a.poll() is None:
      a.kill()
  assert not (work / run_lock.LOCK_NAME).exists()      # released on exit
  c, third = _holder(work)                             # free again
  c.stdin.close()
  assert third == "ACQUIRED" and c.wait(timeout=60) == 0


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path, caplog):
  work = tmp_path / "run"
  a, first = _holder(work)
  assert first == "ACQUIRED"
  os.kill(a.pid, signal.SIGKILL)
  a.wait(timeout=60)
  assert json.loads((work / run_lock.LOCK_NAME).read_text())["pid"] == a.pid   # left behind
  with caplog.at_level("WARNING"), run_lock.acquire(work) as lock:
    assert lock.info["pid"] == os.getpid()
    assert run_lock.read_holder(work)["pid"] == os.getpid()
  assert f"stale lock of pid {a.pid}" in caplog.text
  assert run_lock.read_holder(work) is None


def test_live_or_foreign_holder_without_flock_refuses(tmp_path):
  """A lock file naming a live process (here this test's own parent) or another host is
  respected even when no flock is held on it (e.g. a filesystem without flock)."""
  work = tmp_path / "run"
  work.mkdir()
  path = work / run_lock.LOCK_NAME
  path.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                              "started": "then"}))
  with pytest.raises(run_lock.RunLockHeld, match=f"pid {os.getppid()} on "):
    run_lock.acquire(work)
  path.write_text(json.dumps({"pid": 1, "host": "elsewhere-host", "started": "then"}))
  with pytest.raises(run_lock.RunLockHeld, match="another host; if that run is gone, remove"):
    run_lock.acquire(work)
  assert run_lock.read_holder(work)["host"] == "elsewhere-host"   # untouched


def test_second_launch_is_one_line(tmp_path):
  """launch/train.py on a folder this test holds: one line naming the holder, status 1,
  no traceback; nothing of the folder is touched."""
  work = tmp_path / "run"
  with run_lock.acquire(work, command="the first run"):
    r = subprocess.run(
        [sys.executable, "launch/train.py", "--config=configs/ml100k.py",
         f"--workdir={work}"], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=testing.one_device_env())
    assert r.returncode == 1, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("allmrec-train: ") and f"pid {os.getpid()} on " in lines[0]
    assert "the first run" in lines[0] and "Traceback" not in r.stderr
    assert sorted(p.name for p in work.iterdir()) == [run_lock.LOCK_NAME]
  assert not work.joinpath(run_lock.LOCK_NAME).exists()
