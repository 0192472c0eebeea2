"""Rectified flow: interpolation, masked loss, per-example time, CFG dropout, Euler sampler."""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from vdit import segments  # noqa: E402
from vdit.diffusion import flow, guidance, objectives  # noqa: E402
from vdit.models.text import TextEncoder  # noqa: E402

B, L, P, M, K = 2, 16, 3, 10, 3


def make_batch(seed=0):
  """Two rows: row 0 packs 3 examples (6, 5, 3 tokens) + 2 padding; row 1 one example."""
  r = np.random.default_rng(seed)
  seg = np.array([[1] * 6 + [2] * 5 + [3] * 3 + [0] * 2, [1] * 12 + [0] * 4], np.int32)
  cond = np.zeros((B, L), bool)
  cond[0, :2] = True  # the first frame of example 1 is given (image-to-video)
  cond[1, :4] = True
  text_tokens = np.array([[1, 5, 6, 1, 7, 2, 0, 0, 0, 0], [1, 8, 9, 10, 0, 0, 0, 0, 0, 0]])
  text_seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]])
  batch = dict(
    patches=r.normal(size=(B, L, P)).astype(np.float32),
    positions=np.zeros((B, L, 3), np.int32),
    segment_ids=seg,
    shapes=np.array([[[1, 2, 3], [1, 5, 1], [1, 1, 3]], [[2, 2, 3], [0, 0, 0], [0, 0, 0]]]),
    text_tokens=text_tokens.astype(np.int32),
    text_segment_ids=text_seg.astype(np.int32),
    labels=np.array([[1, 2, -1], [4, -1, -1]], np.int32),
    cond_mask=cond,
    loss_mask=(seg > 0) & ~cond,
  )
  return {k: jnp.asarray(v) for k, v in batch.items()}


def recording(fn):
  """Wraps apply_fn to record what the loss feeds the model (run the loss without jit)."""
  seen = {}

  def apply_fn(x_t, t, batch):
    seen.update(x_t=x_t, t=t, batch=batch)
    return fn(x_t, t, batch)

  return apply_fn, seen


def test_interpolate_endpoints_and_velocity():
  x0, eps = jnp.ones((1, 2, 3)), -jnp.ones((1, 2, 3))
  t = jnp.array([[0.0, 0.25]])
  xt = flow.interpolate(x0, eps, t)
  np.testing.assert_allclose(xt[0, 0], 1.0)  # t=0 is data
  np.testing.assert_allclose(xt[0, 1], 0.5)  # 0.75·1 + 0.25·(−1)
  np.testing.assert_allclose(flow.interpolate(x0, eps, jnp.ones((1, 2))), eps)  # t=1 is noise


def test_loss_target_is_noise_minus_data():
  batch = make_batch()
  x0 = batch["patches"]
  # The exact velocity given x0: v = (x_t − x0) / t = ε − x0; the loss must vanish.
  exact = lambda x_t, t, b: (x_t - x0) / jnp.maximum(t, 1e-6)[..., None]
  value, metrics = flow.loss(exact, batch, jax.random.key(0), text_dropout=0.0)
  assert float(value) < 1e-8
  zero_value, metrics = flow.loss(lambda x, t, b: 0 * x, batch, jax.random.key(0))
  assert float(zero_value) > 0.5  # E‖ε − x0‖² ≈ 2 per coordinate
  assert metrics["num_tokens"] == int(batch["loss_mask"].sum())


