"""Scale: the same step on every mesh, gradient accumulation, non-finite updates skipped."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import configs
from vdit import sharding, tasks, train, train_state

# (data, fsdp, sequence, tensor) meshes over the 8 simulated devices; the first runs by default.
MESHES = [
  pytest.param((1, 2, 2, 2), id="fsdp2-seq2-tensor2"),
  pytest.param((8, 1, 1, 1), id="data8", marks=pytest.mark.slow),
  pytest.param((2, 2, 1, 2), id="data2-fsdp2-tensor2", marks=pytest.mark.slow),
  pytest.param((1, 1, 8, 1), id="seq8", marks=pytest.mark.slow),
  pytest.param((2, 1, 2, 2), id="data2-seq2-tensor2", marks=pytest.mark.slow),
]


def _mesh(shape):
  return sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))


class Stepper:
  """A config's jitted train step on one mesh, and fresh sharded states for it."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    self.rules = sharding.rules_from_config(config.sharding_rules)
    self.builder = train_state.build(config, mesh, self.rules, tasks.get(config))
    b = self.builder
    self.step_fn = train.jit_train_step(config, b.model, b.tx, mesh, self.rules, b.shardings)

  def fresh(self):
    return self.builder.create()

  def run(self, state, batches):
    """Applies one step per host-local batch; returns the final state and per-step metrics."""
    metrics = []
    with sharding.activate(self.mesh, self.rules):
      for batch in batches:
        state, m = self.step_fn(state, sharding.global_batch(batch, self.mesh, self.rules))
        metrics.append(jax.device_get(m))
    return state, metrics


def _config(data_dir, **overrides):
  # warmup 0: the first step already moves the params (at step 0 a warmup's rate is 0).
  # lr 1e-3: the tolerances of the invariance tests are for this step size.
  kw = {"optimizer.warmup_steps": 0, "optimizer.lr": 1e-3}
  return configs.small(data_dir, **{**kw, **overrides})


@pytest.fixture(scope="module")
def reference_state(data_dir):
  config = _config(data_dir)
  it = train.make_data_iterator(config)
  batches = [next(it), next(it)]
  stepper = Stepper(config, sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]))
  state, metrics = stepper.run(stepper.fresh(), batches)
  return config, batches, jax.device_get(state), metrics


def _assert_trees_close(a, b, rtol, atol):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


_STEPPERS: dict = {}


def _stepper(config, shape) -> Stepper:
  """One compiled step per mesh for the whole module (the tests below share them)."""
  if shape not in _STEPPERS:
    _STEPPERS[shape] = Stepper(config, _mesh(shape))
  return _STEPPERS[shape]


