"""Bad sampling requests fail before any compute with one line naming the value (issue 14,
"Sampling"): the real flag definitions and the real request check, in process."""

import json
import re

import flax.linen as nn
import imageio.v3 as iio
import jax
import numpy as np
import pytest
from absl import flags

from tests import configs
from vdit import checkpointing, models, sample, sampling


def _request(tmp_path, *args):
  fv = flags.FlagValues()
  sample._define_flags(fv)  # noqa: SLF001
  fv(["sample", f"--workdir={tmp_path}", f"--out={tmp_path / 'out.gif'}", *args])
  return sample._request(fv)  # noqa: SLF001


@pytest.mark.parametrize(
  "args,message",
  [
    (["--prompt=a", "--steps=0"], r"--steps=0 must be ≥ 1 \(leave it out for the config's\)"),
    (["--prompt=a", "--num_frames=0"], r"--num_frames=0 must be ≥ 1"),
    (["--prompt=a", "--num_frames=-4"], r"--num_frames=-4 must be ≥ 1"),
    (["--prompt=a", "--height=0", "--width=0"], r"--height=0 must be ≥ 1"),
    (["--prompt=a", "--guidance=nan"], r"--guidance=nan must be a finite number"),
    (["--prompt=a", "--guidance=inf"], r"--guidance=inf must be a finite number"),
    (["--prompt=a", "--display_scale=0"], r"--display_scale=0 must be ≥ 1"),
    (["--prompt=a", "--fps=0"], r"--fps=0.0 must be a positive number"),
    ([], r"give --prompt or --prompts_file"),
  ],
)
def test_bad_numbers_and_missing_prompts_are_refused(tmp_path, args, message):
  with pytest.raises(sample.InputError, match=message):
    _request(tmp_path, *args)


def test_prompts_file_problems_are_refused(tmp_path):
  blank, binary = tmp_path / "blank.txt", tmp_path / "binary.txt"
  blank.write_text("\n   \n\n")
  binary.write_bytes(b"a red circle\n\xff\xfe moving\n")
  with pytest.raises(sample.InputError, match=r"holds no prompt \(every line is blank\)"):
    _request(tmp_path, f"--prompts_file={blank}")
  with pytest.raises(sample.InputError, match=r"binary.txt' is not UTF-8 text"):
    _request(tmp_path, f"--prompts_file={binary}")
  with pytest.raises(sample.InputError, match=r"missing.txt' cannot be read"):
    _request(tmp_path, f"--prompts_file={tmp_path / 'missing.txt'}")
  with pytest.raises(sample.InputError, match="not both"):
    _request(tmp_path, "--prompt=a", f"--prompts_file={blank}")


def test_a_good_request_passes(tmp_path):
  prompts_file = tmp_path / "p.txt"
  prompts_file.write_text("a red circle moving right\n\na blue square moving left\n")
  prompts, inputs = _request(tmp_path, f"--prompts_file={prompts_file}", "--steps=4")
  assert prompts == ["a red circle moving right", "a blue square moving left"]
  assert inputs == {"image": None, "video": None, "video2": None}


def test_output_paths_are_checked_before_sampling(tmp_path):
  (tmp_path / "afile").write_text("x")
  fv = flags.FlagValues()
  sample._define_flags(fv)  # noqa: SLF001
  for out, message in [
    (tmp_path / "afile" / "v.gif", r"cannot be written: '.*afile' is a file"),
    (tmp_path / "v.avi", r"has extension '.avi'"),
  ]:
    fv(["sample", f"--workdir={tmp_path}", f"--out={out}", "--prompt=a"])
    with pytest.raises(sample.InputError, match=message):
      sample._request(fv)  # noqa: SLF001
  (tmp_path / "adir.gif").mkdir()
  fv(["sample", f"--workdir={tmp_path}", f"--out={tmp_path / 'adir.gif'}", "--prompt=a"])
  with pytest.raises(sample.InputError, match=r"is a directory"):
    sample._request(fv)  # noqa: SLF001


