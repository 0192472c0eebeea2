"""Long-video memory: `Sampler.long` is flat in the video's length; one window of it all is not.

  python -m vdit.tools.bench long_memory --json [--set workdir='"runs/shapes"']
      [--set multiples='(1, 2, 4, 8)'] [--set png='"docs/images/long_memory.png"']

For N = `multiples` × the window (the run's longest training clip, `input.max_frames`; context
half of it) at the config's sample height and width, one prompt, `steps` steps:

  * the compiled sampling loop's memory (`jax.jit(...).lower(...).compile().memory_analysis()`:
    arguments + outputs + temporaries, nothing run) of what `long` compiles — one window,
    whatever N — beside that of generating the N frames as one window (`generate`), which
    grows with N (attention over all N frames' tokens);
  * generating the N frames with `long`, each N in a fresh process: the peak bytes of the live
    device arrays at the end of each window, the number of compilations of the sampling loop
    (its jit cache entries), the host's resident set (VmRSS) after the first window and its
    largest after any window, and the process's peak RSS (VmHWM: loading and compilation
    included; on CPU the device's buffers are host memory too) after the first window and at
    the end. The host holds one window plus the uint8 video. (Not `ru_maxrss`: Linux carries
    it through `exec`, so a subprocess would report the parent's RSS at the fork if larger.)

`workdir`: a trained run (the latent demo: its latents are decoded window by window); without
one, the pixel-space `configs/vdit/shapes.py:tiny` model with random params (what is measured,
memory, does not depend on the weights).
"""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np

from vdit import config_lib, models, sampling
from vdit.diffusion import objectives
from vdit.tools.bench import plots

MULTIPLES = (1, 2, 4, 8)
MiB = 2**20
PROMPT = ["a red circle moving right"]


def _sampler(options: dict) -> sampling.Sampler:
  if options.get("workdir"):
    return sampling.load(options["workdir"])
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  config = config_lib.load(os.path.join(root, "configs/vdit/shapes.py:tiny"))
  model = models.build(config)
  init = jax.jit(lambda r: model.init(r, *models.dummy_inputs(config)))
  params = nn.unbox(init(jax.random.key(0)))["params"]
  return sampling.Sampler(config=config, params=params, model=model)


def compiled_bytes(s: sampling.Sampler, frames: int, steps: int, given: bool) -> int:
  """Arguments + outputs + temporaries of the compiled sampling loop of one window of `frames`
  frames at the config's sample size (lowered and compiled, not run)."""
  grid = s.grid(frames, s.settings.height, s.settings.width)
  length, patch_dim = int(np.prod(grid)), int(np.prod(s.patch_size)) * s.channels
  max_tokens = s.config.input.max_caption_tokens
  cond = sampling.prompt_rows(PROMPT, grid, s.tokenizer, max_tokens)
  null = sampling.prompt_rows([""], grid, s.tokenizer, max_tokens)
  rows = {k: np.concatenate([cond[k], null[k]]) for k in cond}
  x = np.zeros((1, length, patch_dim), np.float32)
  mask = np.zeros((1, length), bool)
  mask[:, : length // 2] = given
  lowered = objectives.sample_rows.lower(
    *(s.model, s.params, rows, x, x, mask, x, jax.random.key(0), 3.0, (0.0, 1.0)),
    spec=s.spec,
    steps=steps,
    sampler=s.spec.default_sampler,
    strength=1.0,
  )
  m = lowered.compile().memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def generate_once(options: dict) -> dict:
  """`long` of `frames` frames in this process: peak live device bytes over the windows, the
  sampling loop's compilations, peak host RSS."""
  s = _sampler(options)
  window, context = s.long_window()
  live, rss = [], []

  def measure(*_):
    live.append(sum(a.nbytes for a in jax.live_arrays()))
    rss.append((_status_bytes("VmRSS"), _status_bytes("VmHWM")))

  before = objectives.sample_rows._cache_size()  # noqa: SLF001
  video = s.long(
    PROMPT,
    num_frames=int(options["frames"]),
    window=window,
    context=context,
    steps=int(options.get("steps", 4)),
    on_chunk=measure,
  )
  return {
    "frames": int(options["frames"]),
    "windows": len(live),
    "compilations": objectives.sample_rows._cache_size() - before,  # noqa: SLF001
    "live_device_bytes": max(live),
    "host_rss_first_window_bytes": rss[0][0],
    "host_rss_max_window_bytes": max(r for r, _ in rss),
    "host_peak_rss_first_window_bytes": rss[0][1],
    "host_peak_rss_bytes": _status_bytes("VmHWM"),
    "video_bytes": int(video.nbytes),
  }


def _status_bytes(key: str) -> int:
  """The process's resident set now (`VmRSS`) or its peak so far (`VmHWM`), bytes."""
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith(f"{key}:"))