def test_time_is_per_example_and_cond_tokens_stay_clean():
  batch = make_batch()
  apply_fn, seen = recording(lambda x, t, b: x)
  _, metrics = flow.loss(apply_fn, batch, jax.random.key(1))
  seg, cond = np.asarray(batch["segment_ids"]), np.asarray(batch["cond_mask"])
  t = np.asarray(seen["t"])
  for b in range(B):
    for k in range(1, K + 1):
      tk = t[b][(seg[b] == k) & ~cond[b]]
      if tk.size:
        np.testing.assert_array_equal(tk, metrics["t"][b, k - 1])  # one t per example
  assert len(set(np.round(t[0, 2:14], 6))) == 3  # and different examples differ
  np.testing.assert_array_equal(t[cond], 0.0)
  np.testing.assert_array_equal(np.asarray(seen["x_t"])[cond], np.asarray(batch["patches"])[cond])
  assert np.abs(np.asarray(seen["x_t"] - batch["patches"])[~cond & (seg > 0)]).min() > 0


def test_input_perturbation_moves_the_input_and_keeps_the_target():
  batch = make_batch()
  x0, cond = batch["patches"], np.asarray(batch["cond_mask"])
  plain_fn, plain = recording(lambda x, t, b: 0 * x)
  perturbed_fn, perturbed = recording(lambda x, t, b: 0 * x)
  rng = jax.random.key(3)
  value, _ = flow.loss(plain_fn, batch, rng, text_dropout=0.0)
  value_p, _ = flow.loss(perturbed_fn, batch, rng, text_dropout=0.0, input_perturbation=0.5)
  t = np.asarray(plain["t"])[..., None]
  moved = np.asarray(perturbed["x_t"] - plain["x_t"]) / np.maximum(t, 1e-6)  # γ·ξ
  live = (np.asarray(batch["segment_ids"]) > 0) & ~cond
  assert 0.4 < moved[live].std() < 0.6  # ξ ~ N(0, 1), scaled by γ = 0.5
  np.testing.assert_array_equal(np.asarray(perturbed["x_t"])[cond], np.asarray(x0)[cond])
  np.testing.assert_array_equal(perturbed["t"], plain["t"])
  # A zero prediction's loss is the mean target norm: the target did not move.
  np.testing.assert_allclose(value_p, value, rtol=1e-6)
  # The model that is exact on unperturbed inputs is not exact on perturbed ones.
  eps_x0 = (plain["x_t"] - x0) / jnp.maximum(plain["t"], 1e-6)[..., None]
  exact, _ = flow.loss(lambda x, t, b: eps_x0, batch, rng, text_dropout=0.0)
  assert float(exact) < 1e-8
  naive = lambda x, t, b: (x - x0) / jnp.maximum(t, 1e-6)[..., None]
  assert float(flow.loss(naive, batch, rng, text_dropout=0.0, input_perturbation=0.5)[0]) > 0.1


def test_degraded_input_is_noised_where_t_is_high_and_the_target_restores_x0():
  """`flow.DEGRADED_INPUT`: x_t is built from the degraded input at t ≥ DEGRADED_T_MIN and from
  x0 below; the target is the velocity whose x̂0 = x_t − t·v is the true x0 there, and the plain
  one below (a model exact without degradation stays exact on the low-t tokens only)."""
  batch = make_batch()
  x0, seg, cond = batch["patches"], np.asarray(batch["segment_ids"]), np.asarray(batch["cond_mask"])
  degraded = x0 + 1.0
  fn, seen = recording(lambda x, t, b: 0 * x)
  fn_d, seen_d = recording(lambda x, t, b: 0 * x)
  rng = jax.random.key(5)
  flow.loss(fn, batch, rng, text_dropout=0.0)
  flow.loss(fn_d, dict(batch, **{flow.DEGRADED_INPUT: degraded}), rng, text_dropout=0.0)
  t = np.asarray(seen["t"])
  np.testing.assert_array_equal(seen_d["t"], t)
  moved = np.asarray(seen_d["x_t"] - seen["x_t"])
  high = (t >= flow.DEGRADED_T_MIN) & (seg > 0) & ~cond
  low = (t < flow.DEGRADED_T_MIN) & (seg > 0)
  assert high.any() and (low & ~cond).any()
  one_minus_t = np.broadcast_to((1 - t)[..., None], moved.shape)
  np.testing.assert_allclose(moved[high], one_minus_t[high], rtol=1e-5)
  np.testing.assert_array_equal(moved[low], 0.0)  # and the given (cond) tokens stay x0
  restoring = lambda x, t, b: (x - x0) / jnp.maximum(t, 1e-6)[..., None]  # x̂0 = x0 exactly
  batch_d = dict(batch, **{flow.DEGRADED_INPUT: degraded})
  assert float(flow.loss(restoring, batch_d, rng, text_dropout=0.0)[0]) < 1e-8
  # A model exact on sharp inputs (v = ε − x0 from its own noise) is wrong where t is high.
  eps_x0 = (seen["x_t"] - x0) / jnp.maximum(seen["t"], 1e-6)[..., None]
  assert float(flow.loss(lambda x, t, b: eps_x0, batch_d, rng, text_dropout=0.0)[0]) > 0.05


