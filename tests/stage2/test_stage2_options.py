"""Stage-2 training options (trainers/stage2_options.py): the defaults are the paper's
optimizer bit for bit; bad values are one-line errors naming the field; the warmup_cosine
schedule's values; gradient accumulation equals one step on the concatenated batch; the
curriculum's draws; the two-step order's frozen halves; history dropout's rows; and a run with the curriculum,
accumulation and the schedule killed in the middle of an accumulation resumes exactly."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from allmrec_jax import config_lib
from allmrec_jax.models import lora as lora_lib
from allmrec_jax.models import projectors as projectors_lib
from allmrec_jax.models.llm import LlamaConfig, LlamaDecoder
from allmrec_jax.trainers import stage2
from allmrec_jax.trainers import stage2_options as options_lib
from configs import base

V, E, D, K, N = 96, 32, 8, 16, 40


def stage2_cfg(**overrides):
  c = base.get_base_config()
  c.stage2.update(overrides)
  return config_lib.Stage2Config.from_config(c)


def tiny(lora_targets=()):
  cfg = LlamaConfig(vocab_size=V, hidden_size=E, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, lora_rank=2,
                    lora_targets=lora_targets)
  llm = LlamaDecoder(cfg)
  llm_params = nn.unbox(llm.init(jax.random.PRNGKey(1), input_ids=jnp.zeros((1, 4), jnp.int32)))
  proj = projectors_lib.Stage2Projectors(K, D, E)
  pp = stage2.init_projectors(proj, jax.random.PRNGKey(2), K, D)
  table = np.random.default_rng(0).normal(size=(N, K)).astype(np.float32)
  return llm, llm_params, proj, pp, table


def make_batch(rng, b=4, length=20, slots=4, tt=3):
  """A prompt batch whose every row has `tt` target tokens (equal token counts)."""
  ids = rng.integers(1, V, (b, length)).astype(np.int32)
  n_real = rng.integers(length - 4, length + 1, b)
  mask = (np.arange(length)[None] < n_real[:, None]).astype(np.int32)
  item_pos = np.stack([rng.choice(np.arange(1, length - 6), slots, replace=False)
                       for _ in range(b)]).astype(np.int32)
  tpos = (n_real[:, None] - tt - 1 + np.arange(tt)[None]).astype(np.int32)
  return {"input_ids": ids, "attention_mask": mask, "user_pos": np.zeros(b, np.int32),
          "item_pos": item_pos, "item_ids": rng.integers(1, N, (b, slots)).astype(np.int32),
          "target_pos": tpos, "target_ids": np.take_along_axis(ids, tpos + 1, 1),
          "target_mask": np.ones((b, tt), np.float32), "prompt_len": tpos[:, 0] + 1,
          "user_rep": rng.normal(size=(b, D)).astype(np.float32)}


def concat(*batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def assert_tree(fn, a, b):
  jax.tree.map(lambda x, y: fn(np.asarray(x), np.asarray(y)), a, b)


# ---------------------------------------------------------------------------- config
def test_defaults_are_the_papers_adam():
  cfg = stage2_cfg()
  options_lib.validate_options(cfg)
  plan = options_lib.StepPlan.from_config(cfg, total=7, seed=0, soft=True)
  assert not plan.staged and plan.mode(3) is None
  params = {"w": jnp.linspace(-1.0, 1.0, 6)}
  grads = {"w": jnp.cos(jnp.arange(6.0))}
  ours, paper = options_lib.make_optimizers(cfg, plan), optax.adam(1e-4, b1=0.9, b2=0.98)
  s1, s2 = ours.init(params), paper.init(params)
  assert jax.tree.structure(s1) == jax.tree.structure(s2)
  for _ in range(3):
    (u1, s1), (u2, s2) = ours.update(grads, s1, params), paper.update(grads, s2, params)
    assert_tree(np.testing.assert_array_equal, u1, u2)


@pytest.mark.parametrize("field,value", [
    ("schedule", "cosine"), ("warmup_frac", 1.0), ("grad_accum", 0),
    ("curriculum", "exp"), ("curriculum_frac", 0.0), ("two_step_steps", -1),
    ("two_step_steps", 3), ("history_drop", 1.0), ("history_drop", -0.1),
    ("history_drop_unit", "user")])
def test_bad_values_are_one_line_errors_naming_the_field(field, value):
  overrides = {field: value, "train_lora": True}
  if field == "two_step_steps" and value > 0:
    overrides["grad_accum"] = 2                  # 3 is not a multiple of it
  with pytest.raises(ValueError, match=rf"--config\.stage2\.{field}=") as e:
    options_lib.validate_options(stage2_cfg(**overrides))
  assert "\n" not in str(e.value)


def test_staged_orders_need_lora_and_exclude_each_other():
  with pytest.raises(ValueError, match="train_lora"):
    options_lib.validate_options(stage2_cfg(curriculum="linear"))
  with pytest.raises(ValueError, match="train_lora"):
    options_lib.validate_options(stage2_cfg(two_step_steps=4))
  with pytest.raises(ValueError, match="choose one"):
    options_lib.validate_options(stage2_cfg(curriculum="linear", two_step_steps=4,
                                            train_lora=True))
  options_lib.validate_options(stage2_cfg(two_step_steps=4, grad_accum=2, train_lora=True))


# ---------------------------------------------------------------------------- schedule
def test_warmup_cosine_schedule_values():
  """warmup_frac 0.1 of 100 updates: 0 at count 0, linear to lr at count 10, cosine to 0
  at count 100; with grad_accum 4 the schedule runs over 400 // 4 updates."""
  cfg = stage2_cfg(schedule="warmup_cosine", warmup_frac=0.1, lr=1e-3)
  lr = options_lib.learning_rate(cfg, 100)
  want = {0: 0.0, 5: 5e-4, 10: 1e-3, 55: 5e-4,
          80: 0.5e-3 * (1 + np.cos(np.pi * 70 / 90)), 100: 0.0}
  for count, value in want.items():
    np.testing.assert_allclose(float(lr(count)), value, rtol=1e-5, atol=1e-10)
  # The optimizer follows it: Adam's first steps on a constant gradient move by lr(count).
  tx = options_lib.make_optimizer(stage2_cfg(schedule="warmup_cosine", warmup_frac=0.1,
                                             lr=1e-3, grad_accum=4), 400)
  params = {"w": jnp.zeros(3)}
  state, moves = tx.init(params), []
  for _ in range(4 * 12):
    u, state = tx.update({"w": jnp.ones(3)}, state, params)
    moves.append(-float(u["w"][0]))
  applied = np.asarray(moves[3::4])                    # every 4th micro-batch updates
  np.testing.assert_array_equal(np.asarray(moves)[np.arange(48) % 4 != 3], 0.0)
  np.testing.assert_allclose(applied, [float(lr(c)) for c in range(12)], rtol=1e-4,
                             atol=1e-9)
  with pytest.raises(ValueError, match="schedule"):
    options_lib.make_optimizer(cfg)                    # no step count


