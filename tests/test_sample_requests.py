"""Bad sampling requests fail before any compute with one line naming the value (issue 14,
"Sampling"): the real flag definitions and the real request check, in process."""

import json
import re

import imageio.v3 as iio
import numpy as np
import pytest
from absl import flags

from tests import configs
from vdit import checkpointing, media, sample, sampling


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
  assert inputs == {
    **dict(image=None, video=None, video2=None, keyframes=None, frames=None, mask=None)
  }


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
  # A class-conditional DiT run: its own `sample` section, the task named first.
  (tmp_path / "dit").mkdir()
  config = {"task": "image_diffusion", "sample": {"per_class": 8, "steps": 50}}
  (tmp_path / "dit" / "config.json").write_text(json.dumps(config))
  with pytest.raises(sampling.InputError, match=r"task='image_diffusion' run; vdit.sample"):
    sampling.load(str(tmp_path / "dit"))


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
  c, model, params = configs.untrained_narrow()
  return sampling.Sampler(config=c, params=params, model=model)


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


def test_keyframes_come_back_bit_for_bit_where_they_were_placed(untrained):
  """Keyframes anywhere, at a size off the patch grid (15 frames of 10×13, patches (2, 4, 4),
  canvas 16×12×16): an image at 0, a clip at 6, an image at an odd index (13: it fills the
  patch-frame 12–13 as a still); the frames between are generated."""
  s, prompt = untrained, ["a red circle moving right"]
  opts = dict(height=10, width=13, steps=2)
  rng = np.random.default_rng(1)
  img0, img2 = rng.integers(0, 256, (2, 10, 13, 3), np.uint8)
  clip = rng.integers(0, 256, (4, 10, 13, 3), np.uint8)
  out = s.keyframes(prompt, [(clip, 6), (img0, 0), (img2[None], 13)], num_frames=15, **opts)
  assert out.shape == (1, 15, 10, 13, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[0, :2], img0[None].repeat(2, 0))  # a still patch-frame
  np.testing.assert_array_equal(out[0, 6:10], clip)
  np.testing.assert_array_equal(out[0, 12:14], img2[None].repeat(2, 0))
  # The keyframes condition the generated frames (the same seed without them differs there).
  t2v = s.generate(prompt, num_frames=15, **opts)
  assert not np.array_equal(out[0, [2, 3, 4, 5, 10, 11, 14]], t2v[0, [2, 3, 4, 5, 10, 11, 14]])
  # The default length ends with the last keyframe's patch-frame (at least the config's 8).
  assert s.keyframes(prompt, [(img0, 0), (img2, 23)], **opts).shape[1] == 24
  assert s.keyframes(prompt, [(img0, 0)], **opts).shape[1] == s.config.sample.num_frames


@pytest.mark.parametrize(
  "keyframes,num_frames,message",
  [
    ([], 8, r"keyframes: none given"),
    ([("img", 0), ("img", 1)], 8, r"keyframe 2 \(@1\) .*overlaps keyframe 1 \(@0\) in frames 0–1"),
    ([("clip", 0), ("img", 2)], 8, r"keyframe 2 \(@2\) .*overlaps keyframe 1 \(@0\) in frames 2–3"),
    ([("clip", 3)], 8, r"keyframe 1 \(@3\): a clip must start at a patch-frame boundary \(a "
     r"multiple of 2\); index 3 is not, the nearest valid are 2 and 4"),
    ([("img", 8)], 8, r"keyframe 1 \(@8\): index 8 is out of range; expected 0 … 7"),
    ([("img", -1)], 8, r"keyframe 1 \(@-1\): the index must be a frame number ≥ 0"),
    ([("clip", 6)], 8, r"4 frames at index 6 run past the last frame 7 .*expected index ≤ 4"),
    ([("clip", 0), ("img", 5)], 6, r"fill all 3 patch-frames of num_frames=6, leaving nothing"),
  ],
)  # fmt: skip
def test_bad_keyframes_are_refused_before_sampling(
  untrained, monkeypatch, keyframes, num_frames, message
):
  monkeypatch.setattr(untrained, "_run", lambda *a, **k: pytest.fail("sampled a bad request"))
  inputs = dict(img=np.zeros((10, 13, 3), np.uint8), clip=np.zeros((4, 10, 13, 3), np.uint8))
  keyframes = [(inputs[kind], index) for kind, index in keyframes]
  with pytest.raises(sampling.InputError, match=message):
    untrained.keyframes(["a"], keyframes, num_frames=num_frames, height=10, width=13, steps=2)


