"""Frame conditioning: training tasks on packed rows, the loss ignoring given tokens, the
per-example time shift, the sampler's input policy, and given frames unchanged from the CLI."""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()

import hashlib  # noqa: E402
import logging  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests.test_sample import PT, check_ok, random_frames, read_npz, run_sample, train_tiny  # noqa: E402
from vdit import media  # noqa: E402
from vdit.data import patchify  # noqa: E402
from vdit.diffusion import conditioning, flow, gaussian, given_frames, objectives  # noqa: E402
from vdit.diffusion import gaussian_samplers as gs  # noqa: E402

TASK = {name: i for i, name in enumerate(conditioning.TASKS)}
P = PT * 2 * 2 * 3  # patches of (pt, ph, pw) = (2, 2, 2) RGB pixels


def packed_row(grids, length):
  """One packed row [1, L] of examples with these patch grids (t-major), then padding."""
  seg, pos, start = np.zeros(length, np.int32), np.zeros((length, 3), np.int32), 0
  for k, g in enumerate(grids):
    n = int(np.prod(g))
    seg[start : start + n], pos[start : start + n] = k + 1, patchify.grid_positions(g)
    start += n
  shapes = np.zeros((len(grids) + 1, 3), np.int32)  # one empty slot
  shapes[: len(grids)] = grids
  patches = np.random.default_rng(0).normal(size=(length, P)).astype(np.float32)
  batch = dict(
    patches=patches, positions=pos, segment_ids=seg, shapes=shapes,
    text_tokens=np.array([1, 5, 1, 6, 1, 7, 1, 8, 0, 0], np.int32),
    text_segment_ids=np.array([1, 1, 2, 2, 3, 3, 4, 4, 0, 0], np.int32),
    labels=np.full(len(grids) + 1, -1, np.int32),
    cond_mask=np.zeros(length, bool), loss_mask=seg > 0,
  )  # fmt: skip
  return {k: jnp.asarray(v)[None] for k, v in batch.items()}


GRIDS = [(1, 2, 2), (2, 1, 3), (3, 2, 1), (6, 1, 2)]  # an image, then T' = 2, 3, 6
BATCH = packed_row(GRIDS, 32)  # 4 + 6 + 6 + 12 tokens + 4 padding


def test_sampled_tasks_always_leave_frames_to_generate():
  shapes = jnp.asarray([[[0, 0, 0], [1, 4, 4], [2, 1, 1], [3, 1, 1], [8, 1, 1]]] * 4000)
  probs = conditioning.task_probs(conditioning.DEFAULT_PROBS)
  task, first, last = map(np.asarray, conditioning.sample_tasks(jax.random.key(0), shapes, probs))
  frames = np.asarray(shapes[..., 0])
  assert np.all(first + last < np.maximum(frames, 1)) and np.all(first >= 0) and np.all(last >= 0)
  assert np.all(task[:, :2] == TASK["none"])  # empty slots and images: never conditioned
  assert not np.any(task[:, 2] == TASK["interpolate"])  # T' = 2 cannot be interpolated
  # On T' = 8 the tasks follow the configured probabilities, with their frame counts.
  freq = np.bincount(task[:, 4], minlength=len(probs)) / len(task)
  np.testing.assert_allclose(freq, probs, atol=0.03)
  t8, f8, l8 = task[:, 4], first[:, 4], last[:, 4]
  np.testing.assert_array_equal(f8[t8 == TASK["image_to_video"]], 1)
  np.testing.assert_array_equal(l8[t8 == TASK["extend_forward"]], 0)
  fwd = f8[t8 == TASK["extend_forward"]]
  assert set(fwd) == set(range(1, 8))  # 1 … T'−1 patch-frames given
  a, b = f8[t8 == TASK["interpolate"]], l8[t8 == TASK["interpolate"]]
  assert a.min() >= 1 and b.min() >= 1 and (a + b).max() == 7
  only = conditioning.task_probs({"extend_backward": 1.0})
  task, first, last = conditioning.sample_tasks(jax.random.key(1), shapes, only)
  assert np.all(np.asarray(task[:, 2:]) == TASK["extend_backward"]) and np.all(first == 0)
  with pytest.raises(ValueError, match=r"unknown conditioning tasks \['i2v'\]"):
    conditioning.task_probs({"i2v": 1.0})