def test_mixed_noise_shares_a_fraction_of_each_place_along_time():
  """`mixed_noise`: every element N(0, 1); two tokens of one example at the same (h, w) in
  different patch-frames correlate by `correlation`, tokens elsewhere (another place, another
  example, another row) do not; 0 is the plain draw of `jax.random.normal`."""
  grid = np.stack(np.meshgrid(np.arange(4), np.arange(2), np.arange(2), indexing="ij"), -1)
  one = grid.reshape(16, 3)  # example of (4, 2, 2) patches: 4 patch-frames of 4 places
  positions = np.concatenate([one[:8], one[:8]])  # row: two examples of 2 patch-frames
  seg = np.repeat(np.array([1, 2], np.int32), 8)
  rows = 4096
  shape = (rows, 16, 4)
  pos = jnp.broadcast_to(jnp.asarray(positions), (rows, 16, 3))
  ids = jnp.broadcast_to(jnp.asarray(seg), (rows, 16))
  plain = flow.mixed_noise(jax.random.key(3), shape, ids, pos, 0.0)
  np.testing.assert_array_equal(plain, jax.random.normal(jax.random.key(3), shape))
  x = np.asarray(flow.mixed_noise(jax.random.key(3), shape, ids, pos, 0.6))
  assert abs(x.std() - 1.0) < 0.01
  corr = lambda a, b: float(np.mean(x[:, a] * x[:, b]))  # noqa: E731
  assert abs(corr(0, 4) - 0.6) < 0.03  # example 1, place (0, 0), patch-frames 0 and 1
  assert abs(corr(9, 13) - 0.6) < 0.03  # example 2, place (0, 1)
  assert abs(corr(0, 1)) < 0.03  # another place
  assert abs(corr(0, 8)) < 0.03  # the same place of another example
  assert abs(float(np.mean(x[:-1, 0] * x[1:, 4]))) < 0.03  # the same place in another row
  with pytest.raises(ValueError, match="correlation=1.0"):
    flow.mixed_noise(jax.random.key(3), shape, ids, pos, 1.0)


def test_stochastic_sampler_draws_fresh_noise_correlated_as_in_training():
  """`objectives.sample` with the stochastic sampler and `noise_correlation`: its fresh noise is
  the run's (`objectives.noise_fn`). With a zero velocity and zero starting noise, two steps of
  η = 1 return exactly the fresh noise of the first step times 0.5, so the same place in two
  patch-frames correlates by the run's c, and other places do not."""
  grid = np.stack(np.meshgrid(np.arange(2), np.arange(2), np.arange(2), indexing="ij"), -1)
  rows = 4096
  positions = jnp.broadcast_to(jnp.asarray(grid.reshape(8, 3)), (rows, 8, 3))
  seg = jnp.ones((rows, 8), jnp.int32)
  spec = objectives.Spec(noise_correlation=0.6, sampler="stochastic")
  zeros = jnp.zeros((rows, 8, 4))
  out = objectives.sample(
    spec,
    lambda x, t: jnp.zeros_like(x),
    zeros,
    2,
    shapes=jnp.tile(jnp.array([[[2, 2, 2]]]), (rows, 1, 1)),
    segment_ids=seg,
    positions=positions,
    rng=jax.random.key(4),
  )
  x = np.asarray(out) / 0.5
  assert abs(x.std() - 1.0) < 0.02
  assert abs(float(np.mean(x[:, 0] * x[:, 4])) - 0.6) < 0.03  # place (0, 0), patch-frames 0, 1
  assert abs(float(np.mean(x[:, 0] * x[:, 1]))) < 0.03  # another place