# ---------------------------------------------------------------------------- accumulation
def test_grad_accum_equals_one_step_on_the_concatenated_batch():
  """k = 2 micro-batches with equal target-token counts: the parameters stay exactly put
  after the first and, after the second, equal one Adam step on the two concatenated
  (mean gradient: the token mean over both), over two updates; float32 tolerance
  atol 2e-6 on weights of scale 0.1 moved by lr 1e-2."""
  llm, llm_params, proj, pp, table = tiny()
  rng = np.random.default_rng(1)
  b = [make_batch(rng) for _ in range(4)]
  kw = dict(llm=llm, llm_params=llm_params, projectors=proj, item_table=table)
  accum = stage2.Stage2Trainer(optimizer=stage2.make_optimizer(
      stage2_cfg(lr=1e-2, grad_accum=2)), **kw)
  whole = stage2.Stage2Trainer(optimizer=stage2.make_optimizer(stage2_cfg(lr=1e-2)), **kw)
  sa, sw = accum.init_state(pp), whole.init_state(pp)
  for first, second in ((b[0], b[1]), (b[2], b[3])):
    before = jax.device_get(sa["params"])
    sa, _ = accum.step(sa, first)
    assert_tree(np.testing.assert_array_equal, sa["params"], before)
    sa, _ = accum.step(sa, second)
    sw, _ = whole.step(sw, concat(first, second))
    assert_tree(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=2e-6),
                sa["params"], sw["params"])
  moved = jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()),
                       sa["params"], pp)
  assert min(jax.tree.leaves(moved)) > 1e-3


