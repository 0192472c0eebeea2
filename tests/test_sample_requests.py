"""Bad sampling requests fail before any compute with one line naming the value (issue 14,
"Sampling"): the real flag definitions and the real request check, in process."""

import json
import re

import imageio.v3 as iio
import numpy as np
import pytest
from absl import flags

from tests import configs
from vdit import checkpointing, sample, sampling


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
  assert sampler._size({}, like=clip)[:2] == (20, 36)  # noqa: SLF001 (whole 4-px patches)
  assert sampler._size({"height": 16}, like=clip)[:2] == (16, 36)  # noqa: SLF001
  s = sampler.config.sample
  assert sampler._size({})[:2] == (s.height, s.width)  # noqa: SLF001 (t2v: the config's)
