"""grain input pipelines of CF and stage-1 training, and the sampling streams shared with
stage 2 (whose examples and candidate sets `trainers/stage2.py` builds on the same hashes).

Each training pipeline is a `grain.MapDataset` over global step indices
(`num_epochs * steps_per_epoch` of them); element `g` is one whole batch (a dict of int32
numpy arrays) built with vectorised numpy, which keeps the pipeline far faster than any
train step. Step `g` belongs to epoch `g // steps_per_epoch`:
- the epoch's user order is a permutation from Philox(SeedSequence([seed, stream,
  epoch]));
- every sampled negative is a counter-based hash of (stream, seed, epoch, user, slot,
  attempt), so it does not depend on the batch, the host count, or where a run resumed.
Iterate with `make_iterator(dataset)`; its `get_state()` (a small JSON-able dict) goes into
the checkpoint and `set_state(state)` resumes mid-epoch with identical batches.

Multi-host: process p of P gets rows [p*B/P, (p+1)*B/P) of every global batch of B users.
`drop_remainder=False` pads the last batch of an epoch to full size by repeating users
(`mask` = 0 on the padding rows) so that shapes stay static.
"""

from __future__ import annotations

import dataclasses
import functools

import grain
import numpy as np

from allmrec_jax.data import dataset as dataset_lib
from allmrec_jax.data import sampling

# Sampling streams (independent hash domains per pipeline).
STREAM_CF = 1
STREAM_STAGE1 = 2
STREAM_STAGE2 = 3
STREAM_STAGE2_SHUFFLE = 4
STREAM_EVAL_SHUFFLE = 5


