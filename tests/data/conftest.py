"""Shared fixtures of the data tests (helpers live in data_testutil.py)."""

from __future__ import annotations

import pytest

from allmrec_jax.data import prepare

from data_testutil import ml_config  # pylint: disable=g-bad-import-order


@pytest.fixture(scope="session")
def ml100k(tmp_path_factory):
  """The processed MovieLens-100K (k=5, candidate_seed=2024), prepared once per session."""
  return prepare.prepare_dataset(ml_config(tmp_path_factory.mktemp("processed")))