def test_condition_batch_marks_each_examples_own_frames():
  probs = conditioning.task_probs(conditioning.DEFAULT_PROBS)
  run = jax.jit(lambda r, b: conditioning.condition_batch(r, b, probs, PT))
  seg, t_index = np.asarray(BATCH["segment_ids"][0]), np.asarray(BATCH["positions"][0, :, 0])
  seen = set()
  for i in range(40):
    rng = jax.random.key(i)
    out, metrics = run(rng, BATCH)
    task, first, last = map(np.asarray, conditioning.sample_tasks(rng, BATCH["shapes"], probs))
    cond = np.asarray(out["cond_mask"][0])
    for k, (frames, _, _) in enumerate(GRIDS):
      mine = seg == k + 1
      want = (t_index[mine] < first[0, k]) | (t_index[mine] >= frames - last[0, k])
      np.testing.assert_array_equal(cond[mine], want & (task[0, k] != TASK["none"]))
      seen.add(int(task[0, k]))
    assert not cond[seg == 0].any() and not cond[seg == 1].any()  # padding, the image
    np.testing.assert_array_equal(out["loss_mask"][0], (seg > 0) & ~cond)
    assert metrics["cond_tokens"] == cond.sum()
    # Image-to-video: the given patch-frame is a still (its pt frames equal its first);
    # every other token is untouched.
    still = np.isin(seg, 1 + np.flatnonzero(task[0] == TASK["image_to_video"])) & cond
    got = np.asarray(out["patches"][0]).reshape(-1, PT, P // PT)
    np.testing.assert_array_equal(got[still], np.repeat(got[still][:, :1], PT, axis=1))
    np.testing.assert_array_equal(out["patches"][0][~still], BATCH["patches"][0][~still])
    if still.any():
      assert not np.array_equal(out["patches"][0][still], BATCH["patches"][0][still])
  later = {TASK[n] for n in ("keyframes", "retake", "inpaint", "outpaint", "forcing")}
  assert seen == set(TASK.values()) - later  # weight 0 by default


def _digest(*arrays) -> str:
  h = hashlib.sha256()
  for a in arrays:
    h.update(np.ascontiguousarray(np.asarray(a)).tobytes())
  return h.hexdigest()[:16]


def test_keyframes_weight_zero_leaves_the_draws_as_they_were():
  """Digests of the default tasks' draws recorded before the keyframes task existed (commit
  baeb434): with its weight 0 (the default), training draws exactly what it drew."""
  probs = conditioning.task_probs(conditioning.DEFAULT_PROBS)
  assert probs[TASK["keyframes"]] == 0
  shapes = jnp.asarray([[[0, 0, 0], [1, 4, 4], [2, 1, 1], [3, 1, 1], [8, 1, 1]]] * 500)
  assert _digest(*conditioning.sample_tasks(jax.random.key(0), shapes, probs)) == "2dee0d099512c67c"
  outs = [conditioning.condition_batch(jax.random.key(i), BATCH, probs, PT) for i in range(8)]
  keys = ("patches", "cond_mask", "loss_mask")
  got = _digest(*[o[0][k] for o in outs for k in keys], *[o[1]["task"] for o in outs])
  assert got == "decf0d7c8556eed2"
  assert all(conditioning.FRAME_UNIFORM not in o[0] for o in outs)  # the loss reads as before


@pytest.mark.parametrize(
  "later", [{}, dict(retake=0.0, inpaint=0.0, outpaint=0.0), dict(forcing=0.0)]
)
def test_later_tasks_at_weight_zero_leave_the_keyframes_draws_as_they_were(later):
  """Digests of a run with keyframes on, recorded before retake/inpaint/outpaint (and forcing)
  existed (commit a0796e5): with their weights 0 (named or left out) it draws exactly what it
  drew."""
  probs = conditioning.task_probs(dict(conditioning.DEFAULT_PROBS, keyframes=0.1, **later))
  shapes = jnp.asarray([[[0, 0, 0], [1, 4, 4], [2, 1, 1], [3, 1, 1], [8, 1, 1]]] * 500)
  assert _digest(*conditioning.sample_tasks(jax.random.key(0), shapes, probs)) == "d7fcbaa59cc0b944"
  outs = [conditioning.condition_batch(jax.random.key(i), BATCH, probs, PT) for i in range(8)]
  keys = ("patches", "cond_mask", "loss_mask")
  got = _digest(*[o[0][k] for o in outs for k in keys], *[o[1]["task"] for o in outs])
  assert got == "d653a0532ff70a32"


def _given_sets(name, grids, draws=60):
  """For each draw and example of a row of `grids`: the tokens' (t, h, w) places, given and
  not; checks the task's bookkeeping (task ids, loss mask, patches untouched) on the way."""
  batch = packed_row(grids, sum(int(np.prod(g)) for g in grids) + 3)
  seg, pos = np.asarray(batch["segment_ids"][0]), np.asarray(batch["positions"][0])
  probs = conditioning.task_probs({name: 1.0})
  run = jax.jit(lambda r, b: conditioning.condition_batch(r, b, probs, PT))
  for i in range(draws):
    out, metrics = run(jax.random.key(i), batch)
    cond = np.asarray(out["cond_mask"][0])
    assert not cond[seg == 0].any()
    np.testing.assert_array_equal(out["loss_mask"][0], (seg > 0) & ~cond)
    np.testing.assert_array_equal(out["patches"], batch["patches"])  # no stills
    task = np.asarray(metrics["task"][0])
    sets = []
    for k in range(len(grids)):
      mine = seg == k + 1
      places = {tuple(p) for p in pos[mine]}
      given = {tuple(p) for p in pos[mine & cond]}
      sets.append((task[k], places, given))
    yield sets


def test_retake_task_generates_a_contiguous_range_of_patch_frames():
  grids = [(1, 2, 2), (2, 1, 3), (3, 2, 1), (6, 1, 2)]  # an image, then T' = 2, 3, 6
  ranges = {k: set() for k in range(1, 4)}
  for sets in _given_sets("retake", grids):
    task, _, given = sets[0]
    assert task == TASK["none"] and not given  # an image has no frames to keep
    for k in range(1, 4):
      task, places, given = sets[k]
      assert task == TASK["retake"]
      frames = grids[k][0]
      free = sorted({p[0] for p in places - given})
      assert {p[0] for p in given}.isdisjoint(free)  # whole patch-frames
      assert 1 <= len(free) < frames and free == list(range(free[0], free[-1] + 1))
      ranges[k].add((free[0], free[-1] + 1))
  assert ranges[1] == {(0, 1), (1, 2)}  # T' = 2: one of the two
  assert ranges[2] == {(0, 1), (1, 2), (2, 3), (0, 2), (1, 3)}  # every range of T' = 3
  assert len(ranges[3]) > 10 and any(0 < a and b < 6 for a, b in ranges[3])  # middles too


@pytest.mark.parametrize("name", ["inpaint", "outpaint"])
def test_inpaint_and_outpaint_tasks_generate_a_box_or_its_border_across_time(name):
  """inpaint: a box of the patch grid generated in every patch-frame, the rest given; outpaint:
  the box given, the border around it generated. Images too; a 1-token frame cannot."""
  grids = [(1, 2, 2), (2, 1, 3), (3, 3, 4), (2, 1, 1)]
  boxes = {k: set() for k in range(3)}
  for sets in _given_sets(name, grids):
    task, _, given = sets[3]
    assert task == TASK["none"] and not given  # H'·W' = 1: no box leaves a token
    for k in range(3):
      task, places, given = sets[k]
      assert task == TASK[name]
      t, rows, cols = grids[k]
      cells = {(h, w) for _, h, w in given}
      assert given == {(i, h, w) for i in range(t) for h, w in cells}  # the same every frame
      box = (
        cells if name == "outpaint" else {(h, w) for h in range(rows) for w in range(cols)} - cells
      )
      assert 1 <= len(box) < rows * cols
      hs, ws = sorted({h for h, _ in box}), sorted({w for _, w in box})
      assert box == {(h, w) for h in range(hs[0], hs[-1] + 1) for w in range(ws[0], ws[-1] + 1)}
      boxes[k].add((hs[0], hs[-1] + 1, ws[0], ws[-1] + 1))
  assert len(boxes[2]) > 20  # many boxes of a 3 × 4 grid
  assert any(b[:2] == (0, 3) for b in boxes[2]) and any(b[2:] == (0, 4) for b in boxes[2])
  assert boxes[1] == {(0, 1, a, b) for a in range(3) for b in range(a + 1, 4)} - {(0, 1, 0, 3)}


def test_keyframes_task_gives_a_random_subset_of_each_examples_own_frames():
  # A row of four videos and an image, with some tokens of the last video dropped (NaViT): the
  # given set is any subset, whole patch-frames of the example, ≥ 1 given and ≥ 1 generated.
  grids = [(2, 1, 2), (3, 2, 1), (6, 1, 2), (1, 2, 2), (8, 1, 1)]
  batch = packed_row(grids, 40)
  seg, t_index = np.asarray(batch["segment_ids"][0]), np.asarray(batch["positions"][0, :, 0])
  drop = np.flatnonzero(seg == 5)[[1, 4]]  # patch-frames 1 and 4 of the T' = 8 video dropped
  batch["segment_ids"] = batch["segment_ids"].at[0, drop].set(0)
  batch["loss_mask"] = batch["segment_ids"] > 0
  seg = np.asarray(batch["segment_ids"][0])
  probs = conditioning.task_probs({"keyframes": 1.0})
  run = jax.jit(lambda r, b: conditioning.condition_batch(r, b, probs, PT))
  subsets, still_seen = {k: set() for k in (1, 2, 3, 5)}, set()
  for i in range(60):
    out, metrics = run(jax.random.key(i), batch)
    task, cond = np.asarray(metrics["task"][0]), np.asarray(out["cond_mask"][0])
    kf, none = TASK["keyframes"], TASK["none"]
    np.testing.assert_array_equal(task, [kf, kf, kf, none, kf, none])  # the image, the empty slot
    assert not cond[seg == 0].any() and not cond[seg == 4].any()  # padding, the image
    np.testing.assert_array_equal(out["loss_mask"][0], (seg > 0) & ~cond)
    for k in (1, 2, 3, 5):
      mine = seg == k
      frames = {int(t): set(cond[mine & (t_index == t)]) for t in np.unique(t_index[mine])}
      assert all(len(v) == 1 for v in frames.values())  # whole patch-frames
      given = frozenset(t for t, v in frames.items() if True in v)
      assert 1 <= len(given) < len(frames), (k, given)
      subsets[k].add(given)
      patches = np.asarray(out["patches"][0][mine & cond]).reshape(-1, PT, P // PT)
      if not np.array_equal(patches.ravel(), np.asarray(batch["patches"][0][mine & cond]).ravel()):
        np.testing.assert_array_equal(patches, np.repeat(patches[:, :1], PT, axis=1))  # a still
        still_seen.add(k)
    np.testing.assert_array_equal(out["patches"][0][~cond], batch["patches"][0][~cond])
  assert len(subsets[3]) > 20 and len(subsets[5]) > 20  # many subsets of T' = 6 and 8
  assert {frozenset({0}), frozenset({1})} == subsets[1]  # T' = 2: one of two
  assert still_seen  # some examples' keyframes are stills (images as keyframes)


def test_retake_draws_are_unchanged_by_the_forcing_task_at_weight_zero():
  """A run with every earlier task on draws, with `forcing` named at 0, exactly what it draws
  without it (the forcing task's randomness is its own `fold_in` stream, drawn only when on)."""
  on = dict(conditioning.DEFAULT_PROBS, keyframes=0.1, retake=0.1, inpaint=0.1, outpaint=0.1)
  outs = {}
  for extra in ({}, dict(forcing=0.0)):
    probs = conditioning.task_probs(dict(on, **extra))
    draws = [conditioning.condition_batch(jax.random.key(i), BATCH, probs, PT) for i in range(8)]
    keys = ("patches", "cond_mask", "loss_mask")
    outs[len(extra)] = _digest(
      *[o[0][k] for o in draws for k in keys], *[o[1]["task"] for o in draws]
    )
  assert outs[0] == outs[1]


def test_forcing_task_gives_each_patch_frame_its_own_noise_level():
  """Diffusion forcing: no token given, one uniform per patch-frame of an example (the same for
  all its tokens), different across its patch-frames; the loss maps them through the time
  sampling and the example's shift, and every other example keeps its one time."""
  grids = [(1, 2, 2), (3, 2, 1), (6, 1, 2)]  # an image (falls back to `none`), T' = 3, 6
  batch = packed_row(grids, 32)
  seg, t_index = np.asarray(batch["segment_ids"][0]), np.asarray(batch["positions"][0, :, 0])
  probs = conditioning.task_probs({"forcing": 1.0})
  out, metrics = conditioning.condition_batch(jax.random.key(3), batch, probs, PT)
  np.testing.assert_array_equal(
    metrics["task"][0, :3], [TASK["none"], TASK["forcing"], TASK["forcing"]]
  )
  assert not np.asarray(out["cond_mask"]).any()
  np.testing.assert_array_equal(out["loss_mask"], batch["loss_mask"])
  u = np.asarray(out[conditioning.FRAME_UNIFORM][0])
  assert np.all(u[seg <= 1] == -1.0)  # padding and the image: the example's own time
  for k in (2, 3):
    per_frame = [np.unique(u[(seg == k) & (t_index == t)]) for t in range(grids[k - 1][0])]
    assert all(len(v) == 1 and 0 <= v[0] < 1 for v in per_frame)  # one level per patch-frame
    assert len({float(v[0]) for v in per_frame}) == len(per_frame)  # and they differ
  # The loss's times: the uniforms through the logit-normal and the shift, per token.
  spec = objectives.Spec(time_sampling="logit_normal", shift_base_tokens=4, text_dropout=0.0)
  seen = []

  def model(x, t, b):
    seen.append(np.asarray(t))
    return x

  objectives.loss(spec, model, out, jax.random.key(1))
  t = seen[0][0]
  shift = np.asarray(flow.resolution_shift(batch["shapes"], 4))[0]
  for k in (2, 3):
    mine = seg == k
    want = flow.shift_time(flow.time_from_uniform(u[mine], "logit_normal"), shift[k - 1])
    np.testing.assert_allclose(t[mine], want, rtol=1e-5)
  assert len(np.unique(t[seg == 1])) == 1  # the image: one time


@pytest.mark.parametrize("objective", ["rectified_flow", "gaussian"])
def test_loss_ignores_conditioned_tokens(objective):
  spec = objectives.Spec(objective=objective, shift_base_tokens=8, text_dropout=0.0)
  only = conditioning.task_probs({"interpolate": 1.0})
  batch, _ = conditioning.condition_batch(jax.random.key(0), BATCH, only, PT)
  cond = np.asarray(batch["cond_mask"])
  assert cond.sum() > 0
  tokenwise = lambda x, t, b: 0.5 * x + t[..., None]  # each token's output sees only itself
  loss = jax.jit(lambda b: objectives.loss(spec, tokenwise, b, jax.random.key(1))[0])
  changed = dict(batch, patches=jnp.where(cond[..., None], 7.0, batch["patches"]))
  np.testing.assert_allclose(loss(changed), loss(batch), rtol=1e-6)
  free = int(np.flatnonzero(np.asarray(batch["loss_mask"][0]))[0])
  other = dict(batch, patches=batch["patches"].at[0, free].add(3.0))
  assert abs(float(loss(other) - loss(batch))) > 1e-4


def test_time_shift_depends_on_each_examples_size():
  """Two examples of different sizes in one packed row get their own shift, in training and
  sampling: t' = s·t / (1 + (s − 1)·t) with s = √(tokens / base)."""
  base = 8
  identity = lambda x, t, b: x
  _, plain = flow.loss(identity, BATCH, jax.random.key(0), text_dropout=0.0)
  _, shifted = flow.loss(
    identity, BATCH, jax.random.key(0), text_dropout=0.0, shift_base_tokens=base
  )
  tokens = np.array([np.prod(g) for g in GRIDS] + [0], np.float32)
  s = np.sqrt(np.maximum(tokens, 1) / base)
  want = np.where(tokens > 0, s * plain["t"][0] / (1 + (s - 1) * plain["t"][0]), plain["t"][0])
  np.testing.assert_allclose(shifted["t"][0], want, rtol=1e-5)
  assert len(set(np.round(s[:4], 4))) == 3  # 4, 6, 6, 12 tokens: three different shifts
  # Sampling uses the same per-example shift: at step 1 of 2, t = shift_time(1/2, s_k).
  spec = objectives.Spec(shift_base_tokens=base)
  seen = []

  def velocity(x, t):
    jax.debug.callback(lambda t: seen.append(np.asarray(t)), t, ordered=True)
    return x

  noise = jnp.zeros(BATCH["patches"].shape)
  shapes, seg = BATCH["shapes"], BATCH["segment_ids"]
  objectives.sample(spec, velocity, noise, 2, shapes=shapes, segment_ids=seg)
  got, seg = seen[1][0], np.asarray(seg[0])
  for k in range(4):
    np.testing.assert_allclose(got[seg == k + 1], s[k] * 0.5 / (1 + (s[k] - 1) * 0.5), rtol=1e-6)


def test_gaussian_sampler_holds_given_tokens():
  schedule = gaussian.make_schedule("linear", 100)
  x_cond = jnp.full((1, 8, 2), 0.5)
  cond = jnp.arange(8)[None] < 3
  for method in ("ddpm", "ddim", "dpmpp_2m"):
    noise = jax.random.normal(jax.random.key(0), (1, 8, 2))
    kw = dict(schedule=schedule, method=method, rng=jax.random.key(1))
    out = gs.sample(lambda x, t: x, noise, 5, cond_mask=cond, x_cond=x_cond, **kw)
    np.testing.assert_array_equal(out[0, :3], 0.5)
    assert np.abs(np.asarray(out[0, 3:]) - 0.5).min() > 0


def test_given_frames_fit_the_request(caplog):
  video = random_frames((3, 10, 30, 3))
  same = given_frames.fit_size(video[..., :8, :12, :], 8, 12, "video")
  np.testing.assert_array_equal(same, media.from_uint8(video[:, :8, :12]))  # no resize, exact
  with caplog.at_level(logging.WARNING):
    out = given_frames.fit_size(video, 8, 12, "video")  # 10x30 → crop 10x15 → 8x12
  assert out.shape == (3, 8, 12, 3) and "video: 10x30 resized to 8x12" in caplog.text
  np.testing.assert_allclose(out.mean(), (video[:, :, 7:22] / 127.5 - 1).mean(), atol=1e-3)
  with pytest.raises(given_frames.InputError, match=r"expected RGB frames .* \(3, 10, 30, 4\)"):
    given_frames.fit_size(np.zeros((3, 10, 30, 4), np.uint8), 8, 12, "video")
  image = out[:1]
  np.testing.assert_array_equal(given_frames.patch_frames(image, 2, "first", "x"), out[[0, 0]])
  np.testing.assert_array_equal(given_frames.patch_frames(out, 2, "last", "x"), out[1:])
  np.testing.assert_array_equal(given_frames.patch_frames(out, 2, "first", "x"), out[:2])
  given = given_frames.place([out[:2]], [out[1:]], 8, 2)
  assert (given.first, given.last) == (1, 1)
  np.testing.assert_array_equal(given.video[0, [0, 1, 6, 7]], out[[0, 1, 1, 2]])
  x_cond, mask = given.tokens((4, 2, 3), (2, 4, 4))
  np.testing.assert_array_equal(mask, np.repeat([True, False, False, True], 6))
  assert x_cond.shape == (1, 24, 96)
  with pytest.raises(given_frames.InputError, match="num_frames=4 leaves nothing"):
    given_frames.place([out[:2]], [out[1:]], 4, 2)


@pytest.mark.slow
def test_cli_given_frames_come_out_unchanged(data_dir, tmp_path):
  """i2v, extend (both ways), interpolate and keyframes from a trained checkpoint: the given
  frames are in the output bit for bit (pixel space, NPZ), the rest is generated."""
  workdir = train_tiny(str(tmp_path / "run"), data_dir)
  size = ("--height=16", "--width=24")
  image = random_frames((16, 24, 3), seed=1)
  clip, clip2 = random_frames((4, 16, 24, 3), seed=2), random_frames((2, 16, 24, 3), seed=3)
  np.savez(tmp_path / "image.npz", frames=image[None])
  np.savez(tmp_path / "a.npz", frames=clip)
  np.savez(tmp_path / "b.npz", frames=clip2)

  def run(name, flags):
    path = f"{tmp_path}/{name}.npz"
    out = run_sample(
      workdir, "--prompt=a red circle moving right", *size, *flags.split(), f"--out={path}"
    )
    check_ok(out, path)
    frames, _ = read_npz(path)
    assert frames.shape[1:] == (16, 24, 3)
    return frames

  i2v = run("i2v", f"--mode=i2v --image={tmp_path}/image.npz --num_frames=6")
  assert len(i2v) == 6
  np.testing.assert_array_equal(i2v[:PT], np.broadcast_to(image, (PT, 16, 24, 3)))  # repeated
  fwd = run("fwd", f"--mode=extend --video={tmp_path}/a.npz --num_frames=8")
  assert len(fwd) == 8
  np.testing.assert_array_equal(fwd[:4], clip)
  assert not np.array_equal(fwd[4:], np.broadcast_to(clip[-1], (4, 16, 24, 3)))
  bwd = run("bwd", f"--mode=extend --direction=backward --video={tmp_path}/a.npz --num_frames=6")
  np.testing.assert_array_equal(bwd[2:], clip)
  mid = run("mid", f"--mode=interpolate --video={tmp_path}/a.npz --video2={tmp_path}/b.npz")
  assert len(mid) == 14  # the default: both clips + the config's 8 frames
  np.testing.assert_array_equal(mid[:4], clip)
  np.testing.assert_array_equal(mid[-2:], clip2)
  kf = f"{tmp_path}/image.npz@0,{tmp_path}/a.npz@6,{tmp_path}/image.npz@13"
  keys = run("keys", f"--mode=keyframes --keyframes={kf}")
  assert len(keys) == 14  # the default: the end of the last keyframe's patch-frame
  np.testing.assert_array_equal(keys[[0, 1, 12, 13]], np.broadcast_to(image, (4, 16, 24, 3)))
  np.testing.assert_array_equal(keys[6:10], clip)
