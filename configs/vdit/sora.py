r"""Sora-scale text-to-video VideoDiT: ≈1B, ≈3B and ≈8B parameters on long 1080p-class rows.

Plan on a laptop (compile for the TPU pod, print memory / FLOPs / roofline as JSON):
  python -m vdit.tools.aot --config=configs/vdit/sora.py:size=1B --topology=v5p:4x4x4
  python -m vdit.tools.aot --config=configs/vdit/sora.py:size=3B --topology=v5p:4x4x8
  python -m vdit.tools.aot --config=configs/vdit/sora.py:size=8B --topology=v6e:16x16
Train on the pod (every host runs the same command; launch/tpu_vm.sh does this):
  python -m vdit.main --distributed --config=configs/vdit/sora.py:size=8B \
      --workdir=gs://BUCKET/runs/sora8b --config.input.data_dir=gs://BUCKET/tfds
CPU (seconds; what the tests run — the same features at toy size):
  python -m vdit.main --config=configs/vdit/sora.py:tiny --workdir=runs/sora_tiny

Tokens. Rows hold `tokens_per_row` = 32768 spacetime patches: four 1080p latent frames
(1920×1088 pixels in 16×16 patches = 120×68 = 8160 tokens per frame-group of 4 frames), or e.g.
a 4 s 360p clip, or many short clips and images, packed (NaViT). The token count is that of
a 4×8×8 latent autoencoder with 1×2×2 latent patches; until the autoencoder lands the model
reads the equivalent pixel patches (4, 16, 16), P = 3072.

Memory. bf16 activations with fp32 master params (Adam moments and EMA fp32), full
rematerialization per block, FSDP over `fsdp` (params, grads, moments, EMA sharded ZeRO-3
style), Megatron-style tensor parallelism over heads / MLP on `tensor`, splash attention (no
L×L logits, so no `sequence` split is needed at this row length). The meshes below are chosen
so that `vdit.tools.aot` reports a fit with headroom (docs/scale.md has the reports, and the
`xla`-attention alternative). Global batch per update = rows_per_batch × grad_accum_steps rows
(4.2 M tokens at 1B, 8.4 M at 3B and 8B).
"""

import ml_collections

from vdit import config_lib

# width D, depth, heads (head dim 128 / 96 / 128), per size; ≈ 22·D²·depth parameters.
SIZES = {
  "tiny": (64, 2, 4),
  "1B": (1536, 20, 12),
  "3B": (2304, 28, 24),
  "8B": (3584, 28, 28),
}
# Target pod (topology for `vdit.tools.aot`), mesh (data, fsdp, sequence, tensor), global rows
# per step, accumulation steps. Every host loads its own rows, so data × fsdp is a multiple of
# the host count (v5p-128: 16 hosts, v5p-256: 32, v6e-256: 64).
PODS = {
  # tiny: FSDP over every device (1 on a laptop); the tests run it on (1, 2, 2, 2) too.
  "tiny": dict(topology="v5e:2x2", mesh=(1, -1, 1, 1), rows=8, accum=2),
  "1B": dict(topology="v5p:4x4x4", mesh=(1, 32, 1, 2), rows=64, accum=2),  # v5p-128: 64 chips
  "3B": dict(topology="v5p:4x4x8", mesh=(1, 64, 1, 2), rows=128, accum=2),  # v5p-256: 128 chips
  "8B": dict(topology="v6e:16x16", mesh=(1, 64, 1, 4), rows=64, accum=4),  # v6e-256: 256 chips
}


def _shapes_config(arg: str) -> ml_collections.ConfigDict:
  """The base config (configs/vdit/shapes.py)."""
  return config_lib.load_sibling(__file__, "shapes.py", arg)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, size="1B", tiny=False)
  size = "tiny" if arg.tiny else arg.size
  if size not in SIZES:
    raise ValueError(f"size={size!r} is not a Sora config size; expected one of {sorted(SIZES)}")
  width, depth, heads = SIZES[size]
  pod = PODS[size]
  tiny = size == "tiny"
  c = _shapes_config("tiny" if tiny else "variant=S")

  c.total_steps = 20 if tiny else 500_000
  c.log_every_steps = 5 if tiny else 50
  c.checkpoint_every_steps = 10 if tiny else 1_000
  c.aot_topology = pod["topology"]  # the pod this config is planned for (vdit.tools.aot)

  inp = c.input
  if tiny:
    inp.tokens_per_row = 256
    inp.max_tokens_per_example = 192
    inp.text_tokens_per_row = 64
  else:
    inp.patch_size = (4, 16, 16)  # pixels; the token count of a 4×8×8 VAE + 1×2×2 patches
    inp.tokens_per_row = 32_768  # L: four 1080p frame groups (120×68 patches each)
    inp.max_tokens_per_example = 32_768
    inp.max_examples_per_row = 64  # K
    inp.text_tokens_per_row = 2_048  # M
    inp.max_caption_tokens = 128
    inp.max_frames = 128
  inp.rows_per_batch = pod["rows"]

  m = c.model
  m.width, m.depth, m.num_heads = width, depth, heads
  m.text_width = 64 if tiny else 1024
  m.text_depth = 1 if tiny else 4
  m.text_heads = 4 if tiny else 8
  m.remat_policy = "full"  # recompute each block in the backward: activations ≈ block inputs
  m.dtype = "bfloat16"  # compute; params, moments and EMA stay float32
  m.scan_layers = True
  # TPU: block-sparse splash attention (skips the blocks between packed examples and never
  # materializes the L×L logits); the tiny variant runs anywhere with the reference kernel.
  m.attention_backend = "xla" if tiny else "splash"

  opt = c.optimizer
  opt.lr = 1e-3 if tiny else 1e-4
  opt.warmup_steps = 2 if tiny else 10_000
  opt.weight_decay = 0.0 if tiny else 0.01
  opt.grad_accum_steps = pod["accum"]

  data, fsdp, sequence, tensor = pod["mesh"]
  c.mesh = dict(data=data, fsdp=fsdp, sequence=sequence, tensor=tensor)

  s = c.sample
  if tiny:
    s.steps = 4
  else:
    s.num_frames, s.height, s.width = 16, 1088, 1920  # 1080p, 4 frame groups = one full row
  return c
