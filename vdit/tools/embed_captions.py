r"""Embeds a dataset's captions once with a frozen text model: a caption-embedding table.

  python -m vdit.tools.embed_captions --dataset=shapes --dataset_config=tiny \
      --splits=train,validation --embedder=words:64 --out=runs/captions/shapes
  python -m vdit.main --workdir=runs/shapes_t5 \
      --config=configs/vdit/shapes.py:tiny,captions=runs/captions/shapes,caption_dim=64

`--embedder` is `words:<E>[:<seed>]` (a frozen random word embedding, offline) or
`run:<workdir>` (the trained text encoder of a vdit text-to-video run); see
`vdit.data.caption_table` for the table format. Embeddings of a model that cannot run here (e.g.
T5-XXL) are written by `vdit.data.caption_table.write_table` from wherever that model runs
(docs/models.md, "Text"). Every distinct caption of the splits is embedded once (plus
`--prompts`, one per line).
"""

import json
import time

from absl import app, flags, logging

from vdit import caption_embedders, datasets
from vdit.data import caption_table, tokenizer


def dataset_captions(dataset: str, splits, dataset_config=None, data_dir=None) -> list[str]:
  """The distinct captions of `splits`, in first-seen order."""
  seen = {}
  for split in splits:
    source = datasets.data_source(dataset, split, data_dir=data_dir, config=dataset_config)
    for i in range(len(source)):
      caption = source[i].get("caption", b"")
      caption = caption.decode() if isinstance(caption, bytes) else str(caption)
      seen.setdefault(caption, None)
  return list(seen)


def embed_captions(
  texts: list[str], embedder: str, out: str, *, batch_size: int = 64, **meta
) -> dict:
  """Embeds `texts` with `embedder` (a spec) into the table `out`; returns its meta."""
  embed = caption_embedders.from_spec(embedder)
  texts = [t for t in dict.fromkeys(texts) if tokenizer.words(t)]  # not the null
  start = time.perf_counter()

  def pairs():
    for i in range(0, len(texts), batch_size):
      chunk = texts[i : i + batch_size]
      yield from zip(chunk, embed(chunk))
      done = min(i + batch_size, len(texts))
      rate = done / max(time.perf_counter() - start, 1e-9)
      logging.info("captions: %d/%d embedded (%.0f/s)", done, len(texts), rate)

  return caption_table.write_table(out, pairs(), embedder, **meta)


def main(argv):
  del argv
  f = flags.FLAGS
  texts = dataset_captions(f.dataset, f.splits, f.dataset_config, f.data_dir)
  if f.prompts:
    with open(f.prompts) as fh:
      texts += [line.strip() for line in fh if line.strip()]
  meta = embed_captions(
    texts, f.embedder, f.out, dataset=f.dataset, dataset_config=f.dataset_config,
    splits=list(f.splits),
  )  # fmt: skip
  print(json.dumps({"out": f.out, **meta}))
  print(f"train on it with --config=configs/vdit/shapes.py:tiny,captions={f.out},"
        f"caption_dim={meta['dim']}")  # fmt: skip


if __name__ == "__main__":
  flags.DEFINE_string("dataset", "shapes", "dataset name (vdit.datasets.SOURCES)")
  flags.DEFINE_string("dataset_config", "tiny", "dataset config")
  flags.DEFINE_string("data_dir", None, "dataset directory (default: $VDIT_DATA_DIR)")
  flags.DEFINE_list("splits", ["train", "validation"], "splits whose captions are embedded")
  flags.DEFINE_string("embedder", "words:64", "words:<dim>[:<seed>] | run:<workdir>")
  flags.DEFINE_string("prompts", None, "a text file of extra prompts, one per line")
  flags.DEFINE_string("out", None, "output directory", required=True)
  app.run(main)