def test_keyframes_flag_is_parsed_and_checked_before_sampling(tmp_path):
  image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8)
  iio.imwrite(tmp_path / "a@b.png", image)  # an "@" in the path: the index is after the last
  np.savez(tmp_path / "clip.npz", frames=np.zeros((4, 8, 8, 3), np.uint8))
  good = f"--keyframes={tmp_path}/a@b.png@0,{tmp_path}/clip.npz@4"
  _, inputs = _request(tmp_path, "--prompt=a", "--mode=keyframes", good)
  (first, i), (clip, j) = inputs["keyframes"]
  np.testing.assert_array_equal(first, image[None])
  assert (i, j, clip.shape) == (0, 4, (4, 8, 8, 3))
  for flag, message in [
    (f"--keyframes={tmp_path}/a@b.png", r"index 'b.png' is not a frame number"),
    ("--keyframes=@3", r"'@3' is not path@index \(e.g. first.png@0\)"),
    (f"--keyframes={tmp_path}/clip.npz@-2", r"index -2 must be ≥ 0"),
    (f"--keyframes={tmp_path}/missing.png@0", r"missing.png' cannot be read"),
  ]:
    with pytest.raises(sample.InputError, match=message):
      _request(tmp_path, "--prompt=a", "--mode=keyframes", flag)
  with pytest.raises(sample.InputError, match=r"--mode=keyframes needs --keyframes=path@index"):
    _request(tmp_path, "--prompt=a", "--mode=keyframes")
  with pytest.raises(sample.InputError, match=r"--keyframes is not used by --mode=t2v"):
    _request(tmp_path, "--prompt=a", good)


class _SubsampleCodec:
  """A per-frame stand-in autoencoder: latents are every 2nd pixel of every 2nd row (fs = 2),
  decoded by repeating them; `ft` frames per latent frame (after the first)."""

  def __init__(self, ft=1):
    self.compression = (ft, 2, 2)

  def encode(self, video):  # [N, F, H, W, 3] in [−1, 1] → [N, 1 + (F − 1)/ft, H/2, W/2, 3]
    ft = self.compression[0]
    return np.concatenate([video[:, :1], video[:, 1::ft]], axis=1)[:, :, ::2, ::2]

  def decode(self, latents):
    return latents.repeat(2, axis=-3).repeat(2, axis=-2)


def test_keyframes_in_latent_space_are_latent_frames(untrained):
  s = sampling.Sampler(untrained.config, untrained.params, untrained.model, _SubsampleCodec())
  rng = np.random.default_rng(2)
  image, clip = (
    rng.integers(0, 256, (10, 14, 3), np.uint8),
    rng.integers(0, 256, (2, 10, 14, 3), np.uint8),
  )
  out = s.keyframes(["a"], [(image, 5), (clip, 2)], num_frames=7, steps=2)  # 5 × 7 latent cells
  assert out.shape == (1, 7, 10, 14, 3) and s.last_latents.shape == (1, 7, 5, 7, 3)
  latents = s.last_latents[0]
  np.testing.assert_array_equal(
    latents[[4, 5]], media.from_uint8(image)[None, ::2, ::2].repeat(2, 0)
  )
  np.testing.assert_array_equal(latents[2:4], media.from_uint8(clip)[:, ::2, ::2])
  s.codec = _SubsampleCodec(ft=4)
  with pytest.raises(sampling.InputError, match=r"per-frame autoencoder .* compresses time 4×"):
    s.keyframes(["a"], [(image, 0)], num_frames=7, steps=2)


