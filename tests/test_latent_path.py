"""The latent path end to end: a (tiny, briefly trained) VAE, a dataset encoded with
`vdit.tools.encode_latents`, VideoDiT trained on the latents and a sample decoded back to pixels."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import configs
from vdit import (
  checkpointing,
  config_checks,
  datasets,
  latent_codec,
  media,
  models,
  sampling,
  train,
)
from vdit.data import pipeline
from vdit.evaluators import shapes_scorer, validation
from vdit.tools import encode_latents, probe


@pytest.mark.slow
def test_video_dit_trains_and_samples_in_latent_space(data_dir, tmp_path):
  # 1. The autoencoder: the tiny config, shrunk (1·4 steps, 8 validation examples).
  vae_dir = str(tmp_path / "vae")
  vae = configs.load("tiny", "configs/vae/video.py")
  vae.input.mixture = (("shapes", "test", 1.0),)
  vae.input.data_dir = data_dir
  vae.input.size = (5, 16, 16)
  vae.input.rows_per_batch = 8
  vae.model.channels = (8, 8, 8)  # fs = 4, ft = 2, Z = 8
  vae.total_steps = 2
  vae.log_every_steps = 1
  vae.checkpoint_every_steps = 2
  vae.optimizer.warmup_steps = 1
  train.train_and_evaluate(vae, vae_dir)
  with open(os.path.join(vae_dir, "eval", "2.json")) as f:
    metrics = json.load(f)["autoencoder"]
  # Frames after the first: the reconstruction and the repeat-frame-0 baseline, both finite.
  assert 0 < metrics["psnr_later_frames"] < 100 and 0 < metrics["psnr_copy_first_frame"] < 100

  # 2. Latents of a small split, written by the tool.
  codec = latent_codec.load(vae_dir)
  assert codec.compression == (2, 4, 4) and codec.channels == 8
  out = str(tmp_path / "latents")
  meta = encode_latents.encode_dataset(
    codec, "shapes", "train", out, dataset_config="test", data_dir=data_dir, max_examples=8
  )
  assert meta["examples"] == 8 and meta["channels"] == 8
  source = datasets.data_source("latents", "train", config=out)
  assert len(source) == 8
  ex = source[0]
  assert ex["video"].dtype == np.float32 and ex["video"].shape[-1] == 8
  assert isinstance(ex["caption"], bytes) and ex["caption"]

  # 3. VideoDiT on the latents: the shapes config's latent option, shrunk.
  c = configs.load(f"tiny,latent={vae_dir},latents={out},vae=tiny")
  small = configs.small(data_dir)
  for key in ("width", "depth", "num_heads", "text_width", "text_depth", "text_heads"):
    c.model[key] = small.model[key]
  for key in ("tokens_per_row", "max_tokens_per_example", "rows_per_batch", "text_tokens_per_row"):
    c.input[key] = small.input[key]
  c.input.min_tokens_per_example = c.input.max_tokens_per_example
  c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 2, 1, 2
  c.optimizer.warmup_steps = 1
  c.sample.prompts = ("a red circle moving right",)
  c.sample.steps = 2
  # An evaluator inside the training loop restores the VAE within the run's mesh context.
  c.evals = {
    "adherence": dict(
      type="adherence", every_steps=2, num_prompts=2, size=(2, 4, 4), steps=2,
      dataset_config="tiny",
    ),
    "prompts": dict(type="prompts"),  # `sample.prompts` → samples/<step>/ (+ latents)
  }  # fmt: skip
  workdir_of_nothing = str(tmp_path / "nothing")
  assert c.autoencoder == vae_dir and c.input.dataset == "latents" and c.input.channels == 8
  assert models.patch_dim(c) == 1 * 2 * 2 * 8
  train.validate(c)
  # Latent space is checked before any compute: channels, the VAE that encoded, the meta file.
  for overrides, message in [
    ({"input.channels": 4}, "input.channels=4 but the autoencoder"),
    ({"latent_compression": (1, 4)}, r"latent_compression=\(1, 4\) .* compresses by \(2, 4\)"),
    ({"autoencoder": workdir_of_nothing}, "is not a run directory"),
    ({"autoencoder": None}, "need config.autoencoder"),
    ({"input.dataset_config": str(tmp_path)}, "holds no meta.json"),
  ]:
    with pytest.raises(config_checks.ConfigError, match=message):
      train.validate(configs.override(copy.deepcopy(c), **overrides))
  batch = next(pipeline.make_iterator(c.input, seed=0))
  assert batch["patches"].shape[-1] == 32 and np.abs(batch["patches"]).max() > 0
  workdir = str(tmp_path / "vdit")
  train.train_and_evaluate(c, workdir)

  adherence = json.load(open(os.path.join(workdir, "eval", "2.json")))["adherence"]
  assert 0.0 <= adherence["all"] <= 1.0
  # 4. Samples decode to pixels: T' = 4 latent frames → 1 + 2·3 = 7 frames, 8×12 → 32×48 pixels.
  gifs = sorted(f for f in os.listdir(os.path.join(workdir, "samples", "2")) if f.endswith(".gif"))
  assert gifs == ["a_red_circle_moving_right.gif", "adherence_2x4x4.gif"]  # + the adherence grid
  stored = np.load(os.path.join(workdir, "samples", "2", "a_red_circle_moving_right.npz"))
  assert stored["frames"].shape == (7, 32, 48, 3) and stored["latents"].shape == (4, 8, 12, 8)
  sampler = sampling.load(workdir)
  assert sampler.codec is not None
  # The probes extend clips only as far as training went: 8 latent frames → 1 + 2·7 frames.
  assert probe.trained_frames(sampler) == 1 + 2 * (c.input.max_frames - 1) == 15
  # The x̂0 probes read a latent model's x̂0 decoded: 8×32×32 → 4×8×8 latents → 7×32×32 pixels.
  reader = probe.Probe(sampler)
  assert reader.size == (4, 8, 8) and reader.clip_size == (7, 32, 32)
  combos = probe.combinations(shapes_scorer.Vocabulary.of_dataset("tiny"))[:2]
  (row,) = probe.fidelity(reader, combos, (0.5,))
  assert 0 <= row["x0_shape"] <= 1 and 0 <= row["input_shape"] <= 1
  # At t = 0.5 the input x_t / (1 − t) carries unit noise: far below the autoencoder's PSNR.
  assert np.isfinite(row["x0_psnr"]) and row["input_psnr"] < 20
  videos = sampler.generate(["a blue square"], num_frames=2, height=4, width=6, steps=2)
  assert videos.shape == (1, 3, 16, 24, 3) and videos.dtype == np.uint8
  assert sampler.last_latents.shape == (1, 2, 4, 6, 8)
  # Any size: 3×5 latent cells (not whole (1, 2, 2) patches) are the 4×6 canvas's, cropped.
  canvas = sampler.last_latents
  odd = sampler.generate(["a blue square"], num_frames=2, height=3, width=5, steps=2)
  assert odd.shape == (1, 3, 12, 20, 3)
  np.testing.assert_array_equal(sampler.last_latents, canvas[:, :, :3, :5])
  # Fréchet's real videos of a latent run: the pixel dataset the latents came from, at the
  # decoded size.
  assert sampler.pixel_size(2, 4, 6) == (3, 16, 24)
  real, captions, _ = validation.real_videos(c, 2, [sampler.pixel_size(2, 4, 6)], None, None)
  real = np.stack(real)
  assert real.shape == (2, 3, 16, 24, 3) and real.dtype == np.uint8 and len(captions) == 2

  # 5. Given frames are pixels, encoded by the VAE: they come back as clean latent tokens.
  rng = np.random.default_rng(0)
  clip = rng.integers(0, 256, (5, 16, 24, 3), dtype=np.uint8)  # 5 frames → 3 latent frames
  given = sampler.codec.encode(media.from_uint8(clip)[None])[0]
  opts = dict(height=4, width=6, steps=2)
  videos = sampler.image_to_video(["a blue square"], clip[0], num_frames=3, **opts)
  assert videos.shape == (1, 5, 16, 24, 3)
  np.testing.assert_allclose(sampler.last_latents[0, :1], given[:1], atol=1e-5)
  sampler.extend(["a blue square"], clip, num_frames=4, **opts)
  np.testing.assert_allclose(sampler.last_latents[0, :3], given, atol=1e-5)
  sampler.interpolate(["a blue square"], clip[:3], clip[:3], num_frames=5, **opts)
  np.testing.assert_allclose(sampler.last_latents[0, -2:], given[:2], atol=1e-5)
  edited = sampler.edit(["a red circle"], clip, strength=0.5, **opts)
  assert edited.shape == (1, 5, 16, 24, 3) and sampler.last_latents.shape == (1, 3, 4, 6, 8)


def test_float_video_is_not_rescaled_and_channels_set_patch_dim():
  from vdit.data import transforms  # noqa: PLC0415

  z = np.linspace(-3.0, 3.0, 2 * 4 * 4 * 8, dtype=np.float32).reshape(2, 4, 4, 8)
  np.testing.assert_array_equal(transforms.ToFloat().map({"video": z})["video"], z)
  pixels = np.full((1, 2, 2, 3), 255, np.uint8)
  np.testing.assert_allclose(transforms.ToFloat().map({"video": pixels})["video"], 1.0)
  c = configs.load()
  assert models.patch_dim(c) == 2 * 4 * 4 * 3 and c.autoencoder is None
  c.input.channels = 8
  assert models.patch_dim(c) == 2 * 4 * 4 * 8
  # Importing the encode_latents tool (as this test does) must not define its flags (--out, ...).
  from absl import flags  # noqa: PLC0415

  assert "autoencoder" not in flags.FLAGS and encode_latents.encode_dataset


@pytest.mark.slow
def test_latent_demo_script_runs_end_to_end(data_dir, tmp_path, monkeypatch):
  """`launch/latent_demo.sh` as written (the README's first command), each step shrunk: the
  per-frame autoencoder, the latents of both splits, VideoDiT on them with its evaluations;
  rerunning it skips what is complete. The runs directory is given relative to the working
  directory, as in the README; the trained run samples from any other one."""
  runs = str(tmp_path / "demo")
  env = {
    **os.environ,
    "VDIT_DATA_DIR": data_dir,
    "PYTHON": sys.executable,
    "AUTOENCODER_ARGS": "--config.total_steps=2 --config.log_every_steps=1 "
    "--config.model.channels=(8,8,8) --config.input.size=(2,16,16)",
    "LATENTS_ARGS": "--max_examples=8",
  }
  dit = [f for f in configs.TINY_CLI_FLAGS if not f.startswith("--config=")] + [
    "--config.input.rows_per_batch=8",
    "--config.total_steps=2",
    "--config.sample.steps=2",
    "--config.evals.loss.num_batches=1",
    "--config.evals.adherence.num_prompts=2",
    "--config.evals.adherence.steps=2",
    "--config.evals.adherence.sizes=((2,4,4),)",  # latent units: 2 frames of 16×16 pixels
  ]

  def run():
    return subprocess.run(
      ["bash", "launch/latent_demo.sh", os.path.relpath(runs, configs.REPO), *dit],
      capture_output=True, text=True, cwd=configs.REPO, env=env, timeout=1200,
    )  # fmt: skip

  out = run()
  assert out.returncode == 0, out.stderr[-3000:]
  ae_eval = json.load(open(os.path.join(runs, "autoencoder", "eval", "2.json")))["autoencoder"]
  assert 0 < ae_eval["psnr"] < 100
  for split in ("train", "validation"):
    meta = json.load(open(os.path.join(runs, "latents", split, "meta.json")))
    assert meta["examples"] == 8 and meta["compression"] == [1, 4, 4] and meta["max_side"] == 48
    assert all(max(int(s) for s in k.split("x")[1:]) <= 12 for k in meta["shapes"])
  evals = json.load(open(os.path.join(runs, "eval", "2.json")))
  assert {"loss", "samples", "adherence", "modes"} <= set(evals)
  # The modes' given frames (pixels, for the region modes): back within the 2-step autoencoder's
  # round trip, not exactly.
  assert evals["modes"]["count"] == 2, evals["modes"]
  for mode in ("i2v", "retake", "inpaint", "outpaint"):
    assert 0 < evals["modes"][f"{mode}_given_psnr"] < 99, (mode, evals["modes"])
  stored = np.load(os.path.join(runs, "samples", "2", "a_red_circle_moving_right.npz"))
  assert stored["frames"].shape == (8, 32, 48, 3)  # the config's pixel size, through the decoder
  out = run()  # complete: the autoencoder and the latents are not redone
  assert out.returncode == 0, out.stderr[-3000:]
  assert "latents:" not in out.stderr
  monkeypatch.chdir(tmp_path)  # elsewhere: the run names its autoencoder and latents absolutely
  sampler = sampling.load(runs)
  assert sampler.config.autoencoder == os.path.join(runs, "autoencoder")
  assert sampler.config.input.dataset_config == os.path.join(runs, "latents")
  videos = sampler.generate(["a blue square"], num_frames=2, height=4, width=4, steps=1)
  assert videos.shape == (1, 2, 16, 16, 3)


@pytest.mark.slow
def test_latent_demo_script_aligned_small(data_dir, tmp_path):
  """`ALIGN_STEPS=N VARIANT=small bash launch/latent_demo.sh RUNS` (the README's aligned `:small`),
  each step shrunk: a captioner first, the autoencoder aligned to it, then `:small` VideoDiT."""
  runs = str(tmp_path / "aligned")
  env = {
    **os.environ,
    "VDIT_DATA_DIR": data_dir,
    "PYTHON": sys.executable,
    "ALIGN_STEPS": "2",
    "VARIANT": "small",
    "CAPTIONER_ARGS": "--config.evals={} --config.log_every_steps=1 "
    "--config.input.rows_per_batch=8",
    "AUTOENCODER_ARGS": "--config.total_steps=2 --config.log_every_steps=1 "
    "--config.model.channels=(8,8,8) --config.input.size=(2,16,16)",
    "LATENTS_ARGS": "--max_examples=8",
  }
  shrink = [f for f in configs.TINY_CLI_FLAGS if not f.startswith(("--config=", "--config.evals"))]
  dit = [*shrink, "--config.input.rows_per_batch=8", "--config.total_steps=2", "--config.evals={}"]
  out = subprocess.run(
    ["bash", "launch/latent_demo.sh", runs, *dit],
    capture_output=True, text=True, cwd=configs.REPO, env=env, timeout=1200,
  )  # fmt: skip
  assert out.returncode == 0, out.stderr[-3000:]
  assert checkpointing.latest_step(os.path.join(runs, "captioner")) == 2
  autoencoder = json.load(open(os.path.join(runs, "autoencoder", "config.json")))
  assert autoencoder["loss"]["align_encoder"] == os.path.join(runs, "captioner")
  assert autoencoder["model"]["align_dim"] == 96
  dit_config = json.load(open(os.path.join(runs, "config.json")))
  assert dit_config["sample"]["guidance"] == 6.0  # `:small`'s, not the demo's 3
  assert checkpointing.latest_step(runs) == 2

  # `launch/distill.sh` on that run as written (one round, shrunk): the student starts from the
  # run and samples without guidance.
  out = subprocess.run(
    ["bash", "launch/distill.sh", runs, os.path.join(runs, "distilled"), *dit],
    capture_output=True, text=True, cwd=configs.REPO, timeout=1200,
    env=dict(env, STEPS="1", CONFIG=f"configs/vdit/shapes.py:small,latent={runs}/autoencoder,"
             f"latents={runs}/latents"),
  )  # fmt: skip
  assert out.returncode == 0, out.stderr[-3000:]
  student = os.path.join(runs, "distilled", "steps1")
  config = json.load(open(os.path.join(student, "config.json")))
  assert config["distill"] == {"teacher": runs, "steps": 1, "substeps": 2}
  assert config["init_from"] == runs
  assert config["sample"]["guidance"] == 1.0 and config["diffusion"]["sampler"] == "euler"
  assert checkpointing.latest_step(student) == 2
