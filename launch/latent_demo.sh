#!/usr/bin/env bash
# The tiny text-to-video demo in latent space, on CPU: train the causal video VAE, encode the
# `shapes` splits to latents once, train VideoDiT on the latents, sample (decoded to pixels).
#
#   bash launch/latent_demo.sh [RUNS_DIR=runs/latent_demo] [PYTHON=python]
#
# Steps (docs/models.md, "Latent space"; measured times in BENCHMARKS.md, "latent demo"):
#   1. VAE        configs/vae/video.py:tiny           → RUNS/vae (PSNR/SSIM in eval/, latent stats)
#   2. latents    vdit.tools.latents, train + validation → RUNS/latents/{train,validation}
#   3. VideoDiT   configs/vdit/shapes.py:tiny,latent=…,latents=… → RUNS/dit (samples/, eval/)
# Each step is skipped when its output is complete (a finished run / a latents meta.json), so
# an interrupted demo resumes where it stopped.
set -euo pipefail
RUNS="${1:-runs/latent_demo}"
PY="${PYTHON:-python}"

"$PY" -m vdit.main --config=configs/vae/video.py:tiny --workdir="$RUNS/vae"  # resumes if stopped

for split in train validation; do
  if [[ ! -f "$RUNS/latents/$split/meta.json" ]]; then
    "$PY" -m vdit.tools.latents --autoencoder="$RUNS/vae" --dataset=shapes --dataset_config=tiny \
      --split="$split" --out="$RUNS/latents/$split"
  fi
done

"$PY" -m vdit.main --workdir="$RUNS/dit" \
  --config="configs/vdit/shapes.py:tiny,latent=$RUNS/vae,latents=$RUNS/latents"
echo "samples: $RUNS/dit/samples/  evaluations: $RUNS/dit/eval/"
