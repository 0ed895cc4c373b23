"""Stage 1's alignment metrics: how well the joint embeddings of the CF items and of their
texts find each other (text->item recall, warm / cold items, the rec loss on held-out users)."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from allmrec_jax import common_types as ct
from allmrec_jax import metrics as metrics_lib
from allmrec_jax.data import dataset as dataset_lib
from allmrec_jax.data import scenarios

Array = ct.Array
PyTree = ct.PyTree

def cold_items(dataset: dataset_lib.RecDataset, fraction: float = 0.35) -> np.ndarray:
  """bool[N+1]: the cold items of `scenarios.cold_warm_items` (bottom `fraction` by count)."""
  cold, _ = scenarios.cold_warm_items(dataset, fraction)
  out = np.zeros(dataset.num_items + 1, bool)
  out[cold] = True
  return out


def text_to_item_recall(q: Array, e: Array, ks=(1, 10), batch_size: int = 512
                        ) -> dict[str, float]:
  """For every item i >= 1, ranks all joint embeddings e_j (j >= 1) by squared distance to
  q_i; recall@k = share of items whose own e_i is among the k nearest (ties pessimistic).

  q, e: float[N+1, latent] (row 0 = padding, ignored).
  """
  q = jnp.asarray(q)[1:]
  e = jnp.asarray(e)[1:]
  n = q.shape[0]

  @jax.jit
  def ranks_of(qb, idx):
    d = (jnp.sum(qb * qb, -1)[:, None] - 2 * qb @ e.T + jnp.sum(e * e, -1)[None, :])
    return metrics_lib.rank_of_item(-d, idx)

  ranks = []
  for s in range(0, n, batch_size):
    idx = jnp.arange(s, min(s + batch_size, n), dtype=jnp.int32)
    ranks.append(np.asarray(ranks_of(q[s:s + batch_size], idx)))
  r = np.concatenate(ranks)
  out = {f"align/text2item_recall@{k}": float(np.mean(r < k)) for k in ks}
  out["align/text2item_mean_rank"] = float(np.mean(r))
  out["align/random_recall@10"] = float(min(1.0, 10 / max(n, 1)))
  return out


def evaluate_alignment(item_ae, params: PyTree, *, dataset, cf_model, cf_variables,
                       e: Array, q: Array, maxlen: int, cold_fraction: float,
                       batch_size: int) -> dict[str, float]:
  """Alignment metrics: text->item retrieval and the cold-item scoring path.

  e = f_I^enc(E) and q = f_T^enc(SBERT(text)) float[N+1, K] are the joint embeddings of
  every item from its CF row and from its text (`stage1.joint_item_embeddings`); item_ae
  and params["item_ae"] give f_I^dec. cold/hit@1_text: test users whose target is a cold
  item; their 20 stored candidates scored with s(x_u, f_I^dec(q_i)); cold/hit@1_cf: the
  same with e_i; cold/hit@1_cf_model: the CF model's own scores. Same for warm users
  (target in the top fraction, `scenarios.cold_warm_users`) under warm/, and all/.
  """
  cf_params = cf_variables
  out = text_to_item_recall(q, e)

  users = dataset.eval_users("test")
  if users.size:
    hist = dataset.history_matrix("test", maxlen)[users]
    cands = dataset.candidates("test")[users]
    groups = scenarios.cold_warm_users(dataset, "test", cold_fraction)
    cold = np.isin(users, groups["cold"])
    warm = np.isin(users, groups["warm"])
    dec = {
        "text": item_ae.apply({"params": params["item_ae"]}, q, method=item_ae.decode),
        "cf": item_ae.apply({"params": params["item_ae"]}, e, method=item_ae.decode),
    }

    @jax.jit
    def scores(h, c):
      x = cf_model.apply(cf_params, h, method=cf_model.user_representation)
      res = {k: jnp.mean(x[:, None, :] * v[c], axis=-1) for k, v in dec.items()}
      res["cf_model"] = cf_model.apply(cf_params, h, c, method=cf_model.score)
      return {k: metrics_lib.rank_of_target(v) for k, v in res.items()}

    bs = batch_size
    ranks: dict[str, list[np.ndarray]] = {}
    for s in range(0, users.size, bs):
      h, c = hist[s:s + bs], cands[s:s + bs]
      m = h.shape[0]
      if m < bs:  # one compiled shape
        h = np.concatenate([h, np.repeat(h[-1:], bs - m, 0)])
        c = np.concatenate([c, np.repeat(c[-1:], bs - m, 0)])
      for k, v in scores(h, c).items():
        ranks.setdefault(k, []).append(np.asarray(v)[:m])
    for k, v in ranks.items():
      r = np.concatenate(v)
      for group, sel in (("cold", cold), ("warm", warm), ("all", np.ones_like(cold))):
        key = f"{group}/hit@1_{k}"
        out[key] = float(np.mean(r[sel] == 0)) if sel.any() else float("nan")
    out["cold/num_users"] = int(cold.sum())
    out["warm/num_users"] = int(warm.sum())
  return out

