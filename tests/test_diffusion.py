"""Gaussian diffusion and samplers against closed forms; guidance; the objective in train_step."""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests import configs  # noqa: E402
from tests.test_flow import gaussian_velocity, make_batch  # noqa: E402
from vdit import models, sharding, tasks, train, train_state  # noqa: E402
from vdit.diffusion import (  # noqa: E402
  conditioning,
  flow,
  gaussian,
  guidance,
  objectives,
)
from vdit.diffusion import gaussian_samplers as gs  # noqa: E402

MU, SIGMA = 1.5, 0.4  # the data distribution N(MU, SIGMA²) whose score is known


def exact_model(schedule, prediction="eps"):
  """The exact denoiser of x0 ~ N(MU, SIGMA²) in any parameterization, at t = n / N.

  x_n = a·x0 + s·ε, so E[ε | x_n] = s·(x_n − a·MU) / (a²·SIGMA² + s²).
  """
  big_n = schedule.num_timesteps
  table = jnp.asarray(schedule.alphas_cumprod, jnp.float32)

  def model(x, t):
    ab = table[jnp.round(t * big_n).astype(jnp.int32)][..., None]
    a, s = jnp.sqrt(ab), jnp.sqrt(1 - ab)
    eps = s * (x - a * MU) / (ab * SIGMA**2 + 1 - ab)
    return gaussian.target(prediction, (x - s * eps) / a, eps, ab)

  return model


# ---------------------------------------------------------------------------------------------
# Schedules and parameterizations.
# ---------------------------------------------------------------------------------------------
def test_schedules_match_their_formulas():
  lin = gaussian.make_schedule("linear", 1000)
  np.testing.assert_allclose(lin.betas[[0, -1]], [1e-4, 0.02])
  np.testing.assert_allclose(lin.alphas_cumprod, np.cumprod(1 - lin.betas))
  np.testing.assert_allclose(gaussian.make_schedule("linear", 250).betas[[0, -1]], [4e-4, 0.08])
  cos = gaussian.make_schedule("cosine", 1000)
  f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
  n = np.arange(990)  # the last betas are clipped at 0.999
  np.testing.assert_allclose(cos.alphas_cumprod[n], f((n + 1) / 1000) / f(0), rtol=1e-9)
  assert cos.betas.max() <= 0.999 and np.all(np.diff(cos.alphas_cumprod) < 0)
  ab = lin.alphas_cumprod
  np.testing.assert_allclose(gaussian.snr(ab), ab / (1 - ab))
  assert np.all(np.diff(gaussian.snr(ab)) < 0)
  with pytest.raises(ValueError, match="kind='sigmoid'.*cosine"):
    gaussian.make_schedule("sigmoid")


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_posterior_is_the_gaussian_conditional(kind):
  """q(x_{n−1} | x_n, x0) from conditioning the joint Gaussian, not from DDPM Eq. 7."""
  s = gaussian.make_schedule(kind, 100)
  n = np.arange(1, 100)
  ab, ab_prev = s.alphas_cumprod[n], s.alphas_cumprod[n - 1]
  alpha = 1 - s.betas[n]
  # Given x0: x_{n−1} = √ᾱ_{n−1}·x0 + noise of var v1; x_n = √α_n·x_{n−1} + √β_n·z.
  v1, v2, cov = 1 - ab_prev, 1 - ab, np.sqrt(alpha) * (1 - ab_prev)
  # E[x_{n−1} | x_n, x0] = √ᾱ_{n−1}·x0 + cov/v2·(x_n − √ᾱ_n·x0) = c0·x0 + c1·x_n.
  c0 = np.sqrt(ab_prev) - cov / v2 * np.sqrt(ab)
  np.testing.assert_allclose(s.posterior_mean_coef1[n], c0, rtol=1e-7, atol=1e-12)
  np.testing.assert_allclose(s.posterior_mean_coef2[n], cov / v2, rtol=1e-7)
  np.testing.assert_allclose(s.posterior_variance[n], v1 - cov**2 / v2, rtol=1e-6, atol=1e-14)
  assert s.posterior_variance[0] == 0  # x_0 given x0 is x0 (ᾱ_{−1} = 1)
  np.testing.assert_allclose(s.posterior_log_variance_clipped[0], np.log(s.posterior_variance[1]))


