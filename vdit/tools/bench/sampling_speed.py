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

  python -m vdit.tools.bench sampling_text --json [--quick] [--set text_depths=(0,4)]

`sampling_text`: the same guided sampling with the prompts encoded once before the loop (what
`objectives.sample_rows` does) and with the whole model, text encoder included, called at every
step (the loop before issue 17), timed in alternation on the same inputs, for the tiny config
with `text_depths` encoder blocks; both as one jitted loop and as a Python loop of jitted steps
(`time_text_once`). The ratios are what to read on a shared machine.

  python -m vdit.tools.bench sampling_guidance --json [--quick]

`sampling_guidance`: `Sampler.generate` of one video at guidance 3 (the prompt and its null
row every step) and at guidance 1 (the prompt row alone: how a distilled student samples,
docs/sampling.md "Few steps"), timed in alternation; the ratio is the speed-up.
"""

import functools
import math
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vdit import models, sampling
from vdit.diffusion import objectives
from vdit.tools.bench import loader, plots

STEPS = (4, 8, 16, 32)
SIZES = ((8, 16, 16), (8, 32, 32), (8, 32, 48), (16, 32, 48), (16, 64, 64), (16, 64, 128))
TEXT_DEPTHS = (0, 4)  # the tiny config's text front end (no encoder blocks), and 4 blocks
TEXT_SIZES = ((8, 16, 16), (8, 32, 48))


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


@functools.partial(jax.jit, static_argnames=("model", "spec", "steps", "once"))
def _guided_loop(model, params, rows, noise, *, spec, steps, once):
  """Text-to-video sampling of noise [N, L, P] over `rows` [2N, ...] (prompts, then null
  captions) with guidance 3, as one jitted loop: the prompts encoded once before the loop
  (`once`, as `objectives.sample_rows`), or by the whole model call at every step."""
  n = noise.shape[0]
  text = objectives.encode_rows(model, params, rows) if once else None
  return objectives.sample(
    spec,
    objectives.guided_model(model, params, rows, 3.0, (0.0, 1.0), text),
    noise,
    steps,
    shapes=rows["shapes"][:n],
    segment_ids=rows["segment_ids"][:n],
  )


@functools.partial(jax.jit, static_argnames=("model",))
def _guided_step(model, params, rows, x, t, text):
  """One guided model call on x [N, L, P] at t [N, L]: the denoiser on encoded `text`, or the
  whole model (text encoder included) when `text` is None."""
  return objectives.guided_model(model, params, rows, 3.0, (0.0, 1.0), text)(x, t)


def _paired_times(calls: dict, repeats: int) -> dict[str, list[float]]:
  """Seconds of each call (after one untimed, compiling call), `repeats` rounds of all of them
  back to back, so that a pair of one round shares the machine's load."""
  for call in calls.values():
    jax.block_until_ready(call())
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - start)
  return times


def time_text_once(sampler: sampling.Sampler, size, steps: int, repeats: int) -> dict:
  """One video (+ its null row) of `size` pixels, `steps` Euler steps, two ways each: as one
  jitted loop (`loop_*`, as the sampler runs) and as a Python loop of jitted model calls
  (`step_*`, where nothing can move the encoder out of the loop). Ratios are encoded at every
  step / encoded once, the median over rounds (> 1: encoding once is faster)."""
  grid = sampler.grid(*size)
  max_tokens = sampler.config.input.max_caption_tokens
  cond, null = (
    sampling.prompt_rows(p, grid, sampler.tokenizer, max_tokens)
    for p in (["a red circle moving right"], [""])
  )
  rows = {k: jnp.concatenate([cond[k], null[k]]) for k in cond}
  shape = (1, math.prod(grid), models.patch_dim(sampler.config))
  noise = jax.random.normal(jax.random.PRNGKey(0), shape)
  t = jnp.full(shape[:2], 0.5)
  model, params, spec = sampler.model, sampler.params, sampler.spec
  text = jax.jit(objectives.encode_rows, static_argnums=0)(model, params, rows)

  def steps_of(text):
    return lambda: [_guided_step(model, params, rows, noise, t, text) for _ in range(steps)][-1]

  calls = {
    "loop_every_step": lambda: _guided_loop(
      model, params, rows, noise, spec=spec, steps=steps, once=False
    ),
    "loop_once": lambda: _guided_loop(
      model, params, rows, noise, spec=spec, steps=steps, once=True
    ),
    "step_every_step": steps_of(None),
    "step_once": steps_of(text),
  }
  times = _paired_times(calls, repeats)
  out = {"size": list(size), "tokens": math.prod(grid), "text_tokens": max_tokens, "steps": steps}
  for kind in ("loop", "step"):
    every, once = times[f"{kind}_every_step"], times[f"{kind}_once"]
    ratios = [a / b for a, b in zip(every, once, strict=True)]
    out[kind] = {
      "every_step_s": round(min(every), 4),  # best of the rounds
      "once_s": round(min(once), 4),
      "ratio": round(statistics.median(ratios), 3),
      "ratios": [round(r, 3) for r in ratios],
    }
  return out


def text_once(options: dict) -> dict:
  quick = bool(options.get("quick", False))
  repeats = int(options.get("repeats", 2 if quick else 9))
  steps = int(options.get("steps", 16))
  sizes = TEXT_SIZES[:1] if quick else tuple(tuple(s) for s in options.get("sizes", TEXT_SIZES))
  out = {"model": "configs/vdit/shapes.py:tiny, random params", "runs": []}
  for depth in options.get("text_depths", TEXT_DEPTHS):
    config = loader.configs(options)["tiny"]
    config.model.text_depth = depth
    sampler = random_sampler(config)
    for size in sizes:
      out["runs"].append({"text_depth": depth, **time_text_once(sampler, size, steps, repeats)})
  return out


def guidance_one(options: dict) -> dict:
  """Seconds per video at guidance 3 and 1, paired (`_paired_times`), and their ratio."""
  quick = bool(options.get("quick", False))
  repeats = int(options.get("repeats", 2 if quick else 5))
  sampler = random_sampler(loader.configs(options)["tiny"])
  sizes = ((8, 32, 48),) if quick else ((8, 32, 48), (16, 64, 64))
  out = {"model": "configs/vdit/shapes.py:tiny, random params", "points": []}
  for size in sizes:
    frames, height, width = size

    def call(guidance, size=size):
      return lambda: sampler.generate(
        ["a red circle moving right"], num_frames=size[0], height=size[1], width=size[2],
        steps=16, guidance=guidance,
      )  # fmt: skip

    times = _paired_times({"guided": call(3.0), "unguided": call(1.0)}, repeats)
    best = {name: min(t) for name, t in times.items()}
    out["points"].append({
      "size": list(size),
      "tokens": frames * height * width // math.prod(sampler.patch_size),
      "steps": 16,
      "guided_s": round(best["guided"], 4),
      "unguided_s": round(best["unguided"], 4),
      "speedup": round(best["guided"] / best["unguided"], 2),
    })  # fmt: skip
  return out