def test_loss_ignores_tokens_outside_loss_mask():
  batch = make_batch()
  tokenwise = lambda x, t, b: 0.5 * x + t[..., None]
  value, metrics = flow.loss(tokenwise, batch, jax.random.key(2))
  outside = ~np.asarray(batch["loss_mask"])
  changed = dict(batch, patches=jnp.where(outside[..., None], 1e3, batch["patches"]))
  value2, metrics2 = flow.loss(tokenwise, changed, jax.random.key(2))
  np.testing.assert_allclose(value2, value, rtol=1e-6)
  np.testing.assert_allclose(metrics2["per_example_loss"], metrics["per_example_loss"], rtol=1e-6)
  inside = dict(batch, patches=batch["patches"].at[0, 7].add(5.0))  # a loss token
  assert abs(float(flow.loss(tokenwise, inside, jax.random.key(2))[0] - value)) > 1e-3
  # The total is the token-weighted mean of the per-example losses.
  counts = np.array([[4, 5, 3], [8, 0, 0]])
  np.testing.assert_allclose(
    (metrics["per_example_loss"] * counts).sum() / counts.sum(), value, rtol=1e-5
  )


def test_loss_jits_and_samples_logit_normal_time():
  batch = make_batch()
  fn = jax.jit(
    lambda b, r: flow.loss(
      lambda x, t, b: x, b, r, time_sampling="logit_normal", shift_base_tokens=4
    )
  )
  value, metrics = fn(batch, jax.random.key(3))
  assert np.isfinite(value) and np.all((metrics["t"] > 0) & (metrics["t"] < 1))
  t = flow.sample_time(jax.random.key(4), (20000,), "logit_normal", mean=1.0, std=0.5)
  np.testing.assert_allclose(np.median(t), jax.nn.sigmoid(1.0), atol=0.01)
  u = flow.sample_time(jax.random.key(5), (20000,))
  np.testing.assert_allclose([u.mean(), u.var()], [0.5, 1 / 12], atol=0.01)
  np.testing.assert_allclose(flow.shift_time(jnp.array([0.0, 0.5, 1.0]), 3.0), [0, 0.75, 1])
  with pytest.raises(ValueError, match="kind='beta'.*logit_normal"):
    flow.sample_time(jax.random.key(0), (2,), "beta")


def test_drop_text_gives_the_empty_caption():
  batch = make_batch()
  tokens, seg, dropped = guidance.drop_text(
    jax.random.key(0), batch["text_tokens"], batch["text_segment_ids"], K, rate=1.0
  )
  assert bool(dropped.all())
  for b in range(B):
    for k in range(1, K + 1):
      kept = np.asarray(tokens[b])[np.asarray(seg[b]) == k]
      had = np.any(np.asarray(batch["text_segment_ids"][b]) == k)
      np.testing.assert_array_equal(kept, [guidance.NULL_ID] if had else [])
  same = guidance.drop_text(
    jax.random.key(0), batch["text_tokens"], batch["text_segment_ids"], K, 0.0
  )
  np.testing.assert_array_equal(same[0], batch["text_tokens"])
  np.testing.assert_array_equal(same[1], batch["text_segment_ids"])
  # The encoder sees a dropped caption exactly as the encoded empty caption [NULL] alone.
  enc = TextEncoder(vocab_size=16, width=16, depth=1, num_heads=2)
  params = jax.jit(enc.init)(jax.random.key(1), tokens, seg)
  out = jax.jit(enc.apply)(params, tokens, seg)
  empty = jnp.zeros((1, M), jnp.int32).at[0, 0].set(guidance.NULL_ID)
  ref = jax.jit(enc.apply)(params, empty, (empty > 0).astype(jnp.int32))
  np.testing.assert_allclose(out[0, 3], ref[0, 0], atol=1e-5)  # example 2's NULL token
  # In the loss, dropped examples also get the null label.
  apply_fn, seen = recording(lambda x, t, b: x)
  flow.loss(apply_fn, batch, jax.random.key(0), text_dropout=1.0)
  np.testing.assert_array_equal(seen["batch"]["labels"], -1)
  np.testing.assert_array_equal(seen["batch"]["text_tokens"], tokens)