def _process_info(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return int(process_index), int(process_count)


@dataclasses.dataclass(frozen=True, eq=False)
class BatchPlan:
  """Which users make up global step g: shuffled per epoch, sliced per host."""
  users: np.ndarray          # int64[M] eligible users
  batch_size: int            # global batch size B
  seed: int
  stream: int
  drop_remainder: bool
  process_index: int
  process_count: int

  def __post_init__(self):
    if self.batch_size % self.process_count:
      raise ValueError(f"batch_size={self.batch_size} is not divisible by "
                       f"process_count={self.process_count}")
    if self.users.size == 0:
      raise ValueError("no eligible user for this pipeline (every user has < 2 training "
                       "items?)")

  @property
  def steps_per_epoch(self) -> int:
    m, b = self.users.size, self.batch_size
    return m // b if self.drop_remainder else -(-m // b)

  @property
  def local_batch_size(self) -> int:
    return self.batch_size // self.process_count

  @functools.lru_cache(maxsize=4)  # noqa: B019  (a few epochs of one long-lived sampler)
  def permutation(self, epoch: int) -> np.ndarray:
    rng = np.random.Generator(np.random.Philox(
        np.random.SeedSequence([self.seed, self.stream, epoch])))
    return self.users[rng.permutation(self.users.size)]

  def rows(self, step: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(epoch, int64[b] users of this host's rows, float32[b] mask) of global step."""
    spe = self.steps_per_epoch
    if spe == 0:
      raise ValueError(f"{self.users.size} users < batch_size {self.batch_size} with "
                       "drop_remainder=True: an epoch has no batch")
    epoch, s = divmod(int(step), spe)
    perm = self.permutation(epoch)
    lo = s * self.batch_size + self.process_index * self.local_batch_size
    idx = lo + np.arange(self.local_batch_size)
    mask = (idx < perm.size).astype(np.float32)
    return epoch, perm[idx % perm.size], mask


def _train_users(ds: dataset_lib.RecDataset, users, min_train: int = 2) -> np.ndarray:
  starts, ends = ds.train_bounds()
  ok = (ends - starts) >= min_train
  if users is not None:
    sel = np.zeros(ds.num_users, bool)
    sel[np.asarray(users, np.int64)] = True
    ok &= sel
  return np.nonzero(ok)[0].astype(np.int64)


@functools.lru_cache(maxsize=8)
def train_exclusion_index(ds: dataset_lib.RecDataset) -> sampling.ExclusionIndex:
  """The (user, training item) pairs a training negative may not be (cached per dataset)."""
  starts, ends = ds.train_bounds()
  return sampling.ExclusionIndex.from_ranges(starts, ends, ds.seq_items, ds.num_items)


def _read_options(prefetch: int) -> grain.ReadOptions:
  if prefetch <= 0:
    return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  return grain.ReadOptions(num_threads=1, prefetch_buffer_size=int(prefetch))


def make_iterator(dataset: grain.MapDataset, prefetch: int = 16):
  """A grain `DatasetIterator` over `dataset` (has get_state / set_state)."""
  return iter(dataset.to_iter_dataset(_read_options(prefetch)))


def _plan(ds, users, batch_size, seed, stream, drop_remainder, process_index,
          process_count) -> BatchPlan:
  pi, pc = _process_info(process_index, process_count)
  return BatchPlan(_train_users(ds, users), int(batch_size), int(seed), stream,
                   bool(drop_remainder), pi, pc)


# ---------------------------------------------------------------------- CF training
def cf_batch(ds: dataset_lib.RecDataset, users: np.ndarray, *, maxlen: int, seed: int,
             epoch: int, index: sampling.ExclusionIndex | None = None
             ) -> dict[str, np.ndarray]:
  """SASRec training arrays for `users` (int[b]).

  Returns:
    seq: int32[b, maxlen] last `maxlen` items of train[:-1], left-padded.
    pos: int32[b, maxlen] the next item at each position (train[1:]), 0 where seq is 0.
    neg: int32[b, maxlen] one negative per non-pad position, not in the user's training
      items; 0 where pos is 0.
    user: int32[b].
  """
  index = index or train_exclusion_index(ds)
  starts, ends = ds.train_bounds()
  users = np.asarray(users, np.int64)
  full = dataset_lib.left_pad(starts[users], ends[users], ds.seq_items, maxlen + 1)
  seq, pos = full[:, :-1], full[:, 1:]
  pos = np.where(seq > 0, pos, 0)
  neg = sampling.sample_excluding(
      users, maxlen, index,
      sampling.hashed_draw(ds.num_items, seed, epoch, users, STREAM_CF),
      distinct=False, mask=pos > 0, fallback_seed=seed)
  return {"seq": seq.astype(np.int32), "pos": pos.astype(np.int32), "neg": neg,
          "user": users.astype(np.int32)}


def cf_train_dataset(ds: dataset_lib.RecDataset, *, batch_size: int, maxlen: int,
                     seed: int, num_epochs: int = 1, drop_remainder: bool = True,
                     users=None, process_index=None, process_count=None
                     ) -> grain.MapDataset:
  """grain MapDataset of CF training batches (`cf_batch` + `mask` float32[b]).

  Users with >= 2 training items (SASRec's sampler rule), optionally only `users`.
  Length: num_epochs * steps_per_epoch(...).
  """
  plan = _plan(ds, users, batch_size, seed, STREAM_CF, drop_remainder, process_index,
               process_count)
  index = train_exclusion_index(ds)

  def make(step):
    epoch, u, mask = plan.rows(step)
    out = cf_batch(ds, u, maxlen=maxlen, seed=seed, epoch=epoch, index=index)
    out["mask"] = mask
    return out
  return grain.MapDataset.range(num_epochs * plan.steps_per_epoch).map(make)


def steps_per_epoch(ds: dataset_lib.RecDataset, batch_size: int, *,
                    drop_remainder: bool = True, users=None) -> int:
  """Global steps in one epoch of the training pipelines (users with >= 2 train items)."""
  m = _train_users(ds, users).size
  return m // batch_size if drop_remainder else -(-m // batch_size)


# ---------------------------------------------------------------------- stage 1
def stage1_batch(ds, users, *, maxlen, seed, epoch, index=None) -> dict[str, np.ndarray]:
  """Stage-1 arrays for `users` (int[b]).

  Returns:
    seq: int32[b, maxlen] train[:-1] left-padded (x_u is the state at its last position).
    pos: int32[b] the last training item.
    neg: int32[b] one negative not in the user's training items.
    user: int32[b].
  """
  index = index or train_exclusion_index(ds)
  starts, ends = ds.train_bounds()
  users = np.asarray(users, np.int64)
  seq = dataset_lib.left_pad(starts[users], ends[users] - 1, ds.seq_items, maxlen)
  pos = ds.seq_items[ends[users] - 1]
  neg = sampling.sample_excluding(
      users, 1, index, sampling.hashed_draw(ds.num_items, seed, epoch, users,
                                            STREAM_STAGE1),
      distinct=False, fallback_seed=seed)[:, 0]
  return {"seq": seq, "pos": pos.astype(np.int32), "neg": neg,
          "user": users.astype(np.int32)}


def stage1_dataset(ds: dataset_lib.RecDataset, *, batch_size: int, maxlen: int,
                   seed: int, num_epochs: int = 1, drop_remainder: bool = True,
                   users=None, process_index=None, process_count=None
                   ) -> grain.MapDataset:
  """grain MapDataset of stage-1 batches (`stage1_batch` + `mask` float32[b])."""
  plan = _plan(ds, users, batch_size, seed, STREAM_STAGE1, drop_remainder,
               process_index, process_count)
  index = train_exclusion_index(ds)

  def make(step):
    epoch, u, mask = plan.rows(step)
    out = stage1_batch(ds, u, maxlen=maxlen, seed=seed, epoch=epoch, index=index)
    out["mask"] = mask
    return out
  return grain.MapDataset.range(num_epochs * plan.steps_per_epoch).map(make)


# ---------------------------------------------------------------------- stage 2
def shuffle_candidates(cands: np.ndarray, row_ids: np.ndarray, *, seed: int, epoch: int,
                       stream: int) -> tuple[np.ndarray, np.ndarray]:
  """Shuffles each row of int32[b, C] (column 0 = target) by hashed keys.

  Returns (int32[b, C] shuffled candidates, int32[b] column of the target).
  """
  c = cands.shape[1]
  keys = sampling.hash_u64(stream, seed, epoch, np.asarray(row_ids)[:, None],
                           np.arange(c)[None, :])
  order = np.argsort(keys, axis=1)
  shuffled = np.take_along_axis(cands, order, axis=1).astype(np.int32)
  target_col = np.argmax(order == 0, axis=1).astype(np.int32)
  return shuffled, target_col
