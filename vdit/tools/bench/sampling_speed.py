"""Sampling benchmark: seconds per video vs the number of steps and vs the video size.

  python -m vdit.tools.bench sampling --json [--quick] [--set png='"docs/images/sampling.png"']

The model is configs/vdit/shapes.py:tiny (D=128, 4 blocks, 2.1 M parameters) with *random*
parameters: the time of a sampling loop does not depend on what the weights are. Each point is
`vdit.sampling.Sampler.generate` of one prompt with classifier-free guidance (2 rows: prompt + null
caption), Euler; the first call (compilation, one per size and step count) is timed apart, then
the best (and median) of `repeats` calls (fewer once 20 s are spent on a point) — the best is
the least-disturbed on a shared machine. `vs_steps`: 8×32×48 pixels (384 tokens) at 4..32
steps; `vs_size`: 16 steps at sizes from 64 to 4096 tokens. With `png`, writes the two curves
there.
"""

import math
import statistics
import time

import flax.linen as nn
import jax
import ml_collections

from vdit import models, sampling
from vdit.tools.bench import loader, plots

STEPS = (4, 8, 16, 32)
SIZES = ((8, 16, 16), (8, 32, 32), (8, 32, 48), (16, 32, 48), (16, 64, 64), (16, 64, 128))


def random_sampler(config: ml_collections.ConfigDict) -> sampling.Sampler:
  """A sampler of the config's model with freshly initialised (random) parameters."""
  model = models.build(config)
  variables = model.init(jax.random.PRNGKey(config.seed), *models.dummy_inputs(config))
  return sampling.Sampler(config=config, params=nn.unbox(variables["params"]), model=model)


def time_video(sampler: sampling.Sampler, size, steps: int, repeats: int) -> dict:
  frames, height, width = size
  call = lambda: sampler.generate(
    ["a red circle moving right"], num_frames=frames, height=height, width=width, steps=steps
  )
  start = time.perf_counter()
  call()
  first = time.perf_counter() - start
  times = []
  while len(times) < repeats and sum(times) < 20.0:
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  best = min(times)  # the least-disturbed run on a shared machine
  return {
    "size": list(size),
    "tokens": frames * height * width // math.prod(sampler.patch_size),
    "steps": steps,
    "first_call_s": round(first, 2),  # includes compilation unless already compiled
    "seconds_per_video": round(best, 4),
    "median_s": round(statistics.median(times), 4),
    "seconds_per_step": round(best / steps, 5),
  }


def write_png(path: str, runs: list[dict], labels: list[str] | None = None) -> str:
  """The two curves of one or more runs' `results` (repeat runs show the machine's noise)."""
  labels = labels or [f"run {i + 1}" for i in range(len(runs))]
  fig, (a, b) = plots.subplots(
    2, "tiny VideoDiT (random params), 1 video + guidance, 2-core CPU (loaded)"
  )
  for results, label in zip(runs, labels):
    xs = [r["steps"] for r in results["vs_steps"]]
    a.plot(xs, [r["seconds_per_video"] for r in results["vs_steps"]], "o-", label=label)
    xs = [r["tokens"] for r in results["vs_size"]]
    b.plot(xs, [r["seconds_per_video"] for r in results["vs_size"]], "o-", label=label)
  for r in runs[0]["vs_size"]:
    b.annotate("×".join(map(str, r["size"])), (r["tokens"], r["seconds_per_video"]), fontsize=7)
  a.set(xlabel="sampling steps", ylabel="seconds per video", title="8×32×48 px (384 tokens)")
  a.set_ylim(bottom=0)
  b.set(xlabel="tokens per video (frames·H·W / 32)", ylabel="seconds per video")
  b.set_title("16 steps, by size")
  b.set_xscale("log")
  b.set_yscale("log")
  if len(runs) > 1:
    a.legend(fontsize=8)
  return plots.save(fig, path)


def run(options: dict) -> dict:
  quick = bool(options.get("quick", False))
  repeats = int(options.get("repeats", 1 if quick else 5))
  config = loader.configs(options)["tiny"]
  sampler = random_sampler(config)
  steps = STEPS[:2] if quick else tuple(options.get("steps", STEPS))
  sizes = SIZES[:3] if quick else tuple(tuple(s) for s in options.get("sizes", SIZES))
  out = {
    "model": "configs/vdit/shapes.py:tiny, random params",
    "sampler": sampler.spec.default_sampler,
    "vs_steps": [time_video(sampler, (8, 32, 48), s, repeats) for s in steps],
    "vs_size": [time_video(sampler, size, 16, repeats) for size in sizes],
  }
  if options.get("png"):
    out["png"] = write_png(options["png"], [out])
  return out