def gaussian_velocity(mu, sigma):
  """Exact rectified-flow velocity E[ε − x0 | x_t] for x0 ~ N(mu, sigma²), ε ~ N(0, 1)."""

  def v(x, t):
    t = t[..., None]
    a = 1 - t  # x_t = a·x0 + t·ε has mean a·mu, variance a²σ² + t²
    return -mu + (t - a * sigma**2) / (a**2 * sigma**2 + t**2) * (x - a * mu)

  return v


def test_euler_sampler_reproduces_gaussian_target():
  mu, sigma = 1.5, 0.4
  x1 = jax.random.normal(jax.random.key(0), (4, 1024, 2))
  for shift in (1.0, 3.0):
    sample = lambda x, s=shift: flow.sample(gaussian_velocity(mu, sigma), x, 200, shift=s)
    x0 = jax.jit(sample)(x1)
    np.testing.assert_allclose([x0.mean(), x0.std()], [mu, sigma], atol=0.02)
  # The flow is affine in x1, so the exact pushforward of N(0, 1) is f(0) + (f(1) − f(0))·N(0, 1).
  f = lambda c: flow.sample(gaussian_velocity(mu, sigma), jnp.full((1, 1, 1), c), 200)
  np.testing.assert_allclose([f(0.0), f(1.0) - f(0.0)], [[[[mu]]], [[[sigma]]]], atol=5e-3)
  # Too few steps must be visibly wrong (the test can fail).
  assert (
    abs(
      float(flow.sample(gaussian_velocity(mu, sigma), jnp.ones((1, 1, 1)), 1)[0, 0, 0])
      - (mu + sigma)
    )
    > 0.1
  )


def test_stochastic_sampler_reproduces_gaussian_target():
  """With the exact velocity, fresh noise at every step (η = 1 and η = 0.5) still samples the
  target distribution; η = 0 is the Euler sampler exactly."""
  mu, sigma = 1.5, 0.4
  v = gaussian_velocity(mu, sigma)
  x1 = jax.random.normal(jax.random.key(0), (4, 1024, 2))
  for eta in (1.0, 0.5):
    x0 = flow.sample(v, x1, 400, method="stochastic", rng=jax.random.key(1), eta=eta, shift=2.0)
    np.testing.assert_allclose([x0.mean(), x0.std()], [mu, sigma], atol=0.02)
  euler = flow.sample(v, x1, 7, method="euler")
  ode = flow.sample(v, x1, 7, method="stochastic", rng=jax.random.key(1), eta=0.0)
  np.testing.assert_allclose(ode, euler, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="needs an rng"):
    flow.sample(v, x1, 2, method="stochastic")


