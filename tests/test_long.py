"""Videos of any length, window by window (`Sampler.long`, `--mode=long`): any N, the context
frames given to each window exact, one compiled step whatever N, bad requests refused first."""

import jax
import numpy as np
import pytest
from absl import flags

from tests import configs
from tests.test_sample_requests import _SubsampleCodec
from vdit import config_checks, media, models, sample, sampling, train
from vdit.diffusion import objectives, sliding_window

PROMPT = ["a red circle moving right"]


@pytest.fixture(scope="module")
def untrained():
  """A small pixel-space sampler with random (off adaLN-Zero) params: patches (2, 4, 4)."""
  c, model, params = configs.untrained_narrow()
  return sampling.Sampler(config=c, params=params, model=model)


def test_the_plan_covers_every_frame_once():
  for n in (1, 5, 6, 7, 11, 30):
    chunks = sliding_window.plan(n, 6, 2, 2)
    covered = [f for c in chunks for f in range(c.start + c.new, c.start + c.new + c.count)]
    assert covered == list(range(n))
    assert all(c.new == 2 and c.start == chunks[i].start + chunks[i].new + chunks[i].count - 2
               for i, c in enumerate(chunks[1:]))  # fmt: skip
  assert len(sliding_window.plan(30, 6, 2, 2)) == 1 + -(-(30 - 6) // 4)


def test_any_length_in_windows_with_the_context_given_exactly(untrained):
  """11 frames of 10×13 (neither a multiple of the window nor of the patch) in windows of 6
  with 2 frames of context: 3 windows; each window's first 2 frames are, bit for bit, the
  frames of the video there (the previous window's last), its new frames are the video's, and
  the first window is plain text-to-video of the window with the same seed."""
  s, opts = untrained, dict(height=10, width=13, steps=2, seed=3)
  seen = []
  out = s.long(
    PROMPT, num_frames=11, window=6, context=2, on_chunk=lambda *a: seen.append(a), **opts
  )
  assert out.shape == (1, 11, 10, 13, 3) and out.dtype == np.uint8
  assert [(i, start) for i, start, _ in seen] == [(0, 0), (1, 4), (2, 8)]
  for _, start, frames in seen:
    assert frames.shape == (1, 6, 10, 13, 3)
    keep = min(6, 11 - start)
    np.testing.assert_array_equal(frames[:, :keep], out[:, start : start + keep])
  np.testing.assert_array_equal(seen[0][2], s.generate(PROMPT, num_frames=6, **opts))
  # The windows continue the video: without the context the second window's frames differ.
  assert not np.array_equal(seen[1][2][:, :2], seen[0][2][:, :2])
  assert len({out[0, f].tobytes() for f in range(11)}) > 6  # not one frame repeated


def test_memory_is_one_window_whatever_the_length(untrained):
  """N = 1×, 3×, 6× the window: one compiled sampling loop (the jit cache does not grow) and the
  same device bytes alive at every window; only the host's uint8 video grows with N."""
  s, opts = untrained, dict(height=8, width=8, steps=1)
  live = {}

  def device_bytes(*_):
    peak.append(sum(a.nbytes for a in jax.live_arrays()))

  for n in (4, 12, 24):
    peak = []
    s.long(PROMPT, num_frames=n, window=4, context=2, on_chunk=device_bytes, **opts)
    live[n] = max(peak)
    if n == 4:
      compiled = objectives.sample_rows._cache_size()  # noqa: SLF001
  assert objectives.sample_rows._cache_size() == compiled  # noqa: SLF001
  assert live[24] <= live[4] * 1.01, live


def test_a_noisy_context_holds_the_given_frames_at_their_time():
  """context_noise > 0 (diffusion forcing's sampling): the model reads the context tokens at that
  time (per-token conditioning) and the kept frames still come back exactly."""
  c, model, params = configs.untrained_narrow()
  c.model.shared_conditioning = False

  model = models.build(c)
  s = sampling.Sampler(config=c, params=params, model=model)
  opts = dict(height=8, width=8, steps=2, num_frames=6, window=4, context=2)
  clean, noisy = s.long(PROMPT, **opts), s.long(PROMPT, context_noise=0.3, **opts)
  np.testing.assert_array_equal(clean[:, :4], noisy[:, :4])  # the first window: no context
  assert not np.array_equal(clean[:, 4:], noisy[:, 4:])


@pytest.mark.parametrize(
  "kwargs,message",
  [
    (dict(num_frames=0), r"num_frames=0 must be ≥ 1"),
    (dict(num_frames=12, window=8, context=8), r"context=8 must be smaller than window=8"),
    (dict(num_frames=12, window=7), r"window=7 must be a positive multiple of the patch's 2"),
    (dict(num_frames=12, window=8, context=3), r"context=3 must be a positive multiple"),
    (dict(num_frames=12, window=8, context=0), r"context=0 must be a positive multiple"),
    (dict(num_frames=12, context_noise=1.0), r"context_noise=1.0 must be in \[0, 1\)"),
    (dict(num_frames=12, context_noise=0.1), r"has shared_conditioning"),
  ],
)
def test_bad_long_requests_are_refused_before_any_compute(kwargs, message):
  s = sampling.Sampler(config=configs.load("tiny"), params=None)  # no params: nothing can run
  with pytest.raises(sampling.InputError, match=message):
    s.long(PROMPT, **kwargs)


def _request(tmp_path, *args):
  fv = flags.FlagValues()
  sample._define_flags(fv)  # noqa: SLF001
  fv(["sample", f"--workdir={tmp_path}", f"--out={tmp_path / 'out.gif'}", "--prompt=a", *args])
  return sample._request(fv)  # noqa: SLF001


@pytest.mark.parametrize(
  "args,message",
  [
    (["--mode=long"], r"--mode=long needs --num_frames=N"),
    (["--window=8"], r"--window is not used by --mode=t2v"),
    (["--mode=long", "--num_frames=9", "--context=0"], r"--context=0 must be ≥ 1"),
    (["--mode=long", "--num_frames=9", "--context_noise=-0.1"], r"must be in \[0, 1\)"),
  ],
)
def test_long_flags_are_checked_before_loading(tmp_path, args, message):
  with pytest.raises(sample.InputError, match=message):
    _request(tmp_path, *args)


def test_diffusion_forcing_needs_rectified_flow_and_per_token_time():
  c = configs.load("tiny")
  c.diffusion.cond_probs.forcing = 0.1
  c.model.shared_conditioning = False
  train.validate(c)  # fine: a time per token
  c.diffusion.objective = "gaussian"
  with pytest.raises(config_checks.ConfigError, match=r"forcing=0.1 .* needs .*'rectified_flow'"):
    train.validate(c)


def test_long_through_the_cli_flags(untrained, tmp_path):
  """The real flags and `_generate`: --mode=long reaches `Sampler.long` with its window and
  context, and records them in the metadata it returns."""
  fv = flags.FlagValues()
  sample._define_flags(fv)  # noqa: SLF001
  args = ["--mode=long", "--num_frames=9", "--window=6", "--context=2", "--height=8", "--width=8"]
  args += ["--steps=2"]
  fv(["sample", f"--workdir={tmp_path}", f"--out={tmp_path / 'o.npz'}", "--prompt=a", *args])
  prompts, inputs = sample._request(fv)  # noqa: SLF001
  videos, used = sample._generate(untrained, fv, prompts, inputs)  # noqa: SLF001
  assert videos.shape == (1, 9, 8, 8, 3)
  assert used["window"] == 6 and used["context"] == 2 and used["num_frames"] == 9


def test_long_in_latent_space_gives_the_latents_as_context(untrained):
  """With a (stand-in, per-frame) autoencoder the windows are latent frames: each window's
  context is the previous window's latents, exactly, and `last_latents` is the whole video's; a
  time-compressing autoencoder is refused before any compute."""
  s = sampling.Sampler(untrained.config, untrained.params, untrained.model, _SubsampleCodec())
  seen = []
  out = s.long(PROMPT, num_frames=9, window=4, context=2, height=4, width=4, steps=1,
               on_chunk=lambda *chunk: seen.append(chunk))  # fmt: skip
  assert out.shape == (1, 9, 8, 8, 3) and s.last_latents.shape == (1, 9, 4, 4, 3)
  np.testing.assert_array_equal(out, media.to_uint8(s.codec.decode(s.last_latents)))
  for _, start, frames in seen[1:]:
    np.testing.assert_array_equal(frames[:, :2], out[:, start : start + 2])
  s.codec = _SubsampleCodec(ft=4)
  with pytest.raises(sampling.InputError, match=r"per-frame autoencoder .* compresses time 4×"):
    s.long(PROMPT, num_frames=9, window=4, context=2)
