"""One video on many devices: sampling with its tokens over `sequence` (heads over `tensor`)
equals sampling on one device, and the arrays really are split."""

import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from tests import configs
from vdit import sampling, sampling_mesh, sharding, tasks
from vdit.diffusion import objectives
from vdit.diffusion.given_frames import InputError

PROMPTS = ["a red circle moving right", "a blue square moving left"]
# 6 frames of 12 × 20 pixels in (2, 4, 4) patches: a 3 × 3 × 5 grid, 45 tokens per video, so
# every mesh below pads the row (to 48) and the padding must change nothing.
SIZE = dict(num_frames=6, height=12, width=20)
TOKENS = 45


@pytest.fixture(scope="module")
def untrained():
  """A small pixel-space config and random (off adaLN-Zero) params."""
  return configs.untrained_narrow()


def sampler_on(untrained, mesh) -> sampling.Sampler:
  config, model, params = untrained
  return sampling.Sampler(config=config, params=params, model=model, mesh=mesh)


def one_device():
  return sampling_mesh.make({"data": 1}, jax.devices()[:1])


def rows_of(sampler: sampling.Sampler, grid) -> tuple[dict, np.ndarray]:
  """The conditional + null rows and the noise of `PROMPTS`, as `Sampler._run` builds them."""
  m = sampler.config.input.max_caption_tokens
  cond = sampling.prompt_rows(PROMPTS, grid, sampler.tokenizer, m)
  null = sampling.prompt_rows([""] * len(PROMPTS), grid, sampler.tokenizer, m)
  rows = {k: np.concatenate([cond[k], null[k]]) for k in cond}
  p = int(np.prod(sampler.patch_size)) * sampler.channels
  noise = np.random.default_rng(0).normal(size=(len(PROMPTS), TOKENS, p)).astype(np.float32)
  return rows, noise


@pytest.mark.parametrize("mesh", ["sequence:8", "sequence:4,tensor:2"])
def test_tokens_are_split_over_sequence_and_the_video_equals_one_device(untrained, mesh):
  one, many = sampler_on(untrained, one_device()), sampler_on(untrained, mesh)
  grid = one.grid(**SIZE)
  assert int(np.prod(grid)) == TOKENS
  rows, noise = rows_of(one, grid)
  zeros = np.zeros_like(noise)
  args = (rows, noise, zeros, zeros[..., 0] > 0, zeros, jax.random.key(1), 3.0, (0.0, 1.0))
  opts = dict(spec=one.spec, steps=3, sampler="euler", strength=1.0)
  ref = sampling_mesh.sample_rows(one.model, one.params, one.mesh, one.rules, *args, **opts)
  x0 = sampling_mesh.sample_rows(many.model, many.params, many.mesh, many.rules, *args, **opts)

  # The denoised tokens come out of the loop split over `sequence`: 48 padded tokens, 6 or 12
  # per device (a replicated fallback would hold all 48 on each).
  seq = dict(many.mesh.shape)["sequence"]
  assert x0.shape == (2, 48, noise.shape[-1]) and ref.shape == (2, TOKENS, noise.shape[-1])
  assert tuple(x0.sharding.spec)[1:2] == ("sequence",), x0.sharding
  assert {s.data.shape[1] for s in x0.addressable_shards} == {48 // seq}
  # Heads over `tensor` where the mesh has it: the params' attention kernels are split.
  query = many.params["blocks_0"]["self_attn"]["query"]["kernel"]
  tensor = dict(many.mesh.shape)["tensor"]
  assert {s.data.shape[-2] for s in query.addressable_shards} == {2 // tensor}
  np.testing.assert_allclose(np.asarray(x0)[:, :TOKENS], np.asarray(ref), atol=2e-5, rtol=1e-5)

  # Inside the loop each device attends its own queries to the whole row: the compiled
  # self-attention logits are [4 rows, heads / tensor, 48 / sequence, 48] per device, and no
  # device holds the full [.., 48, 48] ones.
  placed = sampling_mesh.place(many.mesh, many.rules, *args[:6])
  with sharding.activate(many.mesh, many.rules):
    lowered = objectives.sample_rows.lower(many.model, many.params, *placed, *args[6:], **opts)
  hlo = lowered.compile().as_text()
  assert f"f32[4,{2 // tensor},{48 // seq},48]" in hlo
  assert not re.search(r"f32\[4,\d+,48,48\]", hlo)

  # The library end to end: the same videos (uint8, within one level of float rounding).
  video_one = one.generate(PROMPTS, steps=2, **SIZE)
  video_many = many.generate(PROMPTS, steps=2, **SIZE)
  assert video_many.shape == (2, 6, 12, 20, 3)
  assert np.abs(video_many.astype(int) - video_one).max() <= 1


def test_a_runs_sample_mesh_is_where_its_evaluators_sample(untrained):
  """`sample.mesh` in a run's config: the task's `sampler` predict function (what the
  evaluators sample with) samples on it, and the videos are the one-device ones."""
  config, model, params = untrained
  config = ml_collections.ConfigDict(config.to_dict())
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules_from_config(config.sharding_rules)
  task = tasks.get(config)
  plain = task.predict_fns(config, model, mesh, rules)["sampler"](params)
  config.sample.mesh = "sequence:8"
  on_mesh = task.predict_fns(config, model, mesh, rules)["sampler"](params)
  assert plain.mesh is None and dict(on_mesh.mesh.shape)["sequence"] == 8
  video_one = plain.generate(PROMPTS, steps=2, **SIZE)
  video_many = on_mesh.generate(PROMPTS, steps=2, **SIZE)
  assert np.abs(video_many.astype(int) - video_one).max() <= 1


def test_bad_mesh_requests_are_one_clear_error(untrained):
  with pytest.raises(InputError, match="'seq:8' is not axis:size"):
    sampling_mesh.make("seq:8")
  with pytest.raises(InputError, match="size 'x' of sequence is not an integer"):
    sampling_mesh.make("sequence:x")
  with pytest.raises(InputError, match="needs 4 devices, but 8 are available"):
    sampling_mesh.make("sequence:4")
  assert sampling_mesh.make("") is None and dict(sampling_mesh.make("sequence:-1").shape) == {
    "data": 1,
    "fsdp": 1,
    "sequence": 8,
    "tensor": 1,
  }
  # One video cannot be split over two row shards.
  sampler = sampler_on(untrained, "data:2,sequence:4")
  with pytest.raises(InputError, match="1 video.s. cannot be split over the mesh's 2 row shards"):
    sampler.generate(PROMPTS[:1], steps=1, **SIZE)


def test_cli_mesh_error_is_one_line(tmp_path):
  """`python -m vdit.sample --mesh=…` fails before reading the checkpoint."""
  out = subprocess.run(
    [sys.executable, "-m", "vdit.sample", f"--workdir={tmp_path}", "--prompt=x"]
    + [f"--out={tmp_path}/x.gif", "--mesh=sequence:3"],
    capture_output=True,
    text=True,
    cwd=configs.REPO,
    timeout=300,
  )
  assert out.returncode != 0 and "Traceback" not in out.stderr
  error = "error: sampling mesh: mesh {'data': 1, 'fsdp': 1, 'sequence': 3, 'tensor': 1} needs 3"
  assert f"{error} devices, but 8 are available" in out.stderr.splitlines(), out.stderr