# ---------------------------------------------------------------------------- curriculum
def test_curriculum_draws():
  """p = min(1, i / (curriculum_frac x total)): the share of hybrid steps follows it, every
  step after curriculum_frac x total is hybrid, and the draws are a function of (seed,
  step) only."""
  plan = options_lib.StepPlan(total=4000, seed=0, curriculum="linear", curriculum_frac=0.5)
  h = plan.hybrid(np.arange(4000))
  for lo in range(0, 2000, 400):
    p = (np.arange(lo, lo + 400) / 2000).mean()
    assert abs(h[lo:lo + 400].mean() - p) < 0.08, (lo, h[lo:lo + 400].mean(), p)
  assert h[2000:].all() and not h[0]
  np.testing.assert_array_equal([bool(plan.hybrid(i)) for i in range(0, 4000, 37)],
                                h[::37])
  other = options_lib.StepPlan(total=4000, seed=1, curriculum="linear", curriculum_frac=0.5)
  assert (other.hybrid(np.arange(2000)) != h[:2000]).any()
  assert plan.group_steps() == {"params": int(h.sum()), "lora": 4000}
  step = int(np.argmin(h))
  assert plan.mode(step) == options_lib.StepMode(False, ("lora",))
  assert plan.mode(3999) == options_lib.StepMode(True, ("params", "lora"))
  text_only = options_lib.StepPlan(total=10, soft=False, curriculum="linear")
  assert not text_only.staged and text_only.mode(5) is None     # TALLRec: one mode


# ---------------------------------------------------------------------------- history_drop
def test_drop_history_draws():
  """Each row keeps its whole history or loses all of it, with probability p, as a function
  of (seed, epoch, example id) only; p = 0 returns the rows unchanged."""
  hist = np.arange(1, 4001 * 5 + 1).reshape(4001, 5)
  ids = np.arange(4001)
  assert options_lib.drop_history(hist, 0.0, 0, 0, ids) is hist
  out = options_lib.drop_history(hist, 0.3, 0, 0, ids)
  gone = (out == 0).all(1)
  assert ((out == hist).all(1) | gone).all()
  assert abs(gone.mean() - 0.3) < 0.03
  np.testing.assert_array_equal(options_lib.drop_history(hist[::7], 0.3, 0, 0, ids[::7]),
                                out[::7])
  assert (options_lib.drop_history(hist, 0.3, 0, 1, ids) != out).any()
  assert (options_lib.drop_history(hist, 0.3, 1, 0, ids) != out).any()


def test_drop_history_per_batch():
  """history_drop_unit="batch": every row of a batch keeps or loses its history together,
  a function of (seed, epoch, batch index); over many batches a fraction p is dropped."""
  hist = np.arange(1, 4 * 5 + 1).reshape(4, 5)
  ids = np.arange(4)
  draws = []
  for j in range(2000):
    out = options_lib.drop_history(hist, 0.5, 0, 0, ids + 4 * j, batch_index=j)
    gone = (out == 0).all(1)
    assert gone.all() or (out == hist).all(), out
    np.testing.assert_array_equal(
        options_lib.drop_history(hist, 0.5, 0, 0, ids, batch_index=j), out)
    draws.append(gone.all())
  assert abs(np.mean(draws) - 0.5) < 0.04
  other = [(options_lib.drop_history(hist, 0.5, 0, 1, ids, batch_index=j) == 0).all()
           for j in range(200)]
  assert other != draws[:200]