def _in_subprocess(options: dict, frames: int) -> dict:
  args = [sys.executable, "-m", "vdit.tools.bench", "long_memory", "--json"]
  for key, value in dict(options, frames=frames, only_generate=True).items():
    if key not in ("quick", "png", "multiples"):
      args += ["--set", f"{key}={value!r}"]
  out = subprocess.run(args, check=True, capture_output=True, text=True)
  return json.loads(out.stdout)["results"]


def run(options: dict) -> dict:
  if options.get("only_generate"):
    return generate_once(options)
  s = _sampler(options)
  window, context = s.long_window()
  steps = int(options.get("steps", 4))
  multiples = (1, 2) if options.get("quick") else tuple(options.get("multiples", MULTIPLES))
  rows = []
  chunk = compiled_bytes(s, window, steps, given=True)
  for k in multiples:
    n = k * window
    row = {"multiple": k, "frames": n, "long_step_bytes": chunk}
    row["one_window_step_bytes"] = compiled_bytes(s, n, steps, given=False)
    row.update(_in_subprocess(options, n))
    rows.append(row)
  out = {
    "model": options.get("workdir") or "configs/vdit/shapes.py:tiny (random params)",
    "size": [s.settings.height, s.settings.width],
    "window": window,
    "context": context,
    "steps": steps,
    "rows": rows,
  }
  if options.get("png"):
    out["png"] = write_png(options["png"], out)
  return out


def write_png(path: str, results: dict) -> str:
  """Left: compiled sampling-loop memory vs N, `long` (one window) and one window of all N
  frames. Right: measured peak host RSS and live device bytes of `long` vs N."""
  rows = results["rows"]
  n = [r["frames"] for r in rows]
  fig, (left, right) = plots.subplots(
    2, f"long videos: memory vs length (window {results['window']}, context {results['context']})"
  )
  left.plot(n, [r["long_step_bytes"] / MiB for r in rows], "o-", label="long: one window")
  left.plot(
    n, [r["one_window_step_bytes"] / MiB for r in rows], "s--", label="all N frames at once"
  )
  left.set(xlabel="frames N", ylabel="MiB (compiled sampling loop)", xscale="log", ylim=(0, None))
  left.minorticks_off()
  left.set_xticks(n, [str(x) for x in n])
  left.legend(fontsize=8)
  right.plot(n, [r["host_peak_rss_bytes"] / MiB for r in rows], "o-", label="host peak RSS")
  right.plot(
    n, [r["host_rss_max_window_bytes"] / MiB for r in rows], "^-", label="host RSS, windows"
  )
  right.plot(n, [r["live_device_bytes"] / MiB for r in rows], "s-", label="live device arrays")
  right.set(xlabel="frames N", ylabel="MiB (long, measured)", xscale="log")
  right.minorticks_off()
  right.set_xticks(n, [str(x) for x in n])
  right.set_ylim(bottom=0)
  right.legend(fontsize=8)
  return plots.save(fig, path)
