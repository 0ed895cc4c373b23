"""benchmarks/torch_peer.py, the PyTorch peer of the speed benchmarks, run as the benchmarks
run it (a subprocess through bench_common.run_peer): each sub-command prints one JSON line
with positive speeds, the timed steps and the machine load."""

import importlib.util
import os
import sys

import pytest

from allmrec_jax import assets

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import bench_common  # benchmarks/ is not a package: imported from its folder

SMALL = ["--warmup", "0", "--iters", "1", "--threads", "1"]


def _check_steps(res: dict):
  assert "error" not in res, res
  assert "torch_peer.py" in res["cmd"]
  steps = res["step_s"]
  assert set(steps) >= {"median", "min", "max", "mean", "values"}
  assert len(steps["values"]) == 1 and steps["median"] > 0
  assert steps["min"] <= steps["median"] <= steps["max"]
  assert "machine_load" in res


def _llm_args(command: str) -> list[str]:
  missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
  if missing:
    pytest.skip(f"the GGUF peer needs {missing} (pip install -e '.[bench]')")
  gguf = str(assets.get_asset("smollm2-135m"))
  return [command, "--llm", "smollm2", "--llm-dir", os.path.dirname(gguf),
          "--llm-gguf", os.path.basename(gguf), "--data-dir",
          str(assets.get_asset("ml-100k")), "--batch-size", "1"] + SMALL


def test_stage1_small():
  res = bench_common.run_peer(
      ["stage1", "--batch-size", "4", "--data-dir", str(assets.get_asset("ml-100k")),
       "--sbert-path", str(assets.get_asset("all-minilm-l6-v2"))] + SMALL)
  _check_steps(res)
  assert res["users_per_s"] > 0 and res["item_texts_per_s"] == pytest.approx(
      2 * res["users_per_s"])
  assert res["batch_size"] == 4 and res["threads"] == 1
  assert res["text_dim"] == 384 and res["text_tokens_max"] > 2


def test_error_contract():
  res = bench_common.run_peer(["stage1"])   # required flags missing: argparse exits 2
  assert set(res) == {"error", "cmd"} and "exited 2" in res["error"]


@pytest.mark.slow
def test_stage2_small():
  res = bench_common.run_peer(_llm_args("stage2"))
  _check_steps(res)
  assert res["nonpad_tokens_per_s"] > 0
  assert 0 < res["nonpad_tokens_per_step"] <= res["padded_tokens_per_step"]


@pytest.mark.slow
def test_generate_small():
  res = bench_common.run_peer(_llm_args("generate") + ["--ignore-eos",
                                                       "--max-new-tokens", "2"])
  _check_steps(res)
  assert res["users_per_s"] > 0 and res["s_per_user_median"] > 0
  assert res["new_tokens"] == [2]