@pytest.mark.parametrize("shape", MESHES)
def test_mesh_invariance(reference_state, shape):
  """Two steps on a 4-axis mesh = two steps on one device: loss, grad norm, params, EMA, Adam."""
  config, batches, ref_state, ref_metrics = reference_state
  stepper = _stepper(config, shape)
  state, metrics = stepper.run(stepper.fresh(), batches)
  # Really sharded as asked: params are split exactly when fsdp or tensor is > 1.
  split = any(
    leaf.addressable_shards[0].data.shape != leaf.shape
    for leaf in jax.tree_util.tree_leaves(state.params)
  )
  assert split == (shape[1] > 1 or shape[3] > 1)
  for m, ref in zip(metrics, ref_metrics):
    np.testing.assert_allclose(m["loss"], ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(m["grad_norm"], ref["grad_norm"], rtol=1e-4)
  state = jax.device_get(state)
  moved = max(
    float(np.max(np.abs(a - b)))
    for a, b in zip(
      jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(stepper.fresh().params)
    )
  )
  assert moved > 1e-4  # the comparison below is not vacuous
  # Params: Adam moves an element by lr·g/(|g| + ε); where |g| is far below ε = 1e-8 (adaLN-Zero
  # kernels at their second step: g ~ 3e-10) the step follows g's fp32 rounding, which differs
  # between meshes by a few percent. Measured: 2.1e-6 (0.2% of one lr = 1e-3 step) on one of
  # 6,144 such elements. The moments below carry the gradients themselves, at rtol 1e-3.
  _assert_trees_close(state.params, ref_state.params, rtol=1e-4, atol=5e-6)
  _assert_trees_close(state.ema_params, ref_state.ema_params, rtol=1e-4, atol=5e-6)
  _assert_trees_close(state.opt_state, ref_state.opt_state, rtol=1e-3, atol=1e-7)


def test_train_step_is_adamw_then_ema(reference_state):
  """The second step of the reference run, redone by hand from its state and batch: the grad
  norm is the fp64 global norm of the loss's gradient, the params move by the optimizer's
  update, and the EMA is decay·ema + (1 − decay)·params at the warmed-up decay 2/11."""
  config, batches, _, _ = reference_state
  stepper = Stepper(config, sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]))
  before, _ = stepper.run(stepper.fresh(), batches[:1])
  host = jax.device_get(before)
  after, (metrics,) = stepper.run(before, batches[1:])
  after = jax.device_get(after)
  task, model, tx = tasks.get(config), stepper.builder.model, stepper.builder.tx
  batch = {k: jnp.asarray(batches[1][k]) for k in task.batch_keys(config)}
  rng = jax.random.fold_in(host.rng, host.step)
  with sharding.activate(stepper.mesh, stepper.rules):
    grads = jax.jit(jax.grad(lambda p: task.loss(model, p, batch, rng, config)[0]))(host.params)
    updates, _ = jax.jit(tx.update)(grads, host.opt_state, host.params)
  f64 = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(tree))
  grads, updates, params, ema = f64(grads), f64(updates), f64(host.params), f64(host.ema_params)
  norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
  np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-5)
  assert max(np.max(np.abs(u)) for u in jax.tree.leaves(updates)) > 1e-4  # a real update
  want = jax.tree.map(np.add, params, updates)
  _assert_trees_close(after.params, want, rtol=1e-5, atol=1e-7)
  decay = min(config.optimizer.ema_decay, 2 / 11)  # warmup (1 + step) / (10 + step), step 1
  ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, want)
  _assert_trees_close(after.ema_params, ema, rtol=1e-5, atol=1e-7)
  assert int(after.step) == 2 and int(after.skipped) == 0


def test_nonfinite_batch_skips_the_update(reference_state):
  """NaN patches: loss and grads non-finite, params/optimizer/EMA untouched, update counted."""
  config, batches, _, _ = reference_state
  stepper = _stepper(config, (1, 2, 2, 2))
  state, _ = stepper.run(stepper.fresh(), batches[:1])  # a real update first: non-trivial state
  before = jax.device_get(state)
  bad = dict(batches[1], patches=np.full_like(batches[1]["patches"], np.nan))
  state, (metrics,) = stepper.run(state, [bad])
  after = jax.device_get(state)
  assert not metrics["finite"] and not np.isfinite(metrics["loss"])
  assert int(after.skipped) == 1 and int(before.skipped) == 0
  assert int(after.step) == int(before.step) + 1
  for name in ("params", "opt_state", "ema_params"):
    for x, y in zip(
      jax.tree_util.tree_leaves(getattr(after, name)),
      jax.tree_util.tree_leaves(getattr(before, name)),
      strict=True,
    ):
      np.testing.assert_array_equal(x, y)
  # And training goes on: the next finite batch is applied.
  state, (metrics,) = stepper.run(state, batches[:1])
  assert metrics["finite"] and int(state.skipped) == 1


