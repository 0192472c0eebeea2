"""Progressive distillation (`vdit.diffusion.distillation`, `distill` in configs/vdit/shapes.py):
the target is two guided Euler steps of the teacher on the sampler's own grid, the student
starts from the teacher's params and learns that target, and bad runs fail before compute."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import configs
from vdit import config_checks, sampling, sharding, tasks, train, train_state
from vdit.data import tokenizer
from vdit.diffusion import distillation, flow, guidance, objectives
from vdit.tasks import video_diffusion


def test_grid_times_are_the_times_the_euler_sampler_visits():
  """Each example's times are one step of `flow.sample`'s N-step grid under its own resolution
  shift (per token), through the S·N-step teacher's grid in between."""
  steps, shift = 4, jnp.array([[1.0, 1.0, 3.0, 3.0, 3.0]])
  seg = jnp.array([[1, 1, 2, 2, 2]])
  for substeps in (2, 3):
    seen = set()
    for seed in range(40):
      k, times = distillation.grid_times(jax.random.key(seed), shift, seg, 2, steps, substeps)
      assert times.shape == (substeps + 1, 1, 5)
      for tok in range(5):
        i = int(k[0, seg[0, tok] - 1])
        seen.add(i)
        want = [flow.shift_time(1.0 - (i + j / substeps) / steps, float(shift[0, tok]))
                for j in range(substeps + 1)]  # fmt: skip
        np.testing.assert_allclose(times[:, 0, tok], want, rtol=1e-6)
    assert seen == set(range(steps))  # every step of the grid is trained


def test_teacher_target_lands_where_the_teachers_euler_steps_land():
  """Against a hand-computed two-step Euler of an analytic velocity field; given tokens are held
  clean at t = 0 while the teacher runs."""
  x_t = jax.random.normal(jax.random.key(0), (1, 3, 2))
  x0 = jax.random.normal(jax.random.key(1), (1, 3, 2))
  times = jnp.stack([jnp.full((1, 3), v) for v in (0.9, 0.6, 0.2)])
  cond = jnp.array([[False, True, False]])
  calls = []

  def teacher(x, tt):
    calls.append((np.asarray(x), np.asarray(tt)))
    return -x * (1.0 + tt[..., None]) + 0.5

  v = distillation.teacher_target(teacher, x_t, times, cond, x0)
  x, t_, tm, tn = np.asarray(x_t[0, 0]), 0.9, 0.6, 0.2
  x_mid = x + (tm - t_) * (-x * (1 + t_) + 0.5)
  x_end = x_mid + (tn - tm) * (-x_mid * (1 + tm) + 0.5)
  np.testing.assert_allclose(v[0, 0], (x - x_end) / (t_ - tn), rtol=1e-5)
  for x_seen, t_seen in calls:  # the given token: clean, at t = 0, in both teacher calls
    np.testing.assert_allclose(x_seen[0, 1], x0[0, 1])
    assert t_seen[0, 1] == 0.0
  assert len(calls) == 2


def test_one_substep_is_guidance_distillation():
  """With `substeps=1` the target is the (guided) teacher's own velocity at x_t and t_k, given
  tokens held clean at t = 0: the student learns the guided field at every time of its grid
  (Meng et al. 2023, stage one), and can be sampled at any divisor of its steps."""
  x_t = jax.random.normal(jax.random.key(0), (1, 3, 2))
  x0 = jax.random.normal(jax.random.key(1), (1, 3, 2))
  t = jnp.array([[0.9, 0.7, 0.4]])
  cond = jnp.array([[False, True, False]])
  times = jnp.stack([t, t - 0.25])

  def teacher(x, tt):
    return -x * (1.0 + tt[..., None]) + 0.5

  v = distillation.teacher_target(teacher, x_t, times, cond, x0)
  free = ~np.asarray(cond[0])
  want = teacher(x_t, t)
  np.testing.assert_allclose(np.asarray(v)[0, free], np.asarray(want)[0, free], rtol=1e-5)
  k, grid = distillation.grid_times(jax.random.key(2), 1.0, jnp.ones((1, 4), int), 1, 32, 1)
  assert grid.shape == (2, 1, 4)  # t_k and t_k+1 of the 32-step grid: 1 teacher step
  np.testing.assert_allclose(grid[0] - grid[1], 1 / 32, rtol=1e-5)


@pytest.fixture(scope="module")
def teacher_run(data_dir, tmp_path_factory):
  run = str(tmp_path_factory.mktemp("teacher"))
  train.train_and_evaluate(configs.small(data_dir, total_steps=6), run)
  return run


def _student(data_dir, teacher, steps=2, **overrides):
  c = configs.small(data_dir, **overrides)
  c.distill = dict(teacher=teacher, steps=steps, substeps=2)
  c.init_from = teacher
  c.optimizer.lr = 1e-3
  return c


@pytest.mark.slow
def test_student_starts_as_its_teacher_and_learns_the_two_step_target(data_dir, teacher_run):
  config = _student(data_dir, teacher_run, total_steps=60)
  train.validate(config)
  task = tasks.get(config)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.sharding_rules)
  builder = train_state.build(config, mesh, rules, task)
  teacher_params = train.initial_params(config, builder)
  state = builder.create(teacher_params)
  same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), state.params, teacher_params)
  assert all(jax.tree.leaves(same)) and int(state.step) == 0
  step_fn = train.jit_train_step(config, builder.model, builder.tx, mesh, rules, builder.shardings)
  losses = []
  with sharding.activate(mesh, rules):
    batch = train.to_global(next(task.make_iterator(config)), config, mesh, rules)
    for _ in range(60):
      state, metrics = step_fn(state, batch)
      losses.append(float(metrics["loss"]))
  # The teacher's guided two-step landing differs from its own one conditional step (the
  # first loss); the student learns it on this batch.
  assert losses[0] > 0 and np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5]), losses