# ---------------------------------------------------------------------------- two-step
def test_two_step_order_freezes_each_half():
  """two_step_steps = 2 of 4: steps 0-1 move only the adapters (text-only prompts; the
  projectors and their Adam state exactly unchanged), steps 2-3 only the projectors (the
  adapters and their Adam state exactly as step 2 left them); adapters on q, v and the
  MLP's down projection."""
  llm, llm_params, proj, pp, table = tiny(("q", "v", "down"))
  cfg = stage2_cfg(lr=1e-2, two_step_steps=2, train_lora=True, schedule="warmup_cosine")
  plan = options_lib.StepPlan.from_config(cfg, total=4, seed=0, soft=True)
  assert plan.group_steps() == {"params": 2, "lora": 2}
  trainer = stage2.Stage2Trainer(llm=llm, llm_params=llm_params, projectors=proj,
                                 item_table=table,
                                 optimizer=options_lib.make_optimizers(cfg, plan))
  lora = lora_lib.init_adapters(llm, llm_params, jax.random.PRNGKey(3))
  state = trainer.init_state({**pp, "lora": lora})
  start = jax.device_get(state)
  rng = np.random.default_rng(2)
  modes = []
  for i in range(4):
    modes.append(plan.mode(i))
    state, m = trainer.step(state, make_batch(rng), plan.mode(i))
    assert np.isfinite(float(m["train/loss"]))
    if i == 1:
      half = jax.device_get(state)
  assert [m.soft for m in modes] == [False, False, True, True]
  end = jax.device_get(state)
  eq = functools.partial(assert_tree, np.testing.assert_array_equal)
  eq(half["params"]["params"], start["params"]["params"])
  eq(half["opt_state"]["params"], start["opt_state"]["params"])
  eq(end["params"]["lora"], half["params"]["lora"])
  eq(end["opt_state"]["lora"], half["opt_state"]["lora"])

  def moved(a, b):
    return [bool(np.any(np.asarray(x) != np.asarray(y))) for x, y in
            zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  assert all(moved(end["params"]["params"], half["params"]["params"]))
  b_moved = moved(half["params"]["lora"], start["params"]["lora"])
  assert any(b_moved) and half["params"]["lora"]["layers_0"]["mlp"]["down"]["b"].any()


# ---------------------------------------------------------------------------- train()
@pytest.fixture(scope="module")
def run_setup():
  import transformers  # pylint: disable=import-outside-toplevel
  from allmrec_jax import assets  # pylint: disable=import-outside-toplevel
  from allmrec_jax.data import prepare  # pylint: disable=import-outside-toplevel
  from allmrec_jax.trainers import stage2_run  # pylint: disable=import-outside-toplevel
  from configs import ml100k  # pylint: disable=import-outside-toplevel
  c = ml100k.get_config()
  c.seed = 3                     # its curriculum over 6 steps: text, hybrid x2, text, hybrid x2
  c.stage2.batch_size, c.stage2.ckpt_every, c.stage2.log_every = 2, 100, 1
  c.stage2.user_match_weight = 0.0
  c.stage2.len_bucket = 512      # one prompt length per mode
  ds = prepare.prepare_dataset(c.data)
  gguf = assets.get_asset("smollm2-135m")
  tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
  cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_layers=1,
                    num_heads=2, num_kv_heads=1, head_dim=8, tie_word_embeddings=True,
                    lora_rank=2, lora_targets=("q", "v", "gate"))
  llm = LlamaDecoder(cfg)
  llm_params = nn.unbox(llm.init(jax.random.PRNGKey(0), input_ids=jnp.zeros((1, 4), jnp.int32)))
  table = np.random.default_rng(0).uniform(size=(ds.num_items + 1, 8)).astype(np.float32)
  return dict(c=c, ds=ds, llm=llm, llm_params=llm_params, table=table,
              builder=stage2_run.prompt_builder(ds, tok, c.stage2))


def _train(s, workdir, monkeypatch, stop_after=None, **stage2_fields):
  from allmrec_jax.trainers import loop as loop_lib  # pylint: disable=import-outside-toplevel
  from allmrec_jax.trainers import variants  # pylint: disable=import-outside-toplevel
  c = s["c"].copy_and_resolve_references()
  c.stage2.update(stage2_fields)
  with monkeypatch.context() as m:
    if stop_after is not None:           # killed after that step (its checkpoint kept)
      m.setattr(loop_lib, "run", functools.partial(loop_lib.run, stop_after=stop_after))
    return stage2.train(c, workdir, s["ds"], variant=variants.VARIANTS["allmrec"],
                        llm=s["llm"], llm_params=s["llm_params"], builder=s["builder"],
                        user_rep_fn=lambda seq: (seq[:, -4:] % 7).astype(np.float32),
                        item_table=s["table"])


