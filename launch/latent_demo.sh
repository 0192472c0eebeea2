#!/usr/bin/env bash
# The tiny text-to-video demo in latent space, on CPU (the README's first command runs it):
# train a per-frame autoencoder, encode the `shapes` splits to latents once, train VideoDiT on
# the latents, then sample and evaluate it (videos decoded to pixels).
#
#   bash launch/latent_demo.sh [RUNS_DIR=runs/shapes] [PYTHON=python]
#
# Steps (docs/recipe.md, "The latent demo"; docs/models.md, "Latent space"):
#   1. autoencoder  configs/vae/video.py:tiny,frames        → RUNS/autoencoder (PSNR/SSIM, stats)
#   2. latents      vdit.tools.encode_latents, both splits  → RUNS/latents/{train,validation}
#   3. VideoDiT     configs/vdit/shapes.py:tiny,latent=…,latents=… → RUNS (samples/, eval/)
# Each step is skipped when its output is complete (a finished run / a latents meta.json), so
# an interrupted demo resumes where it stopped. Extra arguments go to step 3 (config overrides);
# $AUTOENCODER_ARGS and $LATENTS_ARGS to steps 1 and 2 (tests/test_latent_path.py shrinks all three).
#
# Aligned latents (docs/recipe.md, rows VA and SMVA): ALIGN_STEPS=N first trains the video
# captioner (configs/caption/video.py:tiny, N steps, $CAPTIONER_ARGS) → RUNS/captioner and aligns
# the autoencoder's latents to its features. VARIANT=small trains VideoDiT's `:small` (about an
# hour) instead of the demo's `:tiny`. `:small` on latents aligned to a 4,000-step captioner:
#   ALIGN_STEPS=4000 VARIANT=small bash launch/latent_demo.sh runs/aligned_small
set -euo pipefail
RUNS="${1:-runs/shapes}"
shift || true
PY="${PYTHON:-python}"
VARIANT="${VARIANT:-tiny}"
ALIGN=()
if [[ "${ALIGN_STEPS:-0}" -gt 0 ]]; then
  "$PY" -m vdit.main --config=configs/caption/video.py:tiny --workdir="$RUNS/captioner" \
    --config.total_steps="$ALIGN_STEPS" ${CAPTIONER_ARGS:-}
  ALIGN=(--config.loss.align_encoder="$RUNS/captioner" --config.model.align_dim=96)
fi

"$PY" -m vdit.main --config=configs/vae/video.py:tiny,frames --workdir="$RUNS/autoencoder" \
  ${ALIGN[@]+"${ALIGN[@]}"} ${AUTOENCODER_ARGS:-}

if [[ ! -f "$RUNS/latents/validation/meta.json" ]]; then
  # Videos are shrunk (in pixels) to a longer side of 48 before encoding: the demo's sizes.
  "$PY" -m vdit.tools.encode_latents --autoencoder="$RUNS/autoencoder" --dataset=shapes \
    --dataset_config=tiny --split=train,validation --max_side=48 --out="$RUNS/latents" \
    ${LATENTS_ARGS:-}
fi

"$PY" -m vdit.main --workdir="$RUNS" \
  --config="configs/vdit/shapes.py:$VARIANT,latent=$RUNS/autoencoder,latents=$RUNS/latents" "$@"
echo "samples: $RUNS/samples/  evaluations: $RUNS/eval/"
