r"""Re-captioning a folder of videos with a trained captioner (the Sora report's re-captioning).

  python -m vdit.tools.recaption --captioner=runs/captioner --dataset=folder \
      --dataset_config=my_videos [--beams=4]

Every video and image of the folder (`vdit.datasets.folder`, all splits) is read as the
captioner's validation examples are (its `input` section: first clip, token budget, patches;
`transforms.example_transforms(train=False)`), one example per row, and decoded (beam search,
or greedy with --beams=1). The captions go to `captions.jsonl` in the folder when it has none,
otherwise to `captions.recaptioned.jsonl` beside it: the original captions are never
overwritten, and an existing output is an error. Each line keeps the original entry's `split`
and `label` and adds `"recaptioned": true`. Train on the new captions by pointing
`input.dataset_config` at the folder (after moving the original `captions.jsonl` away, if it
had one).
"""

import json
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging

from vdit import checkpointing, sharding
from vdit.data import packing, pipeline, transforms
from vdit.datasets import folder
from vdit.tasks import captioning, restore

RECAPTIONED = "captions.recaptioned.jsonl"


def output_path(path: str) -> str:
  """Where the captions go: `captions.jsonl` if the folder has none, else beside it; an
  existing output is a ValueError (never overwritten)."""
  out = os.path.join(path, folder.CAPTIONS)
  if os.path.exists(out):
    out = os.path.join(path, RECAPTIONED)
  if os.path.exists(out):
    raise ValueError(f"{out} exists; move it away to re-caption {path!r} again")
  return out


def recaption(captioner: str, path: str, beams: int = 4, step: int | None = None) -> str:
  """Captions every file of the folder `path` with the `captioner` run; returns the file
  written (see the module docstring)."""
  if not os.path.isdir(path):
    raise ValueError(f"--dataset_config={path!r} is not a folder")
  out = output_path(path)
  config = captioning.load_run_config(captioner, "video", "--captioner")
  entries, problems = folder.scan(path)
  if not entries:
    raise ValueError(f"{path!r} holds no video or image ({'; '.join(problems) or 'empty'})")
  mesh = sharding.make_mesh({"data": -1})
  config, _, params = restore.ema_params(captioner, step, config, mesh)
  task = captioning.Captioning()
  model = task.build_model(config)
  inp = pipeline.resolve_input_config(config.input)
  chain = transforms.example_transforms(inp, train=False)

  @jax.jit
  def generate(params, batch):
    return task.generate(
      model, params, batch, jax.random.key(0), config, beams=beams, temperature=0.0
    )

  rows = []
  start = last = time.perf_counter()
  for n, entry in enumerate(entries, 1):
    video = folder.decode(os.path.join(path, entry.file))
    element = transforms.apply(chain, {"video": video, "caption": b""})
    example = transforms.materialize(element, inp.patch_size)
    row = packing.assemble_row(
      [example], inp.tokens_per_row, inp.text_tokens_per_row, inp.max_examples_per_row
    )
    batch = {k: v[None] for k, v in row.items()}
    tokens = np.asarray(generate(params, batch)["captions"])[0, 0]
    caption = captioning.caption_texts(tokens, inp.vocab_size)[0]
    line = {"file": entry.file, "caption": caption, "split": entry.split, "recaptioned": True}
    rows.append(line | ({"label": entry.label} if entry.label >= 0 else {}))
    if (now := time.perf_counter()) - last >= 10.0 or n == len(entries):  # progress
      last, rate = now, n / max(now - start, 1e-9)
      eta = (len(entries) - n) / rate
      logging.info(
        "recaption: %d/%d files, %.2f files/s, ETA %dm%02ds",
        n, len(entries), rate, eta // 60, eta % 60,
      )  # fmt: skip
  with open(out, "x", encoding="utf-8") as f:  # "x": never overwrite
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return out


def _define_flags() -> None:
  """The CLI's flags: defined only when run as a program, so importing this module next to
  another entry point (one process, e.g. the tests) defines no flag twice."""
  flags.DEFINE_string("captioner", None, "A captioning run (configs/caption/video.py).")
  flags.DEFINE_string("dataset", "folder", "Only `folder`: a folder of your videos.")
  flags.DEFINE_string("dataset_config", None, "The folder's path.")
  flags.DEFINE_integer("beams", 4, "Beam width; 1 = greedy.")
  flags.DEFINE_integer("step", None, "Checkpoint step of the captioner (default: latest).")


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  if FLAGS.dataset != "folder":
    sys.exit(f"error: --dataset={FLAGS.dataset!r}: only `folder` datasets are re-captioned")
  for name in ("captioner", "dataset_config"):
    if not FLAGS[name].value:
      sys.exit(f"error: --{name} is required")
  try:
    out = recaption(FLAGS.captioner, FLAGS.dataset_config, FLAGS.beams, FLAGS.step)
  except (ValueError, checkpointing.NoCheckpointError) as e:
    sys.exit(f"error: {e}")
  print(out, flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