# ---------------------------------------------------------------------------------------------
# Gradient accumulation.
# ---------------------------------------------------------------------------------------------
def test_grad_accumulation_applies_the_mean_every_k_steps():
  """k=3 microbatches = one AdamW step on their mean gradient (clipped as a whole); nothing
  moves in between; the schedule, counted in train steps, is held over each window."""
  base = configs.load().optimizer
  base.lr, base.warmup_steps, base.grad_clip, base.weight_decay = 0.1, 4, 0.5, 0.01
  accum = configs.load().optimizer
  accum.update(base.to_dict())
  accum.grad_accum_steps, accum.warmup_steps = 3, 12  # the same schedule in train steps
  tx1, tx3 = train_state.make_optimizer(base, 100), train_state.make_optimizer(accum, 300)
  params = {"w": jnp.arange(12.0).reshape(3, 4) / 10, "b": jnp.ones(4)}
  rng = np.random.default_rng(0)
  normal = lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32)
  windows = [[jax.tree.map(normal, params) for _ in range(3)] for _ in range(6)]
  p1, s1 = params, tx1.init(params)
  p3, s3 = params, tx3.init(params)
  for grads in windows:
    mean = jax.tree.map(lambda *g: sum(g) / 3, *grads)
    u1, s1 = tx1.update(mean, s1, p1)
    p1 = jax.tree.map(jnp.add, p1, u1)
    for i, g in enumerate(grads):
      u3, s3 = tx3.update(g, s3, p3)
      if i < 2:
        assert all(float(jnp.max(jnp.abs(u))) == 0 for u in jax.tree_util.tree_leaves(u3))
      p3 = jax.tree.map(jnp.add, p3, u3)
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(p1.values(), params.values()))
  assert moved > 1e-2
  _assert_trees_close(p3, p1, rtol=1e-5, atol=1e-6)
  # The logged rate (a function of the train step) is held within each window.
  lr1 = train_state.learning_rate_schedule(base, 100)
  lr3 = train_state.learning_rate_schedule(accum, 300)
  got = [float(lr3(s)) for s in range(9)]
  np.testing.assert_allclose(got, [float(lr1(u)) for u in (0, 1, 2) for _ in range(3)], rtol=1e-6)
  assert got[0] == got[1] == got[2] and got[3] == got[4] == got[5]
  assert got[3] > got[0]  # (still warming up: the windows differ)


@pytest.mark.slow
def test_sora_tiny_on_a_4d_mesh(data_dir):
  """configs/vdit/sora.py:tiny as configured (bf16 compute, fp32 params, full remat, 2-step
  accumulation) on (fsdp 2, sequence 2, tensor 2): step 1 only accumulates, step 2 applies
  the update, sharded; the accumulator is sharded like the params."""
  config = configs.load("tiny", "configs/vdit/sora.py")
  config.input.data_dir = data_dir
  config.mesh = dict(data=1, fsdp=2, sequence=2, tensor=2)
  config.optimizer.warmup_steps = 0  # else the first update has rate 0
  assert config.model.dtype == "bfloat16" and config.model.remat_policy == "full"
  assert config.optimizer.grad_accum_steps == 2
  stepper = Stepper(config, _mesh((1, 2, 2, 2)))
  it = train.make_data_iterator(config)
  state0 = jax.device_get(stepper.fresh())
  state, (m1,) = stepper.run(stepper.fresh(), [next(it)])
  mid = jax.device_get(state)
  for x, y in zip(jax.tree_util.tree_leaves(mid.params), jax.tree_util.tree_leaves(state0.params)):
    np.testing.assert_array_equal(x, y)
  acc = state.opt_state.acc_grads
  for a, p in zip(jax.tree_util.tree_leaves(acc), jax.tree_util.tree_leaves(state.params)):
    assert a.sharding == p.sharding and a.dtype == jnp.float32
  assert any(float(np.max(np.abs(a))) > 0 for a in jax.tree_util.tree_leaves(jax.device_get(acc)))
  state, (m2,) = stepper.run(state, [next(it)])
  assert m1["finite"] and m2["finite"] and np.isfinite(m2["loss"])
  end = jax.device_get(state)
  moved = [
    float(np.max(np.abs(x - y)))
    for x, y in zip(jax.tree_util.tree_leaves(end.params), jax.tree_util.tree_leaves(mid.params))
  ]
  assert max(moved) > 1e-4
  for p in jax.tree_util.tree_leaves(end.params):
    assert p.dtype == jnp.float32  # master params stay fp32 under bf16 compute