def test_the_teacher_is_guided_as_the_sampler_guides(data_dir, teacher_run, monkeypatch):
  """`distill_loss`'s target is two Euler steps of u + s·(c − u) inside the guidance interval,
  c and u the teacher on the batch's captions and on [NULL] ones: against the loss with that
  teacher written out by hand, for a teacher (random, off the adaLN-Zero init) whose
  captions matter."""
  config = _student(data_dir, teacher_run)
  task = tasks.get(config)
  model = task.build_model(config)
  init = jax.jit(lambda r: nn.unbox(model.init(r, *task.dummy_inputs(config)))["params"])
  tparams, sparams = configs.off_zero_init(init(jax.random.key(0))), init(jax.random.key(1))
  tconfig = configs.override(configs.small(data_dir), **{"sample.guidance": 3.0})
  tconfig.diffusion.guidance_interval = (0.3, 1.0)
  monkeypatch.setattr(video_diffusion, "teacher", lambda _: (tconfig, model, tparams))
  batch = {k: jnp.asarray(v) for k, v in next(task.make_iterator(config)).items()}
  rng = jax.random.key(3)
  loss, _ = jax.jit(lambda p: video_diffusion.distill_loss(model, p, batch, rng, config))(sparams)

  spec = objectives.Spec.from_config(config.diffusion)
  null, _ = guidance.drop_conditions(rng, batch, 1.0)

  def by_hand(x, t):
    c = video_diffusion.packed_apply(model, tparams)(x, t, batch)
    u = video_diffusion.packed_apply(model, tparams)(x, t, null)
    s = jnp.where((t >= 0.3) & (t <= 1.0), 3.0, 1.0)[..., None]
    return u + s * (c - u)

  def reference(p):
    student = lambda x, t: video_diffusion.packed_apply(model, p)(x, t, batch)  # noqa: E731
    return distillation.loss(  # the outputs are x̂0 here (pixel `:tiny`): as velocities
      objectives.flow_model(spec, student), objectives.flow_model(spec, by_hand, sampling=True),
      batch,
      jax.random.fold_in(rng, 1), steps=2, substeps=2, noise_correlation=spec.noise_correlation,
      shift=objectives.token_shift(spec, batch["shapes"], batch["segment_ids"]),
    )[0]  # fmt: skip

  np.testing.assert_allclose(loss, jax.jit(reference)(sparams), rtol=2e-4)
  unguided = configs.override(tconfig, **{"sample.guidance": 1.0})
  monkeypatch.setattr(video_diffusion, "teacher", lambda _: (unguided, model, tparams))
  plain, _ = jax.jit(lambda p: video_diffusion.distill_loss(model, p, batch, rng, config))(sparams)
  assert abs(float(plain) - float(loss)) > 1e-3 * float(loss)  # the guidance matters here


def test_bad_distillation_configs_fail_before_compute(data_dir, teacher_run):
  train.validate(_student(data_dir, teacher_run))
  for overrides, message in (
    ({"model.width": 48}, r"another model \(model.width"),
    ({"distill.steps": 0}, r"distill.steps=0 must be an int >= 1"),
    ({"distill.substeps": 0}, r"distill.substeps=0 must be an int >= 1"),
    ({"init_from": ""}, r"init_from='': a distilled student starts from its teacher"),
    ({"diffusion.shift_base_tokens": 7}, r"diffusion.shift_base_tokens=7; the teacher"),
    (
      {"diffusion.cond_probs.forcing": 0.1, "model.shared_conditioning": False},
      r"cond_probs.forcing=0.1: diffusion forcing",
    ),
    ({"distill.teacher": "/nonexistent/run"}, r"init_from='/nonexistent/run' holds no checkpoint"),
  ):
    bad = configs.override(_student(data_dir, teacher_run), **overrides)
    if "distill.teacher" in overrides:
      bad.init_from = overrides["distill.teacher"]
    with pytest.raises(config_checks.ConfigError, match=message):
      train.validate(bad)


def test_guidance_one_samples_without_null_rows_and_the_same_videos():
  """A student samples at guidance 1: the conditional rows alone (one model call a step), the
  same videos as the guided path's conditional + null rows at scale 1, up to rounding."""
  c, model, params = configs.untrained_narrow()
  spec = objectives.Spec.from_config(c.diffusion)
  grid, tok = (2, 4, 4), tokenizer.Tokenizer(c.input.vocab_size)
  cond = sampling.prompt_rows(["a red circle moving left", "a blue square"], grid, tok, 16)
  null = sampling.prompt_rows(["", ""], grid, tok, 16)
  both = {k: np.concatenate([cond[k], null[k]]) for k in cond}
  length, dim = int(np.prod(grid)), 2 * 4 * 4 * 3
  noise = jax.random.normal(jax.random.key(0), (2, length, dim))
  zeros, mask = jnp.zeros_like(noise), jnp.zeros((2, length), bool)
  outs = [
    objectives.sample_rows(
      model,
      params,
      rows,
      noise,
      zeros,
      mask,
      zeros,
      jax.random.key(1),
      1.0,
      (0.0, 1.0),
      spec=spec,
      steps=3,
      sampler="euler",
      strength=1.0,
    )  # fmt: skip
    for rows in (cond, both)
  ]
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
  assert float(jnp.abs(outs[0] - noise).max()) > 0.01  # the model moved the noise