def test_curriculum_accumulation_schedule_resume_exactly(run_setup, tmp_path, monkeypatch):
  """6 steps of the curriculum with grad_accum 2 and warmup_cosine, killed after step 3
  (checkpoint every step): the adapters' accumulator holds one micro-batch there. The
  resumed run equals the uninterrupted one (float32 tolerance of the resume test)."""
  opts = dict(curriculum="linear", grad_accum=2, schedule="warmup_cosine", warmup_frac=0.2,
              max_steps=6, ckpt_every=1, train_lora=True)
  plan = options_lib.StepPlan(total=6, seed=3, curriculum="linear")
  assert plan.hybrid(np.arange(6)).tolist() == [False, True, True, False, True, True]
  straight = _train(run_setup, tmp_path / "a", monkeypatch, **opts)
  _train(run_setup, tmp_path / "b", monkeypatch, stop_after=3, **opts)
  resumed = _train(run_setup, tmp_path / "b", monkeypatch, **opts)
  assert_tree(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
              resumed, straight)
  lines = (tmp_path / "b" / "stage2" / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 6
  assert all(np.any(np.asarray(x) != 0) for x in
             jax.tree.leaves(straight["lora"]["layers_0"]["mlp"]["gate"]["b"]))


def test_two_step_order_through_train(run_setup, tmp_path, monkeypatch):
  """two_step_steps = 2 in a run of 4, killed after step 2: the projectors are exactly
  their initial values and the adapters moved; resumed to step 4, the adapters are exactly
  those of step 2 and the projectors moved."""
  opts = dict(two_step_steps=2, max_steps=4, ckpt_every=1, train_lora=True)
  half = _train(run_setup, tmp_path, monkeypatch, stop_after=2, **opts)
  proj = projectors_lib.Stage2Projectors(8, 4, 16)
  init = stage2.init_projectors(proj, jax.random.PRNGKey(3), 8, 4)
  assert_tree(np.testing.assert_array_equal, half["params"], init["params"])
  end = _train(run_setup, tmp_path, monkeypatch, **opts)
  assert_tree(np.testing.assert_array_equal, end["lora"], half["lora"])
  assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(half["lora"]))
  assert all(np.any(np.asarray(x) != np.asarray(y)) for x, y in
             zip(jax.tree.leaves(end["params"]), jax.tree.leaves(half["params"])))


def test_history_drop_batches(run_setup):
  """history_drop = 0.5 through iterate_batches on ML-100K: a dropped prompt has no history
  slot and no history title, the others are the paper's batch row for row."""
  from allmrec_jax.data import pipelines  # pylint: disable=import-outside-toplevel
  s = run_setup
  ds, c = s["ds"], s["c"]
  ex = stage2.training_examples(ds, maxlen=c.data.maxlen, num_history=10)
  index = pipelines.train_exclusion_index(ds)
  rep = np.zeros((len(ex.users), 4), np.float32)
  kw = dict(batch_size=4, num_candidates=20, seed=0, epoch=0)

  def batches(p):
    it = stage2.iterate_batches(ex, rep, s["builder"], ds, index, history_drop=p, **kw)
    return [b for _, (_, b) in zip(range(6), it)]

  dropped = 0
  for full, drop in zip(batches(0.0), batches(0.5)):
    width = drop["input_ids"].shape[1]
    hist_present = (drop["item_pos"][:, :10] < width).any(1)
    kept = hist_present | ((full["item_pos"][:, :10] >= full["input_ids"].shape[1]).all(1))
    dropped += int((~hist_present).sum())
    for r in np.nonzero(kept)[0]:
      n = int(full["attention_mask"][r].sum())
      np.testing.assert_array_equal(drop["input_ids"][r, :n], full["input_ids"][r, :n])
    for r in np.nonzero(~hist_present)[0]:
      assert drop["attention_mask"][r].sum() < full["attention_mask"][r].sum()
    np.testing.assert_array_equal(drop["target_item"], full["target_item"])
  assert 0 < dropped < 24