def test_prediction_conversions_round_trip():
  r = np.random.default_rng(0)
  x0, eps = r.normal(size=(2, 5, 3)), r.normal(size=(2, 5, 3))
  ab = r.uniform(0.01, 0.99, size=(2, 5, 1))
  x_t = gaussian.q_sample(x0, eps, ab)
  for prediction in gaussian.PREDICTIONS:
    out = gaussian.target(prediction, x0, eps, ab)
    got_x0, got_eps = gaussian.to_x0_eps(prediction, out, x_t, ab)
    np.testing.assert_allclose(got_x0, x0, atol=1e-10)
    np.testing.assert_allclose(got_eps, eps, atol=1e-10)
  v = gaussian.target("v", x0, eps, ab)  # v = √ᾱ·ε − √(1−ᾱ)·x0 (Salimans & Ho 2022)
  np.testing.assert_allclose(v, np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0)


def test_kl_and_decoder_likelihood():
  np.testing.assert_allclose(gaussian.normal_kl(0.0, 0.0, 1.0, 0.0), 0.5)
  s1, s2 = 0.5, 2.0
  np.testing.assert_allclose(
    gaussian.normal_kl(0.0, 2 * np.log(s1), 0.0, 2 * np.log(s2)),
    np.log(s2 / s1) + s1**2 / (2 * s2**2) - 0.5,
    rtol=1e-6,
  )
  # The 256 bins of [−1, 1] partition the line: probabilities sum to 1 for any Gaussian.
  bins = jnp.linspace(-1, 1, 256)
  for mean, log_scale in ((0.3, -3.0), (-0.9, 0.0), (1.2, -1.0)):
    ll = gaussian.discretized_gaussian_log_likelihood(bins, mean, log_scale)
    np.testing.assert_allclose(jnp.exp(ll).sum(), 1.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The Gaussian loss on a packed batch.
# ---------------------------------------------------------------------------------------------
def _oracle(batch, schedule, prediction, extra=None):
  """The exact model given x0: returns the regression target from x_t and t."""
  x0, big_n = batch["patches"], schedule.num_timesteps
  table = jnp.asarray(schedule.alphas_cumprod, jnp.float32)

  def apply_fn(x_t, t, b):
    ab = table[jnp.round(t * big_n).astype(jnp.int32)][..., None]
    eps = (x_t - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)
    out = gaussian.target(prediction, x0, eps, ab)
    return out if extra is None else jnp.concatenate([out, extra(out)], -1)

  return apply_fn


@pytest.mark.parametrize("prediction", gaussian.PREDICTIONS)
def test_gaussian_loss_vanishes_for_the_exact_model(prediction):
  schedule = gaussian.make_schedule("cosine", 1000)
  batch = make_batch()
  kw = dict(schedule=schedule, prediction=prediction, text_dropout=0.0)
  loss = jax.jit(lambda fn, b: gaussian.loss(fn, b, jax.random.key(0), **kw), static_argnums=0)
  value, metrics = loss(_oracle(batch, schedule, prediction), batch)
  assert float(value) < 1e-6
  assert float(loss(lambda x, t, b: jnp.zeros_like(x), batch)[0]) > 0.1
  if prediction != "eps":
    return
  # One timestep per example, shared by its tokens; conditioning tokens clean at t = 0.
  seen = {}
  gaussian.loss(lambda x, t, b: seen.update(t=t, x=x) or x, batch, jax.random.key(0), **kw)
  seg, cond = np.asarray(batch["segment_ids"]), np.asarray(batch["cond_mask"])
  for b, k in ((0, 1), (0, 2), (1, 1)):
    np.testing.assert_allclose(seen["t"][b][(seg[b] == k) & ~cond[b]], metrics["t"][b, k - 1])
  np.testing.assert_array_equal(np.asarray(seen["t"])[cond], 0.0)
  np.testing.assert_array_equal(np.asarray(seen["x"])[cond], np.asarray(batch["patches"])[cond])


def test_gaussian_loss_ignores_tokens_outside_loss_mask():
  schedule = gaussian.make_schedule("linear", 1000)
  batch = make_batch()
  tokenwise = lambda x, t, b: 0.5 * x + t[..., None]
  loss = lambda b: gaussian.loss(tokenwise, b, jax.random.key(2), schedule=schedule)[0]
  outside = ~np.asarray(batch["loss_mask"])
  changed = dict(batch, patches=jnp.where(outside[..., None], 1e3, batch["patches"]))
  np.testing.assert_allclose(loss(changed), loss(batch), rtol=1e-6)
  inside = dict(batch, patches=batch["patches"].at[0, 7].add(5.0))
  assert abs(float(loss(inside) - loss(batch))) > 1e-3


def test_learned_sigma_hybrid_loss():
  schedule = gaussian.make_schedule("linear", 1000)
  batch = make_batch()
  x0 = jnp.clip(batch["patches"], -1, 1)
  batch = dict(batch, patches=x0)
  # Exact mean and f = −1 (variance β̃, the true posterior's): the vlb is ~0 for n > 0.
  exact = _oracle(batch, schedule, "eps", extra=lambda out: -jnp.ones_like(out))
  kw = dict(schedule=schedule, learn_sigma=True, text_dropout=0.0)
  rng = jax.random.key(3)  # n > 0 for every example (checked below)
  value, metrics = jax.jit(lambda b: gaussian.loss(exact, b, rng, **kw))(batch)
  assert np.all(np.asarray(metrics["t"]) > 0)
  assert float(metrics["vlb"]) < 1e-5 and float(value) < 1e-5

  def vlb_of(pred_shift, frac):
    fn = lambda x, t, b: exact(x, t, b) + jnp.concatenate([pred_shift, frac], -1)
    return gaussian.loss(fn, batch, rng, **kw)[1]["vlb"]

  z = jnp.zeros_like(x0)
  g_mean, g_var = jax.jit(jax.grad(vlb_of, argnums=(0, 1)))(z + 0.1, z + 0.3)
  assert float(jnp.abs(g_mean).max()) == 0.0 and float(jnp.abs(g_var).max()) > 0
  with pytest.raises(ValueError, match="returned 3 channels.*learn_sigma=True expects 6"):
    gaussian.loss(lambda x, t, b: x, batch, rng, **kw)


def test_vlb_terms_kl_and_decoder():
  """n > 0: KL to the true posterior (0 for the true variance, > 0 for β); n = 0: the
  discretized decoder NLL in bits, checked against scipy's normal CDF."""
  from scipy.stats import norm  # noqa: PLC0415

  s = gaussian.make_schedule("linear", 1000)
  x0 = jnp.asarray([[[-1.0, -0.5, 0.25, 1.0], [0.0, 0.5, -0.25, 0.75]]])  # [1, 2, 4] on bins
  x0 = jnp.round((x0 + 1) * 127.5) / 127.5 - 1
  noise = jax.random.normal(jax.random.key(0), x0.shape)
  n = jnp.array([[5, 0]])
  x_t = gaussian.q_sample(x0, noise, jnp.asarray(s.alphas_cumprod, jnp.float32)[n][..., None])
  vlb = lambda f: gaussian.vlb_terms(s, x0, x_t, n, x0, jnp.full_like(x0, f))[0]
  assert float(vlb(-1.0)[0]) < 1e-5 < float(vlb(1.0)[0])
  sigma = np.sqrt(s.posterior_variance[1])  # f = −1 at n = 0: the clipped variance β̃_1
  x = np.asarray(x0[0, 1])
  h = 1 / 255
  p = np.where(
    x < -0.999,
    norm.cdf(h / sigma),
    np.where(x > 0.999, norm.sf(-h / sigma), norm.cdf(h / sigma) - norm.cdf(-h / sigma)),
  )
  np.testing.assert_allclose(vlb(-1.0)[1], -np.mean(np.log2(p)), rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Samplers on a known distribution.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
  "method,steps,prediction,tol",
  [("ddpm", 1000, "eps", 0.01), ("ddpm", 250, "v", 0.02), ("ddim", 200, "x0", 0.01),
   ("dpmpp_2m", 20, "eps", 0.025), ("dpmpp_2m", 50, "v", 0.01)],
)  # fmt: skip
def test_gaussian_samplers_reproduce_the_target(method, steps, prediction, tol):
  for kind in ("linear", "cosine"):
    schedule = gaussian.make_schedule(kind, 1000)
    x1 = jax.random.normal(jax.random.key(0), (4, 2048, 1))
    run = jax.jit(
      lambda x, s=schedule: gs.sample(
        exact_model(s, prediction), x, steps, schedule=s, prediction=prediction, method=method,
        rng=jax.random.key(1),
      )
    )  # fmt: skip
    x0 = run(x1)
    np.testing.assert_allclose([x0.mean(), x0.std()], [MU, SIGMA], atol=tol)


def test_ddim_is_deterministic_invertible_and_dpm_solver_is_more_accurate():
  schedule = gaussian.make_schedule("linear", 1000)
  model = exact_model(schedule)
  x1 = jax.random.normal(jax.random.key(0), (1, 4096, 1))
  run = lambda x, steps, method, rng=None, eta=0.0: gs.sample(
    model, x, steps, schedule=schedule, method=method, rng=rng, eta=eta
  )
  a, b = run(x1, 20, "ddim", jax.random.key(1)), run(x1, 20, "ddim", jax.random.key(2))
  np.testing.assert_array_equal(a, b)  # η = 0: no noise drawn
  c = run(x1, 20, "ddim", jax.random.key(2), eta=1.0)
  assert float(jnp.abs(a - c).max()) > 0.1
  # Inversion: data → latent → data, to O(1/steps).
  x0 = MU + SIGMA * jax.random.normal(jax.random.key(3), (1, 512, 1))
  latent = gs.ddim_invert(model, x0, 200, schedule=schedule)
  np.testing.assert_allclose([latent.mean(), latent.std()], [0, 1], atol=0.1)
  np.testing.assert_allclose(run(latent, 200, "ddim"), x0, atol=0.06)
  coarse = gs.ddim_invert(model, x0, 20, schedule=schedule)
  assert float(jnp.abs(run(coarse, 20, "ddim") - x0).max()) > 0.1  # the test can fail
  # The second-order multistep solver beats DDIM at equal steps.
  err = lambda method: abs(float(run(x1, 10, method).std()) - SIGMA)
  assert err("dpmpp_2m") < 0.03 < err("ddim")


def test_timesteps_and_sdedit_start():
  schedule = gaussian.make_schedule("linear", 1000)
  np.testing.assert_array_equal(gs.timesteps(schedule, 4), [999, 666, 333, 0])
  np.testing.assert_array_equal(gs.timesteps(schedule, 3, strength=0.5), [500, 250, 0])
  for steps in (2, 7, 50, 400, 1000):
    ts = gs.timesteps(schedule, steps, spacing="logsnr")
    assert len(ts) == steps and ts[0] == 999 and ts[-1] == 0 and np.all(np.diff(ts) < 0)
  with pytest.raises(ValueError, match="steps=12 exceeds the 11 timesteps.*strength=0.01"):
    gs.timesteps(schedule, 12, strength=0.01)


def test_heun_beats_euler_at_equal_steps():
  """The flow is affine in x1, so sampler(x1) = f(0) + (f(1) − f(0))·x1 and the exact answer
  is f(0) = MU, f(1) − f(0) = SIGMA: no Monte-Carlo noise in the comparison."""
  v = gaussian_velocity(MU, SIGMA)

  def err(method, steps):
    f = lambda c: float(flow.sample(v, jnp.full((1, 1, 1), c), steps, method=method)[0, 0, 0])
    return abs(f(0.0) - MU) + abs(f(1.0) - f(0.0) - SIGMA)

  for steps in (4, 8):
    heun = err("heun", steps)
    assert heun < 0.1 * err("euler", steps), steps
    assert heun < 0.2 * err("euler", 2 * steps), steps  # equal model calls
  assert err("euler", 8) > 0.05  # Euler's error is visible: the test can fail


def test_flow_sdedit_starts_at_strength():
  """strength s: x_start = noised(x0, ε, s); with the exact velocity of a point mass at x0
  (v = (x − x0)/t) the sampler returns x0 exactly; a smaller strength keeps more of it."""
  x0 = jnp.full((1, 4, 2), 0.7)
  noise = jax.random.normal(jax.random.key(0), x0.shape)
  start = flow.noised(x0, noise, 0.3, shift=2.0)
  t = flow.shift_time(0.3, 2.0)
  np.testing.assert_allclose(start, (1 - t) * x0 + t * noise, rtol=1e-6)
  point = lambda x, t: (x - x0) / jnp.maximum(t, 1e-6)[..., None]
  out = flow.sample(point, start, 3, strength=0.3, shift=2.0)
  np.testing.assert_allclose(out, x0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Guidance.
# ---------------------------------------------------------------------------------------------
def test_cfg_interval_and_learned_variance_channels():
  c = jnp.ones((1, 3, 4)) * jnp.array([2.0, 2.0, 5.0, 5.0])
  u = jnp.ones((1, 3, 4))
  t = jnp.array([[0.1, 0.5, 0.9]])
  out = guidance.cfg(c, u, 3.0, t, interval=(0.2, 0.8), channels=2)
  np.testing.assert_allclose(out[0, :, :2], [[2, 2], [4, 4], [2, 2]])  # guided only at 0.5
  np.testing.assert_allclose(out[0, :, 2:], 5.0)  # variance channels: the conditional ones
  np.testing.assert_allclose(guidance.cfg(c, u, 3.0), 1 + 3 * (c - 1))


# ---------------------------------------------------------------------------------------------
# The objective through train_step.
# ---------------------------------------------------------------------------------------------
def _state_and_batch(config):
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  rules = sharding.rules_from_config(config.sharding_rules)
  builder = train_state.build(config, mesh, rules, tasks.get(config))
  model, tx, state = builder.model, builder.tx, builder.create()
  r = np.random.default_rng(0)
  length, k = config.input.tokens_per_row, config.input.max_examples_per_row
  grids = [(3, 2, 4), (1, 3, 3), (4, 2, 2)]  # 24 + 9 + 16 tokens, then padding
  seg, pos, shapes = np.zeros(length, np.int32), np.zeros((length, 3), np.int32), []
  start = 0
  for i, g in enumerate(grids):
    n = int(np.prod(g))
    seg[start : start + n] = i + 1
    pos[start : start + n] = np.stack(np.meshgrid(*map(np.arange, g), indexing="ij"), -1).reshape(
      -1, 3
    )
    start += n
  shapes = np.zeros((k, 3), np.int32)
  shapes[: len(grids)] = grids
  m = config.input.text_tokens_per_row
  text = np.zeros(m, np.int32)
  text[:6], text_seg = [1, 5, 1, 6, 1, 7], np.zeros(m, np.int32)
  text_seg[:6] = [1, 1, 2, 2, 3, 3]
  batch = dict(
    patches=r.uniform(-1, 1, (1, length, models.patch_dim(config))).astype(np.float32),
    positions=pos[None],
    segment_ids=seg[None],
    shapes=shapes[None],
    text_tokens=text[None],
    text_segment_ids=text_seg[None],
    labels=np.full((1, k), -1, np.int32),
    cond_mask=np.zeros((1, length), bool),
    loss_mask=seg[None] > 0,
  )
  return model, tx, state, {key: jnp.asarray(v) for key, v in batch.items()}


@pytest.mark.slow
def test_train_step_trains_the_gaussian_objective():
  config = configs.small("/nonexistent", **{"diffusion.objective": "gaussian"})
  config.input.tokens_per_row, config.input.max_examples_per_row = 64, 4
  model, tx, state, batch = _state_and_batch(config)
  step = jax.jit(lambda s, b: train.train_step(s, b, model=model, tx=tx, config=config))
  new_state, metrics = step(state, batch)
  # The same loss, recomputed from the pure functions with the step's rng split. (Params are
  # passed as arguments: XLA:CPU miscompiled this model with params captured as constants.)
  spec = objectives.Spec.from_config(config.diffusion)
  cond_rng, loss_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
  conditioned, _ = conditioning.condition_batch(cond_rng, batch, spec.cond_probs, 2)

  @jax.jit
  def loss(params, b):
    apply_fn = lambda x, t, b: model.apply(
      {"params": params}, x, t, b["positions"], b["segment_ids"], b["text_tokens"],
      b["text_segment_ids"], b["labels"],
    )  # fmt: skip
    schedule = gaussian.make_schedule("linear", 1000)
    return gaussian.loss(apply_fn, b, loss_rng, schedule=schedule, text_dropout=0.1)

  expected, aux = loss(state.params, conditioned)
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
  assert metrics["tokens"] == aux["num_tokens"] < 49 and bool(metrics["finite"])
  assert metrics["cond_tokens"] == 49 - metrics["tokens"]
  assert int(new_state.step) == 1
  # learn_sigma needs 2P outputs; a model with P: a clear error at trace time.
  config.diffusion.learn_sigma = True
  with pytest.raises(ValueError, match="returned 96 channels.*learn_sigma=True expects 192"):
    jax.jit(lambda s, b: train.train_step(s, b, model=model, tx=tx, config=config))(state, batch)
  # Built from that config, VideoDiT outputs 2P channels and the hybrid loss trains.
  model, tx, state, batch = _state_and_batch(config)
  assert model.out_dim == 192
  step = jax.jit(lambda s, b: train.train_step(s, b, model=model, tx=tx, config=config))
  new_state, metrics = step(state, batch)
  assert bool(metrics["finite"]) and np.isfinite(metrics["loss"]) and int(new_state.step) == 1


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("objective", "ddpm", "diffusion.objective='ddpm' is not supported"),
    ("sampler", "ddim", "diffusion.sampler (objective 'rectified_flow')='ddim' is not supported"),
    ("learn_sigma", True, "learn_sigma=True needs diffusion.objective='gaussian'"),
    ("cond_probs", {"none": -1.0}, "diffusion.cond_probs: conditioning task weights"),
    ("cond_probs", {"i2v": 1.0}, "unknown conditioning tasks ['i2v']"),
    ("guidance_interval", (0.8, 0.2), "guidance_interval=(0.8, 0.2) must be (lo, hi)"),
    ("shift_base_tokens", -1, "shift_base_tokens=-1 must be an integer >= 0"),
    ("prediction", "score", "diffusion.prediction='score' is not supported"),
  ],
)
def test_diffusion_config_checks(key, value, message):
  from vdit import config_checks  # noqa: PLC0415

  diffusion = configs.load().diffusion
  config_checks.check_diffusion(diffusion)  # the defaults are valid
  diffusion = dict(diffusion.to_dict(), **{key: value})
  import ml_collections  # noqa: PLC0415

  with pytest.raises(config_checks.ConfigError) as e:
    config_checks.check_diffusion(ml_collections.ConfigDict(diffusion))
  assert message in str(e.value)
