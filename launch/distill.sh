#!/usr/bin/env bash
# Progressive distillation of a trained VideoDiT run (Salimans & Ho 2022, guidance folded in as
# Meng et al. 2023): each round's student takes one Euler step where its teacher took two guided
# ones, and is the next round's teacher (docs/sampling.md, "Few steps"):
#
#   CONFIG="configs/vdit/shapes.py:small,latent=RUNS/autoencoder,latents=RUNS/latents" \
#     bash launch/distill.sh RUNS RUNS/distilled [config overrides...]
#
# CONFIG is the teacher's own config (the student is the same model); rounds go to
# OUT/steps8, OUT/steps4, ... ($STEPS, default "8 4 2 1": from a 16-step teacher; with
# SUBSTEPS=4 each student step learns 4 teacher steps: STEPS="4 1" goes 16 → 4 → 1; with
# SUBSTEPS=1 STEPS=32 one round learns the guided velocity on the 32-step grid: guidance
# distillation, sampled at 1, 2, 4, … 32 steps with one model call a step). Each round
# ends with the config's evals at its own number of steps, without guidance. A finished round
# is skipped (its run is complete), so an interrupted distillation resumes where it stopped.
set -euo pipefail
TEACHER="$1"
OUT="$2"
shift 2
PY="${PYTHON:-python}"
: "${CONFIG:?set CONFIG to the config the teacher was trained with (see above)}"
for n in ${STEPS:-8 4 2 1}; do
  "$PY" -m vdit.main --workdir="$OUT/steps$n" \
    --config="$CONFIG,distill=$TEACHER,distill_steps=$n,distill_substeps=${SUBSTEPS:-2}" "$@"
  TEACHER="$OUT/steps$n"
done
echo "distilled samplers: $OUT/steps*/ (eval/, samples/)"