def test_preconditioned_velocity_is_exact_with_the_ideal_network():
  """v = a·x_t + b·F is the true velocity when F is EDM's target (x0 − c_skip·x_t) / c_out, at
  every t including the ends."""
  x0, eps = jax.random.normal(jax.random.key(0), (2, 3, 5, 4))
  sd = 0.5
  for t_value in (0.0, 0.01, 0.5, 0.99, 1.0):
    t = jnp.full((3, 5), t_value)
    x_t = flow.interpolate(x0, eps, t)
    tt = t[..., None]
    d = (1 - tt) ** 2 * sd**2 + tt**2
    c_skip, c_out = (1 - tt) * sd**2 / d, tt * sd / jnp.sqrt(d)
    f = lambda x, t, c_skip=c_skip, c_out=c_out, x_t=x_t: jnp.where(
      c_out > 0, (x0 - c_skip * x_t) / jnp.maximum(c_out, 1e-12), -eps
    )
    v = flow.velocity_from_preconditioned(f, sd)(x_t, t)
    np.testing.assert_allclose(v, eps - x0, atol=1e-4)


def test_gated_x0_blends_the_input_and_the_estimate():
  """x̂0 = g·x_t/(1 − t) + (1 − g)·F: a closed gate is the x0 model, an open gate returns the
  rescaled input, and the zero-initialised gate logit starts almost closed (σ(GATE_BIAS))."""
  x, f = jax.random.normal(jax.random.key(0), (2, 3, 5, 4))
  t = jax.random.uniform(jax.random.key(1), (3, 5), minval=0.05, maxval=0.95)

  def gated(logit):
    return flow.velocity_from_gated_x0(
      lambda x, t: jnp.concatenate([f, jnp.full((3, 5, 1), logit)], -1), t_min=0.3
    )(x, t)

  x0_model = flow.velocity_from_x0(lambda x, t: f, t_min=0.3)(x, t)
  np.testing.assert_allclose(gated(-100.0), x0_model, rtol=1e-5, atol=1e-5)
  rescaled = x / jnp.maximum(1 - t, 0.1)[..., None]  # the rescaling is bounded at 10
  np.testing.assert_allclose(
    gated(100.0), (x - rescaled) / jnp.maximum(t, 0.3)[..., None], rtol=1e-5, atol=1e-5
  )
  g = jax.nn.sigmoid(flow.GATE_BIAS)
  x0_hat = g * rescaled + (1 - g) * f
  np.testing.assert_allclose(
    gated(0.0), (x - x0_hat) / jnp.maximum(t, 0.3)[..., None], rtol=1e-5, atol=1e-5
  )


def test_x0_loss_below_t_min_is_zero_for_the_true_x0():
  """With x0 prediction and `t_min`, a model that returns the true x0 has zero loss at every t,
  including t < t_min (the target goes through the same conversion as the prediction)."""
  batch = make_batch()
  x0 = batch["patches"]
  perfect = flow.velocity_from_x0(lambda x, t, b: x0, t_min=0.9)
  loss, _ = flow.loss(perfect, batch, jax.random.key(3), text_dropout=0.0, t_min=0.9)
  assert float(loss) < 1e-10
  biased, _ = flow.loss(perfect, batch, jax.random.key(3), text_dropout=0.0)  # old target
  assert float(biased) > 1e-3


def test_euler_sampler_keeps_conditioning_tokens():
  x1 = jax.random.normal(jax.random.key(1), (1, 8, 2))
  cond = jnp.arange(8)[None] < 3
  x_cond = jnp.full((1, 8, 2), 7.0)
  seen_t = []

  def v(x, t):
    jax.debug.callback(lambda t: seen_t.append(np.asarray(t)), t, ordered=True)
    return x - 1.0  # some velocity that would move the conditioning tokens

  out = flow.sample(v, x1, 4, cond_mask=cond, x_cond=x_cond)
  np.testing.assert_array_equal(out[0, :3], 7.0)
  assert np.abs(np.asarray(out[0, 3:]) - 7.0).min() > 0
  np.testing.assert_array_equal(seen_t[0][0, :3], 0.0)  # conditioning tokens are at t = 0
  np.testing.assert_array_equal(seen_t[0][0, 3:], 1.0)


