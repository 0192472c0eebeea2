"""`python -m vdit.tools.aot`: compile the real train step for a TPU topology on this CPU."""

import importlib.util
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests import configs
from vdit import sampling, sampling_mesh, sharding
from vdit.diffusion import objectives
from vdit.tools import aot, roofline

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None


def test_missing_libtpu_is_one_clear_error(monkeypatch, capsys):
  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a)
  )
  code = aot.main(["--config=configs/vdit/sora.py:tiny", "--topology=v5e:2x2"])
  err = capsys.readouterr().err
  assert code == 2
  assert "libtpu is not installed" in err and "pip install -e '.[tpu]'" in err
  assert "Traceback" not in err


def test_bad_topology_is_one_clear_error(capsys):
  assert aot.main(["--config=configs/vdit/sora.py:tiny", "--topology=v9x:2x2"]) == 1
  assert "topology='v9x:2x2' is not GENERATION:AxBxC" in capsys.readouterr().err


def test_collective_bytes_reads_compiled_hlo():
  hlo = """
  %all-gather.7 = bf16[64,4,16]{2,1,0:T(4,128)} all-gather(%convert.95), dimensions={0}
  %all-reduce.2 = (f32[64]{0}, /*index=1*/bf16[32,2]{1,0}) all-reduce(%a, %b), to_apply=%add
  %ag-start = (bf16[16,8]{1,0}, bf16[64,8]{1,0}) all-gather-start(%c), dimensions={0}
  %rs = f32[8]{0} reduce-scatter(%d), dimensions={0}
  %add.3 = f32[64,4,16]{2,1,0} add(%e, %f)
  """
  got = roofline.collective_bytes(hlo)
  assert got["all-gather"] == 64 * 4 * 16 * 2 + 64 * 8 * 2
  assert got["all-reduce"] == 64 * 4 + 32 * 2 * 2
  assert got["reduce-scatter"] == 8 * 4 and got["collective-permute"] == 0


def test_model_flops_count_the_scanned_blocks():
  """The MFU numerator: forward matmul FLOPs over the whole depth (not one scan body)."""
  config = configs.load("tiny", "configs/vdit/sora.py")
  d, length, text, r = config.model.width, 256, 64, config.model.mlp_ratio
  # Per video token: self-attention 8·D² + 4·L·D, cross-attention 4·D² + 4·M·D, MLP 4·r·D²;
  # per text token: the cross-attention keys and values 4·D² (FLOPs = 2·MACs); adaLN 12·D² per
  # token, or with shared conditioning per table entry (2·(K + 1) per row).
  per_row = length * ((8 + 4 + 4 * r) * d * d + 4 * length * d + 4 * text * d)
  per_row += text * 4 * d * d
  u = 2 * (config.input.max_examples_per_row + 1)
  for shared, adaln in ((False, length * 12 * d * d), (True, u * 12 * d * d)):
    config.model.shared_conditioning = shared
    config.model.depth = configs.load("tiny", "configs/vdit/sora.py").model.depth
    one = aot.model_flops(config, 2, 256, 64)
    config.model.depth *= 2
    two = aot.model_flops(config, 2, 256, 64)
    blocks = config.model.depth // 2
    assert two - one == pytest.approx(2 * blocks * (per_row + adaln), rel=1e-9), shared


def test_splash_kernel_flops_are_the_attention_products():
  """XLA cannot see inside splash's Pallas kernels: `kernel_flops` is what they compute (QKᵀ and
  AV, dense over the row), and the train step runs them 5.5× under remat (forward, recomputed
  forward, and splash's backward: 7 products against the forward's 2)."""
  config = configs.load("tiny", "configs/vdit/sora.py")
  assert aot.kernel_flops(config, 2, 512, 128) == 0  # `xla`: XLA sees everything
  config.model.attention_backend = "splash"
  d, depth = config.model.width, config.model.depth
  attention = 2 * depth * (4 * 512 * 512 * d + 4 * 512 * 128 * d)  # self + cross, 2 rows
  # dot_flops also counts the kernel's one-block body once (it has no grid): ≤ 1% here.
  assert aot.kernel_flops(config, 2, 512, 128) == pytest.approx(attention, rel=1e-2)
  assert aot.kernel_passes(config) == 5.5
  config.model.remat_policy = "none"
  assert aot.kernel_passes(config) == 4.5


def test_roofline_compute_time_is_the_counted_flops():
  """No floor at the model FLOPs (that made splash configs report a 100% MFU bound)."""
  chip = roofline.CHIPS["v5p"]
  costs = {"flops": 2 * chip.bf16_flops, "bytes_accessed": chip.hbm_bandwidth}
  costs.update({f"{k}_bytes": 0.0 for k in roofline.COLLECTIVES})
  roof = roofline.roofline(costs, chip.bf16_flops, chip, per_chip=1)
  assert roof["compute_seconds"] == 2 and roof["memory_seconds"] == 1
  assert roof["bound_by"] == "compute" and roof["mfu_upper_bound"] == 0.5


@pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu not installed: pip install -e '.[tpu]'")
@pytest.mark.slow
def test_tiny_config_compiles_for_a_v5e_slice(tmp_path):
  """The CLI end to end: JSON with memory vs HBM, FLOPs per device (with the remat recompute,
  so between 1× and 2× the model FLOPs), a roofline bound, and the sampler step."""
  out = tmp_path / "report.json"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "vdit.tools.aot",
      "--config=configs/vdit/sora.py:tiny",
      "--topology=v5e:2x2",
      f"--out={out}",
    ],
    capture_output=True,
    text=True,
    cwd=configs.REPO,
    timeout=1800,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout)
  assert json.loads(out.read_text()) == report
  assert report["topology"]["chips"] == 4 and report["topology"]["chip"] == "TPU v5e"
  assert report["config"]["mesh"] == {"data": 1, "fsdp": 4, "sequence": 1, "tensor": 1}
  train = report["train_step"]
  mem = train["memory_per_device"]
  assert mem["fits"] and 0 < mem["total_gib"] < mem["capacity_gib"] == 16.0
  assert mem["arguments_gib"] > 0 and mem["aliased_gib"] > 0  # the donated state
  assert train["kernel_flops_per_device"] == 0  # `xla` attention: XLA counts all of it
  ratio = train["flops_per_device"] / train["model_flops_per_device"]
  assert 1.0 < ratio < 2.0, ratio  # full remat recomputes the forward once
  roof = train["roofline"]
  assert roof["step_seconds_lower_bound"] == max(roof["compute_seconds"], roof["memory_seconds"])
  assert 0 < roof["mfu_upper_bound"] <= 1
  sampler = report["sampler_step"]
  assert sampler["memory_per_device"]["fits"] and sampler["tokens_per_video"] == 4 * 8 * 12


@pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu not installed: pip install -e '.[tpu]'")
@pytest.mark.slow
def test_one_video_sampler_step_splits_its_tokens_over_sequence(tmp_path):
  """`--sampler_mesh=sequence:4 --sampler_video=…`: one video of 765 tokens, padded to 768 and
  split over 4 chips; each chip computes a quarter of the step (XLA's FLOPs per device ≈ the
  model's forward / 4; a replicated video would cost each chip the whole forward)."""
  out = tmp_path / "report.json"
  proc = subprocess.run(
    [sys.executable, "-m", "vdit.tools.aot", "--config=configs/vdit/sora.py:tiny"]
    + ["--topology=v5e:2x2", "--notrain", "--sampler_mesh=sequence:4"]
    + ["--sampler_video=6x60x68", f"--out={out}"],
    capture_output=True,
    text=True,
    cwd=configs.REPO,
    timeout=1800,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert "train_step" not in report
  sampler = report["sampler_step"]
  assert sampler["videos"] == 1 and sampler["mesh"]["sequence"] == 4
  assert sampler["tokens_per_video"] == 3 * 15 * 17 and sampler["padded_tokens_per_video"] == 768
  assert sampler["memory_per_device"]["fits"]
  ratio = sampler["flops_per_device"] / sampler["model_flops_per_device"]
  assert 1.0 <= ratio < 1.5, ratio
  assert sampler["collectives_gib_per_device"]["all-gather"] > 0  # the keys and values


def test_the_sampler_step_planned_is_the_samplers_step():
  """The step `lower_sampler_step` compiles (here for 8 CPU devices, no libtpu needed) is the
  sampler's: from noise at t = 1, one step of it gives what a 1-step Euler run of the sampler
  gives on the same mesh, with the captions encoded once, guidance and the x0 prediction."""
  config, model, params = configs.untrained_narrow()
  config.sample.guidance = 3.0
  mesh = sampling_mesh.make("sequence:4,tensor:2")
  rules = sharding.rules_from_config(config.sharding_rules)
  lowered, n, length, padded = aot.lower_sampler_step(config, mesh, (4, 16, 16))
  assert (n, length, padded) == (1, 32, 32)  # one video, (2, 4, 4) patches: 2 × 4 × 4 tokens
  sampler = sampling.Sampler(config=config, params=params, model=model, mesh=mesh)
  grid, m = sampler.grid(4, 16, 16), config.input.max_caption_tokens
  cond = sampling.prompt_rows(["a red circle moving right"], grid, sampler.tokenizer, m)
  null = sampling.prompt_rows([""], grid, sampler.tokenizer, m)
  rows = {k: np.concatenate([cond[k], null[k]]) for k in cond}
  noise = np.random.default_rng(0).normal(size=(1, length, 96)).astype(np.float32)
  zeros = np.zeros_like(noise)
  ref = sampling_mesh.sample_rows(
    *(model, sampler.params, mesh, rules, rows, noise, zeros, zeros[..., 0] > 0, zeros),
    *(jax.random.key(0), 3.0, sampler.spec.guidance_interval),
    spec=sampler.spec,
    steps=1,
    sampler="euler",
    strength=1.0,
  )
  keys = ("positions", "segment_ids", "text_tokens", "text_segment_ids", "labels")
  planned = {k: rows[k] for k in keys}
  with sharding.activate(mesh, rules):
    text = objectives.encode_rows(model, sampler.params, planned)
  ones = np.ones((1, length), np.float32)
  out = lowered.compile()(sampler.params, noise, ones, np.float32(1.0), planned, text)
  assert float(np.max(np.abs(np.asarray(out) - noise))) > 0.1  # the step moved x
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)
