r"""Adherence of videos generated from short prompts, with and without prompt expansion.

  python -m vdit.tools.expansion_adherence --workdir=runs/shapes_small \
      --expand_prompt=runs/expander [--repeats=6] [--out=expansion.json]

The short prompts are what a user types: "{colour} {shape}" and "a {shape} moving {direction}"
over the dataset's vocabulary (12 + 12 on the tiny `shapes`), each `--repeats` times with its own
seed. Each is expanded by the expansion run (`configs/caption/expand.py`; the seed = its index),
and the video model generates once from the short prompt and once from its expansion, with the
same noise, at the `adherence` eval's size, steps and the run's guidance. Both videos are scored
by the adherence scorer (`vdit.evaluators.shapes_scorer`) on the attributes the *short* prompt
names only (the expansion keeps them; an expansion the scorer cannot parse is scored against the
named attributes alone). Printed and written as JSON: per condition, the share right of each
named attribute, of all of them, and the temporal consistency.
"""

import json

import numpy as np
from absl import app, flags

from vdit import sampling
from vdit.evaluators import shapes_scorer
from vdit.tasks import captioning


def short_prompts(vocab: shapes_scorer.Vocabulary) -> list[tuple[str, dict[str, str]]]:
  """(prompt, the attributes it names) for every distinct short prompt of the vocabulary."""
  out = {}
  for c in vocab.colours:
    for s in vocab.shapes:
      out.setdefault(f"{c} {s}", {"colour": c, "shape": s})
      for d in vocab.directions:
        out.setdefault(f"a {s} moving {d}", {"shape": s, "direction": d})
  return list(out.items())


def _reference(expansion: str, named: dict[str, str]) -> str:
  try:
    shapes_scorer.parse_caption(expansion)
    return expansion
  except ValueError:
    filler = {"colour": "red", "direction": "right", **named}
    return f"a {filler['colour']} {filler['shape']} moving {filler['direction']}"


def measure(sampler, expand, repeats: int = 6, steps: int = 16, size=None) -> dict:
  """{"short": scores, "expanded": scores, "unparsed_expansions": n, "examples": [...]}, with
  `expand(prompts, seed) -> captions` (a `captioning.Expander`'s `expand`); `size` (T, H, W) in
  the model's units, default the run's `adherence` eval's (else its `sample` size)."""
  config = sampler.config
  adherence = config.get("evals", {}).get("adherence", {})
  vocab = shapes_scorer.Vocabulary.of_dataset(adherence.get("dataset_config", "tiny"))
  s = sampler.settings
  t, h, w = size or adherence.get("size") or (s.num_frames, s.height, s.width)
  pairs = [pair for pair in short_prompts(vocab) for _ in range(repeats)]
  prompts, named = [p for p, _ in pairs], [n for _, n in pairs]
  expanded = [expand([p], seed=i)[0] for i, p in enumerate(prompts)]
  refs = [_reference(e, n) for e, n in zip(expanded, named)]
  opts = dict(num_frames=t, height=h, width=w, steps=steps, guidance=s.guidance)
  results = {}
  for condition, given in (("short", prompts), ("expanded", expanded)):
    videos = []
    for i in range(0, len(given), 16):  # batches of 16, each its own seed (the same per pair)
      videos += list(sampler.generate(given[i : i + 16], seed=i, **opts))
    scores = [shapes_scorer.score(v, r, vocab) for v, r in zip(videos, refs)]
    right = [{k: s[f"pred_{k}"] == want for k, want in n.items()} for s, n in zip(scores, named)]
    out = {}
    for k in ("colour", "shape", "direction"):
      values = [r[k] for r in right if k in r]
      out[k], out[f"{k}_count"] = float(np.mean(values)), len(values)
    out["all_named"] = float(np.mean([all(r.values()) for r in right]))
    out["temporal"] = float(np.mean([s["temporal"] for s in scores]))
    results[condition] = out
  results["unparsed_expansions"] = sum(r != e for r, e in zip(refs, expanded))
  results["examples"] = list(zip(prompts, expanded))[:: max(repeats, 1)][:12]
  return results


def _define_flags() -> None:
  """The CLI's flags: defined only when run as a program, so importing this module next to
  another entry point (one process, e.g. the tests) defines no flag twice."""
  flags.DEFINE_string("workdir", None, "A text-to-video run (the video model).")
  flags.DEFINE_string("expand_prompt", None, "A prompt-expansion run.")
  flags.DEFINE_integer("repeats", 6, "Seeds per short prompt.")
  flags.DEFINE_integer("steps", 16, "Sampling steps.")
  flags.DEFINE_string("out", None, "Write the results here as JSON too.")
  flags.mark_flags_as_required(["workdir", "expand_prompt"])


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  sampler = sampling.load(FLAGS.workdir)
  expander = captioning.Expander(FLAGS.expand_prompt)
  results = measure(sampler, expander.expand, FLAGS.repeats, FLAGS.steps)
  text = json.dumps(results, indent=1)
  print(text)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