def test_images_that_are_not_rgb_are_refused(tmp_path):
  rgba = np.full((8, 8, 4), 200, np.uint8)
  rgba[..., 3] = 255
  iio.imwrite(tmp_path / "opaque.png", rgba)
  rgba[0, 0, 3] = 10
  iio.imwrite(tmp_path / "transparent.png", rgba)
  (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
  _, inputs = _request(tmp_path, "--prompt=a", "--mode=i2v", f"--image={tmp_path / 'opaque.png'}")
  assert inputs["image"].shape == (1, 8, 8, 3)
  with pytest.raises(sample.InputError, match=r"transparent pixels \(RGBA\); expected RGB"):
    _request(tmp_path, "--prompt=a", "--mode=i2v", f"--image={tmp_path / 'transparent.png'}")
  with pytest.raises(sample.InputError, match=r"corrupt.png' is not a readable image or video"):
    _request(tmp_path, "--prompt=a", "--mode=i2v", f"--image={tmp_path / 'corrupt.png'}")


def test_workdirs_that_cannot_be_sampled(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(checkpointing.NoCheckpointError, match=r"file' is a file, not a vdit workdir"):
    sampling.load(str(tmp_path / "file"))
  (tmp_path / "garbage").mkdir()
  (tmp_path / "garbage" / "config.json").write_text("{not json")
  with pytest.raises(checkpointing.NoCheckpointError, match=r"config.json is damaged"):
    sampling.load(str(tmp_path / "garbage"))
  (tmp_path / "vit").mkdir()
  (tmp_path / "vit" / "config.json").write_text(json.dumps({"task": "classification"}))
  with pytest.raises(sampling.InputError, match=r"task='classification' run; vdit.sample"):
    sampling.load(str(tmp_path / "vit"))


def test_sampling_memory_is_estimated_before_allocating(monkeypatch):
  sampler = sampling.Sampler(config=configs.load("tiny"), params=None)
  small, large = sampler.memory_estimate(2, 4096), sampler.memory_estimate(2, 8192)
  assert 3.5 * small < large < 4 * small  # dense attention: quadratic in the tokens
  monkeypatch.setattr(sampling, "_available_bytes", lambda: 4 * 2**30)
  sampler.check_memory(2, 384)  # the demo's size fits in 4 GiB
  with pytest.raises(sampling.InputError, match=r"33,554,432 tokens need about .* GiB .* at most"):
    sampler.check_memory(2, 64 // 2 * 4096 // 4 * 4096 // 4)
  fits = int(
    re.search(r"at most ([\d,]+) tokens", _message(sampler, 10**6)).group(1).replace(",", "")
  )
  assert sampler.memory_estimate(2, fits) <= 4 * 2**30 < sampler.memory_estimate(2, fits + 1)


def _message(sampler, length):
  with pytest.raises(sampling.InputError) as e:
    sampler.check_memory(2, length)
  return str(e.value)


def test_media_modes_keep_the_given_size():
  sampler = sampling.Sampler(config=configs.load("tiny"), params=None)
  clip = np.zeros((4, 22, 37, 3), np.uint8)
  assert sampler._size({}, like=clip)[:2] == (22, 37)  # noqa: SLF001 (any size)
  assert sampler._size({"height": 16}, like=clip)[:2] == (16, 37)  # noqa: SLF001
  s = sampler.config.sample
  assert sampler._size({})[:2] == (s.height, s.width)  # noqa: SLF001 (t2v: the config's)


@pytest.fixture(scope="module")
def untrained():
  """A small pixel-space sampler with random (off adaLN-Zero) params: patches (2, 4, 4)."""
  c = configs.load("tiny")
  narrow = dict(width=32, depth=1, num_heads=2, text_width=32, text_heads=2)
  configs.override(c, **{f"model.{k}": v for k, v in narrow.items()})
  model = models.build(c)
  params = nn.unbox(jax.jit(lambda r: model.init(r, *models.dummy_inputs(c)))(jax.random.key(0)))
  return sampling.Sampler(config=c, params=configs.off_zero_init(params["params"]), model=model)


def test_any_size_is_generated_on_a_canvas_of_whole_patches_and_cropped(untrained):
  """7 frames of 10×13 with (2, 4, 4) patches: every mode generates on the 8×12×16 canvas and
  returns exactly the requested size, the given frames bit for bit where they were placed."""
  s, prompt = untrained, ["a red circle moving right"]
  opts = dict(height=10, width=13, steps=2)
  clip = np.random.default_rng(0).integers(0, 256, (5, 10, 13, 3), np.uint8)
  assert s.canvas(7, 10, 13) == (8, 12, 16) and s.grid(7, 10, 13) == (4, 3, 4)
  # Text to video: the canvas sample, cropped (same noise, same rows).
  t2v = s.generate(prompt, num_frames=7, **opts)
  whole = s.generate(prompt, num_frames=8, height=12, width=16, steps=2)
  assert t2v.shape == (1, 7, 10, 13, 3)
  np.testing.assert_array_equal(t2v, whole[:, :7, :10, :13])
  assert s.text_to_image(prompt, **opts).shape == (1, 1, 10, 13, 3)
  i2v = s.image_to_video(prompt, clip[0], num_frames=7, **opts)
  assert i2v.shape == (1, 7, 10, 13, 3)
  np.testing.assert_array_equal(i2v[0, :2], clip[[0, 0]])  # the image, a still patch-frame
  fwd = s.extend(prompt, clip[:4], num_frames=7, **opts)
  np.testing.assert_array_equal(fwd[0, :4], clip[:4])  # given first, the canvas's 8th dropped
  bwd = s.extend(prompt, clip[:4], direction="backward", num_frames=7, **opts)
  np.testing.assert_array_equal(bwd[0, 3:], clip[:4])  # given last, the canvas's 1st dropped
  mid = s.interpolate(prompt, clip[:2], clip[2:4], num_frames=7, **opts)
  np.testing.assert_array_equal(mid[0, :2], clip[:2])
  np.testing.assert_array_equal(mid[0, 5:], clip[2:4])  # a generated frame dropped before it
  loop = s.loop(prompt, image=clip[0], num_frames=7, **opts)
  assert loop.shape == (1, 7, 10, 13, 3)
  np.testing.assert_array_equal(loop[0, :2], clip[[0, 0]])
  edit = s.edit(prompt, clip, strength=0.5, **opts)
  assert edit.shape == (1, 5, 10, 13, 3)  # all 5 frames: padded in time, not cut
  for video in (t2v, i2v, fwd, bwd, mid, loop, edit):
    assert video.dtype == np.uint8
  with pytest.raises(sampling.InputError, match=r"num_frames=4 leaves nothing to generate"):
    s.extend(prompt, clip[:4], num_frames=4, **opts)
  with pytest.raises(sampling.InputError, match=r"num_frames=0 must be ≥ 1"):
    s.generate(prompt, num_frames=0, **opts)
