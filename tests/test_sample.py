"""`python -m vdit.sample`: every mode from a trained tiny checkpoint writes the requested file.

One real (tiny) training run per module, then the CLI in subprocesses (steps=2, tiny sizes).
The conditioned modes whose given frames must come out unchanged are in test_conditioning.py.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests import configs
from vdit import media, train

PT = 2  # patch-frames of the shapes config: patch_size (2, 4, 4)


def train_tiny(workdir: str, data_dir: str) -> str:
  """A 2-step checkpoint of the small shapes config (the demo config, shrunk)."""
  # Velocity prediction and a mild time shift: an untrained velocity model leaves a lightly
  # noised input nearly as it is, so "low SDEdit strength stays near the input" is checkable
  # (an untrained x0-predicting model would pull everything to its constant output).
  overrides = {"diffusion.flow_prediction": "velocity", "diffusion.shift_base_tokens": 128}
  config = configs.small(data_dir, total_steps=2, **overrides)
  train.train_and_evaluate(config, workdir)
  return workdir


def run_sample(workdir: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "vdit.sample", f"--workdir={workdir}", "--steps=2", *args],
    capture_output=True,
    text=True,
    cwd=configs.REPO,
    timeout=timeout,
  )


def read_npz(path: str) -> tuple[np.ndarray, dict]:
  with np.load(path) as f:
    return np.asarray(f["frames"]), json.loads(str(f["metadata"]))


def random_frames(shape, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def check_ok(out: subprocess.CompletedProcess, path: str) -> None:
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == [path]


def check_error(out: subprocess.CompletedProcess, message: str) -> None:
  """One line `error: ...` on stderr (after any log lines), no traceback, non-zero exit."""
  assert out.returncode != 0
  assert "Traceback" not in out.stderr
  lines = [x for x in out.stderr.splitlines() if x.startswith("error:")]
  assert len(lines) == 1 and message in lines[0], out.stderr[-2000:]


@pytest.mark.slow
def test_cli_modes_write_the_requested_files(data_dir, tmp_path):
  # Flag errors fail before loading a checkpoint.
  out = run_sample(str(tmp_path), "--mode=i2v", "--prompt=x", f"--out={tmp_path}/a.gif")
  check_error(out, "--mode=i2v needs --image")

  workdir = train_tiny(str(tmp_path / "run"), data_dir)
  video = random_frames((5, 12, 20, 3))  # 5 frames, another size: cropped + resized
  np.savez(tmp_path / "in.npz", frames=video)
  image = random_frames((16, 24, 3), seed=1)
  import imageio.v3 as iio  # noqa: PLC0415

  iio.imwrite(tmp_path / "key.png", image)

  # t2v as GIF at a size never trained on.
  gif = str(tmp_path / "t2v.gif")
  out = run_sample(
    workdir,
    "--prompt=a red circle",
    *"--num_frames=6 --height=8 --width=12".split(),
    f"--out={gif}",
  )
  check_ok(out, gif)
  assert media.read_video(gif).shape == (6, 8, 12, 3)

  # The same t2v with the video's 24 tokens split over 8 devices (`--mesh`): the same video.
  size = ["--prompt=a red circle", *"--num_frames=6 --height=8 --width=12".split()]
  one, seq8 = str(tmp_path / "one.npz"), str(tmp_path / "seq8.npz")
  check_ok(run_sample(workdir, *size, f"--out={one}"), one)
  check_ok(run_sample(workdir, *size, "--mesh=sequence:8", f"--out={seq8}"), seq8)
  (frames_one, _), (frames_seq8, meta) = read_npz(one), read_npz(seq8)
  assert meta["mesh"] == "sequence:8" and frames_seq8.shape == (6, 8, 12, 3)
  assert np.abs(frames_seq8.astype(int) - frames_one).max() <= 1

  # t2i as MP4: one frame; the heun sampler and a guidance interval are accepted.
  mp4 = str(tmp_path / "t2i.mp4")
  flags = "--mode=t2i --height=16 --width=8 --sampler=heun --guidance_interval=0.1,0.9"
  out = run_sample(workdir, "--prompt=a blue square", *flags.split(), f"--out={mp4}")
  check_ok(out, mp4)
  assert media.read_video(mp4).shape == (1, 16, 8, 3)

  # edit (SDEdit) as NPZ: the video's length (all 5 frames, on a canvas of 6), the requested size,
  # and at a low strength the (resized) input survives: a sample ignoring it would be ~N(0, 1)
  # noise clipped to [−1, 1], ~95 uint8 levels from this uniform-random input on average.
  npz = str(tmp_path / "edit.npz")
  flags = f"--mode=edit --video={tmp_path}/in.npz --strength=0.15 --height=16 --width=24"
  out = run_sample(workdir, "--prompt=a green circle", *flags.split(), f"--out={npz}")
  check_ok(out, npz)
  assert "resized to 16x24" in out.stderr and "frames cut to" not in out.stderr
  frames, meta = read_npz(npz)
  assert frames.shape == (5, 16, 24, 3)
  assert meta["mode"] == "edit" and meta["strength"] == 0.15 and meta["sampler"] == "euler"
  from vdit.diffusion import given_frames  # noqa: PLC0415

  given = media.to_uint8(given_frames.fit_size(video, 16, 24, "video"))
  assert np.abs(frames.astype(float) - given).mean() < 40

  # loop with a keyframe: the first patch-frame is the image, num_frames frames in all.
  npz = str(tmp_path / "loop.npz")
  flags = f"--mode=loop --image={tmp_path}/key.png --num_frames=6 --height=16 --width=24"
  out = run_sample(workdir, "--prompt=a yellow circle moving up", *flags.split(), f"--out={npz}")
  check_ok(out, npz)
  frames, meta = read_npz(npz)
  assert frames.shape == (6, 16, 24, 3) and meta["mode"] == "loop"
  np.testing.assert_array_equal(frames[:PT], np.broadcast_to(image, (PT, 16, 24, 3)))

  # Requests that cannot work: one line each, after loading the checkpoint.
  flags = f"--mode=extend --video={tmp_path}/in.npz --num_frames=4 --out={tmp_path}/e.gif"
  out = run_sample(workdir, "--prompt=x", *flags.split())
  check_error(out, "num_frames=4 leaves nothing to generate after the 4 given frames")