def test_retake_inpaint_outpaint_keep_the_given_pixels_bit_for_bit(untrained, caplog):
  """7 frames of 10×13 (patches (2, 4, 4), canvas 8×12×16): the pixels of every token that
  covers only pixels to keep come back bit for bit; those of the others are generated. Patch
  rows are pixels 0–3, 4–7, 8–9 (+ 2 canvas rows), columns 0–3, 4–7, 8–11, 12 (+ 3)."""
  s, prompt = untrained, ["a red circle moving right"]
  clip = np.random.default_rng(3).integers(0, 256, (7, 10, 13, 3), np.uint8)

  def check(out, regen):  # regen: [T, H, W] bool, the pixels expected to be generated
    assert out.shape == (1, 7, 10, 13, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0][~regen], clip[~regen])
    changed = (out[0] != clip).any(-1)
    assert changed[regen].mean() > 0.9  # generated: (almost) every pixel differs from the input

  # Retake frames 3–4: patch-frames 1 (2–3) and 2 (4–5) are generated, frames 0, 1, 6 kept.
  with caplog.at_level("WARNING"):
    retake = s.retake(prompt, clip, frames=(3, 5), steps=2)
  assert "frames=3:5: 260 pixels to keep (over all frames) share a patch" in caplog.text
  regen = np.zeros((7, 10, 13), bool)
  regen[2:6] = True
  check(retake, regen)
  # Inpaint a box of rows 3–6, columns 5–9 in every frame: patch rows 0–1, columns 1–2.
  mask = np.zeros((10, 13), bool)
  mask[3:7, 5:10] = True
  regen = np.zeros((7, 10, 13), bool)
  regen[:, :8, 4:12] = True
  check(s.inpaint(prompt, clip, mask, steps=2), regen)
  # A per-frame 0/1 mask with one pixel, in the last frame's bottom-right corner: the token on
  # the canvas's edge (frame 6 and the canvas frame 7, rows 8–11, columns 12–15) is generated.
  one = np.zeros((7, 10, 13), np.float32)
  one[6, 9, 12] = 1.0
  regen = np.zeros((7, 10, 13), bool)
  regen[6, 8:, 12:] = True
  check(s.inpaint(prompt, clip, one, steps=2), regen)
  # Outpaint 6×9 to 10×13: placed at row 2, column 2; the patches wholly inside it are the
  # rows 4–7, columns 4–7 of the canvas (the video's rows and columns 2–5); the rest generated.
  small = clip[:, :6, :9]
  out = s.outpaint(prompt, small, height=10, width=13, steps=2)
  assert out.shape == (1, 7, 10, 13, 3)
  np.testing.assert_array_equal(out[0, :, 4:8, 4:8], small[:, 2:6, 2:6])
  border = np.ones((10, 13), bool)
  border[4:8, 4:8] = False
  placed = np.pad(small, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
  assert (out[0] != placed).any(-1)[:, border].mean() > 0.9


@pytest.mark.parametrize(
  "mode,args,message",
  [
    ("retake", dict(frames=(4, 4)), r"frames=4:4 is empty; expected a < b"),
    ("retake", dict(frames=(5, 3)), r"frames=5:3 is empty"),
    ("retake", dict(frames=(-1, 3)), r"frames=-1:3 lies outside the video's 7 frames; expected "
     r"0 ≤ a < b ≤ 7"),
    ("retake", dict(frames=(2, 8)), r"frames=2:8 lies outside the video's 7 frames"),
    ("retake", dict(frames=(1, 2, 3)), r"frames=\(1, 2, 3\) is not a pair \(a, b\)"),
    ("retake", dict(frames=(0.5, 2)), r"is not a pair \(a, b\) of frame numbers"),
    ("retake", dict(frames=(0, 7)), r"frames=0:7: nothing to keep"),
    ("retake", dict(frames=(0, 2), num_frames=9), r"num_frames=9 exceeds the video's 7 frames"),
    ("inpaint", dict(mask=np.ones((10, 12), bool)), r"mask: shape \(10, 12\) does not fit the "
     r"video's 7 frames of 10×13; expected \(10, 13\) for every frame or \(7, 10, 13\)"),
    ("inpaint", dict(mask=np.ones((6, 10, 13), bool)), r"shape \(6, 10, 13\) does not fit"),
    ("inpaint", dict(mask=np.full((10, 13), 255)), r"mask: values 255 … 255; expected booleans "
     r"or numbers in \[0, 1\]"),
    ("inpaint", dict(mask=np.zeros((10, 13))), r"mask: nothing to regenerate in the first 7 "
     r"frames"),
    ("outpaint", dict(width=12), r"outpaint: width=12 pixels is smaller than the video's 13 "
     r"pixels; expected ≥ 13"),
    ("outpaint", dict(height=9, width=20), r"height=9 pixels is smaller than the video's 10"),
    ("outpaint", dict(height=10, width=13), r"height=10, width=13 is the video's own size, "
     r"nothing to generate"),
    ("outpaint", {}, r"is the video's own size"),
  ],
)  # fmt: skip
def test_bad_retake_inpaint_outpaint_requests_are_refused_before_any_compute(
  untrained, monkeypatch, mode, args, message
):
  for name in ("_run", "_fit"):  # neither sampled nor encoded
    monkeypatch.setattr(untrained, name, lambda *a, **k: pytest.fail("computed a bad request"))
  clip = np.zeros((7, 10, 13, 3), np.uint8)
  args = dict(args)
  positional = [args.pop("mask")] if mode == "inpaint" else []
  with pytest.raises(sampling.InputError, match=message):
    getattr(untrained, mode)(["a"], clip, *positional, steps=2, **args)


def test_regions_in_latent_space_are_mapped_to_latent_cells_conservatively(untrained):
  """A per-frame stand-in VAE (fs = 2): one masked pixel regenerates its latent cell's token,
  every other token's latents are the encoded video's exactly. With ft = 2, retaking pixel
  frame 3 regenerates latent frame 2 (pixel frames 3–4) and so patch-frame 1 (latent 2–3)."""
  s = sampling.Sampler(untrained.config, untrained.params, untrained.model, _SubsampleCodec())
  video = np.random.default_rng(4).integers(0, 256, (6, 12, 16, 3), np.uint8)
  latents = media.from_uint8(video)[:, ::2, ::2]  # [6, 6, 8, 3]: canvas 6 × 8 × 8
  mask = np.zeros((12, 16), bool)
  mask[9, 9] = True  # latent cell (4, 4): patch row 1 (cells 4–7), column 1 (4–7)
  out = s.inpaint(["a"], video, mask, steps=2)
  assert out.shape == (1, 6, 12, 16, 3)
  got = s.last_latents[0]
  kept = np.ones((6, 8), bool)
  kept[4:, 4:] = False
  np.testing.assert_array_equal(got[:, kept], latents[:, kept])
  assert not np.array_equal(got[:, 4:, 4:], latents[:, 4:, 4:])
  s.codec = _SubsampleCodec(ft=2)
  video = video[:1].repeat(7, 0)  # 1 + 2·3 frames: latent frames 0, 1–2, 3–4, 5–6
  s.retake(["a"], video, frames=(3, 4), steps=2)
  encoded = s.codec.encode(media.from_uint8(video)[None])[0]
  np.testing.assert_array_equal(s.last_latents[0][:2], encoded[:2])
  assert not np.array_equal(s.last_latents[0][2:], encoded[2:])


def test_retake_inpaint_outpaint_flags_are_parsed_and_checked_before_sampling(tmp_path):
  np.savez(tmp_path / "clip.npz", frames=np.zeros((6, 8, 10, 3), np.uint8))
  video = f"--video={tmp_path}/clip.npz"
  png = np.zeros((8, 10, 3), np.uint8)
  png[2:4, 3:5, 1] = 200
  iio.imwrite(tmp_path / "mask.png", png)
  np.save(tmp_path / "mask.npy", np.ones((5, 8, 10), bool))
  np.save(tmp_path / "small.npy", np.ones((8, 8), bool))
  _, inputs = _request(tmp_path, "--prompt=a", "--mode=retake", video, "--frames=2:4")
  assert inputs["frames"] == (2, 4) and inputs["mask"] is None
  _, inputs = _request(
    tmp_path, "--prompt=a", "--mode=inpaint", video, f"--mask={tmp_path}/mask.png"
  )
  want = np.zeros((6, 8, 10), bool)
  want[:, 2:4, 3:5] = True
  np.testing.assert_array_equal(inputs["mask"], want)  # nonzero pixels, in every frame
  _, inputs = _request(tmp_path, "--prompt=a", "--mode=outpaint", video, "--width=16")
  assert inputs["video"].shape == (6, 8, 10, 3)
  for args, message in [
    (["--mode=retake", video], r"--mode=retake needs --frames=4:8"),
    (["--mode=retake", video, "--frames=3"], r"--frames=3 is not a:b \(e.g. 4:8"),
    (["--mode=retake", video, "--frames=a:4"], r"--frames=a:4 is not a:b"),
    (["--mode=retake", video, "--frames=2:9"], r"--frames=2:9 lies outside the video's 6 frames"),
    (["--mode=retake", video, "--frames=4:2"], r"--frames=4:2 is empty"),
    (["--mode=t2v", "--frames=2:4"], r"--frames is not used by --mode=t2v"),
    (["--mode=inpaint", video], r"--mode=inpaint needs --mask=PATH"),
    (["--mode=inpaint", video, f"--mask={tmp_path}/mask.npy"], r"mask.npy'.*shape \(5, 8, 10\) "
     r"does not fit the video's 6 frames of 8×10; expected \(8, 10\) for every frame"),
    (["--mode=inpaint", video, f"--mask={tmp_path}/small.npy"], r"shape \(8, 8\) does not fit"),
    (["--mode=inpaint", video, f"--mask={tmp_path}/none.png"], r"none.png' cannot be read"),
    (["--mode=edit", video, f"--mask={tmp_path}/mask.png"], r"--mask is not used by --mode=edit"),
    (["--mode=outpaint", video], r"--mode=outpaint needs --width and/or --height"),
    (["--mode=outpaint"], r"--mode=outpaint needs --video"),
  ]:  # fmt: skip
    with pytest.raises(sample.InputError, match=message):
      _request(tmp_path, "--prompt=a", *args)


def test_retake_inpaint_outpaint_through_the_cli_flags(untrained, tmp_path):
  """The real flags and `_generate` on the untrained sampler: each mode reaches its method with
  its inputs (the given pixels come back) and records them in the metadata it returns."""
  clip = np.random.default_rng(5).integers(0, 256, (6, 8, 12, 3), np.uint8)
  np.savez(tmp_path / "clip.npz", frames=clip)
  mask = np.zeros((8, 12), np.uint8)
  mask[5, 9] = 255  # patch row 1, column 2
  iio.imwrite(tmp_path / "mask.png", mask)
  video = f"--video={tmp_path}/clip.npz"

  def run(*args):
    fv = flags.FlagValues()
    sample._define_flags(fv)  # noqa: SLF001
    fv(["sample", f"--workdir={tmp_path}", f"--out={tmp_path / 'o.npz'}", "--prompt=a", *args])
    prompts, inputs = sample._request(fv)  # noqa: SLF001
    return sample._generate(untrained, fv, prompts, inputs)  # noqa: SLF001

  videos, used = run("--mode=retake", video, "--frames=2:4", "--steps=2")
  np.testing.assert_array_equal(videos[0, [0, 1, 4, 5]], clip[[0, 1, 4, 5]])
  assert not np.array_equal(videos[0, 2:4], clip[2:4]) and "frames" not in used
  videos, _ = run("--mode=inpaint", video, f"--mask={tmp_path}/mask.png", "--steps=2")
  np.testing.assert_array_equal(videos[0, :, :4], clip[:, :4])
  np.testing.assert_array_equal(videos[0, :, :, :8], clip[:, :, :8])
  assert not np.array_equal(videos[0, :, 4:, 8:], clip[:, 4:, 8:])
  videos, used = run("--mode=outpaint", video, "--width=20", "--steps=2")
  assert videos.shape == (1, 6, 8, 20, 3) and used["width"] == 20
  np.testing.assert_array_equal(videos[0, :, :, 4:16], clip)  # centred, whole patches