def test_muon_orthogonalises_the_2d_kernels_and_adams_the_rest():
  """`optimizer.name="muon"`: a 2-D kernel's first update is the orthogonalised gradient (all
  its singular values alike, Newton-Schulz), scaled to AdamW's RMS; a bias, an embedding table
  and a rank-3 kernel get (Nesterov) AdamW's update."""
  opt = configs.load().optimizer
  opt.name, opt.lr, opt.warmup_steps, opt.grad_clip, opt.weight_decay = "muon", 0.1, 0, 1e9, 0.0
  tx = train_state.make_optimizer(opt, 100)
  rng = np.random.default_rng(0)
  params = {
    "mlp": {"kernel": jnp.zeros((16, 8)), "bias": jnp.zeros(8)},
    "attn": {"kernel": jnp.zeros((16, 2, 4))},
    "table": {"embedding": jnp.zeros((10, 16))},
  }
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  lr = float(train_state.learning_rate_schedule(opt, 100)(0))
  sv = np.linalg.svd(np.asarray(updates["mlp"]["kernel"]), compute_uv=False)
  raw = np.linalg.svd(np.asarray(grads["mlp"]["kernel"]), compute_uv=False)
  assert raw.max() / raw.min() > 3  # a Gaussian 16×8 matrix
  # Orthogonalised: Newton-Schulz's quintic leaves singular values in ~[0.7, 1.2], not all 1.
  assert sv.max() / sv.min() < 2
  rms = float(jnp.sqrt(jnp.mean(jnp.square(updates["mlp"]["kernel"]))))
  np.testing.assert_allclose(rms, 0.2 * lr, rtol=0.35)  # consistent RMS: 0.2·lr
  nadam = optax.adamw(lr, b1=opt.b1, b2=opt.b2, nesterov=True)
  for leaf in ("mlp/bias", "attn/kernel", "table/embedding"):
    a, b = leaf.split("/")
    want, _ = nadam.update(grads[a][b], nadam.init(params[a][b]), params[a][b])
    np.testing.assert_allclose(updates[a][b], want, rtol=1e-5)
    np.testing.assert_array_equal(np.sign(updates[a][b]), -np.sign(grads[a][b]))


def test_muon_state_of_boxed_params_gets_shardings():
  """The state builder initialises the optimizer on boxed (logically partitioned) params: muon
  must still find the 2-D kernels through the boxes, and the shardings of its state (with
  optax's MaskedNode where the other part owns a parameter) must match the state's structure."""
  opt = configs.load().optimizer
  opt.name = "muon"
  tx = train_state.make_optimizer(opt, 10)
  params = {
    "mlp": {
      "kernel": nn.Partitioned(jnp.zeros((8, 16)), ("embed", "mlp")),
      "bias": nn.Partitioned(jnp.zeros(16), ("mlp",)),
    }
  }
  boxed = jax.eval_shape(lambda: tx.init(params))
  mesh = sharding.make_mesh({"data": -1})
  shardings = sharding.tree_shardings(mesh, sharding.DEFAULT_RULES, boxed)
  unboxed = nn.meta.unbox(boxed)
  assert jax.tree.structure(shardings) == jax.tree.structure(unboxed)
  muon_mu = unboxed[1].inner_states["muon"].inner_state[0].mu
  assert isinstance(muon_mu["mlp"]["bias"], optax.MaskedNode)
  assert muon_mu["mlp"]["kernel"].shape == (8, 16)  # the kernel is muon's