def test_cfg():
  vc, vu = jnp.array([2.0]), jnp.array([1.0])
  np.testing.assert_allclose(guidance.cfg(vc, vu, 1.0), vc)
  np.testing.assert_allclose(guidance.cfg(vc, vu, 0.0), vu)
  np.testing.assert_allclose(guidance.cfg(vc, vu, 4.0), [5.0])


def test_per_token_gathers_by_segment():
  values = jnp.array([[0.1, 0.2, 0.3]])
  seg = jnp.array([[1, 1, 3, 2, 0]])
  out = segments.per_token(values, seg)
  np.testing.assert_allclose(out[0, :4], [0.1, 0.1, 0.3, 0.2])
  assert np.isfinite(out[0, 4])


def test_self_conditioned_loss_feeds_the_first_pass_estimate_without_its_gradient():
  """With `self_condition` = 1 the trained pass reads the x̂0 of a first pass run with zeros;
  no gradient flows through that estimate; with 0 the model runs once, without it."""
  batch = make_batch()
  calls = []

  def model(w, fixed=None):
    def x0_model(x, t, b, prev):  # an x0 model that reads its previous estimate
      calls.append((x, prev))
      return w * x + 0.5 * (prev if fixed is None else fixed)

    return flow.velocity_from_x0(x0_model, t_min=0.3)

  def loss(w, fixed=None):
    kw = dict(text_dropout=0.0, t_min=0.3, self_condition=1.0)
    return flow.loss(model(w, fixed), batch, jax.random.key(0), **kw)[0]

  loss(0.7)
  assert len(calls) == 2
  (x_first, prev_first), (x_second, prev_second) = calls
  np.testing.assert_array_equal(prev_first, 0.0)
  np.testing.assert_array_equal(x_second, x_first)
  np.testing.assert_allclose(prev_second, 0.7 * x_first, rtol=1e-6)  # the first pass's x̂0
  # Its gradient is stopped: d loss / dw equals the gradient with the estimate held fixed.
  grad = jax.grad(loss)(0.7)
  held = jax.grad(lambda w: loss(w, fixed=0.7 * x_first))(0.7)
  np.testing.assert_allclose(grad, held, rtol=1e-5)
  # Rate 0: the model is called once, with the plain signature.
  seen = []
  plain = flow.velocity_from_x0(lambda x, t, b: seen.append(x) or x, t_min=0.3)
  flow.loss(plain, batch, jax.random.key(0), text_dropout=0.0, t_min=0.3)
  assert len(seen) == 1


@pytest.mark.parametrize("method", ["euler", "heun", "stochastic"])
def test_self_conditioned_sampler_passes_each_estimate_to_the_next_call(method):
  """Every model call of a self-conditioned sampler receives the x̂0 of the call before (zeros
  at the first), given frames included."""
  x1 = jax.random.normal(jax.random.key(1), (1, 8, 2))
  cond = jnp.arange(8)[None] < 3
  x_cond = jnp.full((1, 8, 2), 7.0)
  log = []

  def x0_model(x, t, prev):
    out = 0.5 * x + 0.25 * prev + t[..., None]
    jax.debug.callback(lambda *a: log.append([np.asarray(v) for v in a]), prev, out, ordered=True)
    return out

  v = flow.velocity_from_x0(x0_model, t_min=1e-4)
  kw = dict(cond_mask=cond, x_cond=x_cond, rng=jax.random.key(2), correct_at_zero=False)
  flow.sample(v, x1, 3, method=method, self_condition=True, t_min=1e-4, **kw)
  assert len(log) == (6 if method == "heun" else 3)
  np.testing.assert_array_equal(log[0][0], 0.0)
  for (_, out), (prev_next, _) in zip(log, log[1:], strict=False):
    np.testing.assert_allclose(prev_next, out, rtol=1e-4, atol=1e-4)
  assert float(np.abs(log[-1][0]).max()) > 0
