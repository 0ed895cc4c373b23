"""launch/prepare_data.py end to end on small generated Amazon files."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from data_testutil import write_amazon  # pylint: disable=g-bad-import-order

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, str(ROOT / "launch" / "prepare_data.py"), *args],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
                        check=False)


def test_prepare_data_prints_statistics(tmp_path):
  raw_dir = tmp_path / "raw"
  raw_dir.mkdir()
  write_amazon(raw_dir, "amazon2023")
  out = tmp_path / "processed"
  p = _run(f"--dataset=amazon2023:{raw_dir}:Toys", "--min_count=2", f"--data_dir={out}")
  assert p.returncode == 0, p.stderr
  text = p.stdout
  assert "users:          3\n" in text and "items:          3\n" in text
  assert "interactions:   6\n" in text and "avg seq length: 2.00" in text
  assert ("skipped lines:  duplicate=1, malformed_line=1, malformed_number=1, "
          "meta_malformed_line=2, missing_field=1, non_utf8=1, unknown_item=1") in text
  folders = list(out.iterdir())
  assert len(folders) == 1 and folders[0].name.startswith("amazon2023-Toys-")
  assert f"written to:     {folders[0]}" in text
  assert (folders[0] / "manifest.json").is_file()


def test_prepare_data_errors_are_one_line(tmp_path):
  p = _run(f"--dataset=amazon2018:{tmp_path}:Beauty", f"--data_dir={tmp_path}")
  assert p.returncode == 1
  assert p.stderr.strip().splitlines() == [
      f"error: {tmp_path}/Beauty.json.gz: file not found (expected amazon2018 reviews "
      "(JSON lines))"]
  raw_dir = tmp_path / "raw"
  raw_dir.mkdir()
  write_amazon(raw_dir, "amazon2018")
  p = _run(f"--dataset=amazon2018:{raw_dir}:Toys", "--strict", f"--data_dir={tmp_path}")
  assert p.returncode == 1
  assert p.stderr.strip() == (f"error: {raw_dir}/meta_Toys.json.gz:4: meta_malformed_line")
