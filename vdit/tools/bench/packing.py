"""Packing benchmark: how much of each row is real tokens, and how much attention work it needs.

Every strategy sees the same examples, in the same order:

  * `bundled`: the tiny demo's input settings (L=512, K=8, budget 48-384 tokens, 4-16 frames)
    over the mixture of the three bundled datasets (shapes 2 : moving_digits 1 : photo_pans 1),
    i.e. the per-example transforms of `vdit.data.pipeline` on real data;
  * `navit`: a NaViT-like length distribution: images of aspect ratio log-uniform in [1:2, 2:1]
    with resolution sampled per image (side r ~ U(64, 384) px, 16-px patches: 16-576 tokens),
    packed into rows of L=1024 with K ≤ 32.

Strategies: pad-to-longest (batches of 8 examples), Open-Sora-style bucketing (each example
cropped to the largest (frames, resolution, aspect) bucket it fits, a batch per bucket sized to
the same token budget), grain's first-fit / best-fit packers (baselines: vdit offered them as
`input.packing` until issue 17), and vdit's packer (`packing.PoolPackIterDataset`, best fit over a
pool of open rows) with and without `shrink_to_fill`. Packers run on grid-sized stand-ins (one
number per patch), so the measurement is of the packing alone.

Metrics: `real_token_fraction` (real tokens / token slots computed), `attention_needed`
(Σ Lᵢ² over the examples / attention computed: L² per packed row, Lmax² per padded example),
`tokens_kept` (tokens delivered / tokens of the examples as sampled: shrinking and bucketing
discard some), `examples_per_row`, and for bucketing the number of distinct batch shapes
(each one a separate XLA compilation).
"""

import collections
import math
import os

import grain
import ml_collections
import numpy as np

from vdit import config_lib
from vdit.data import packing, pipeline
from vdit.data import transforms as transforms_lib

Example = collections.namedtuple("Example", "grid drop text")  # (T', H', W'), rate, caption len
# The tiny demo's config (also the loader and train-step benchmarks').
CONFIG_FILE = os.path.join(
  os.path.dirname(__file__), "..", "..", "..", "configs", "vdit", "shapes.py"
)


# ---------------------------------------------------------------------------------------------
# The examples.
# ---------------------------------------------------------------------------------------------
def bundled_mixture(dataset_config: str = "tiny") -> tuple[tuple[str, str, float], ...]:
  """`input.mixture` of the three bundled datasets, shapes 2 : moving_digits 1 : photo_pans 1
  (also the loader benchmark's and the packing tests')."""
  weights = {"shapes": 2.0, "moving_digits": 1.0, "photo_pans": 1.0}
  return tuple((name, dataset_config, weight) for name, weight in weights.items())


def load_config(arg: str) -> ml_collections.ConfigDict:
  """configs/vdit/shapes.py with `arg` (what follows the colon of --config), e.g. "tiny"."""
  return config_lib.load(f"{CONFIG_FILE}:{arg}")


def bundled_config(data_dir=None, min_tokens: int = 48) -> ml_collections.ConfigDict:
  """The tiny demo's input settings (configs/vdit/shapes.py:tiny) over the bundled mixture, with
  per-example token budgets in [min_tokens, the demo's max]."""
  c = load_config("tiny").input
  c.update(dict(mixture=bundled_mixture(), data_dir=data_dir, min_tokens_per_example=min_tokens))
  return pipeline.resolve_input_config(c)


def bundled_examples(n: int, seed: int = 0, data_dir=None, min_tokens: int = 48) -> list[Example]:
  c = bundled_config(data_dir, min_tokens)
  ds = pipeline.packable_examples(c, seed=seed, train=True)
  out = []
  for i in range(n):
    ex = ds[i]
    grid = transforms_lib.grid_of(ex, c.patch_size)
    out.append(Example(grid, float(ex["drop_rate"]), len(ex["text_tokens"])))
  return out


def navit_examples(n: int, seed: int = 0) -> list[Example]:
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))  # width / height
    native = (1, max(1, round(24 / math.sqrt(aspect))), max(1, round(24 * math.sqrt(aspect))))
    side = rng.uniform(64, 384) / 16  # NaViT: resolution sampled per image
    out.append(Example(transforms_lib.fit_grid(native, max(1, int(side * side))), 0.0, 1))
  return out


def _tokens(ex: Example) -> int:
  return transforms_lib.kept_tokens(math.prod(ex.grid), ex.drop)


# ---------------------------------------------------------------------------------------------
# The strategies. Each returns the list of "sequences computed": (capacity, [lengths]).
# ---------------------------------------------------------------------------------------------
def pad_to_longest(examples, batch: int = 8):
  out = []
  for i in range(0, len(examples) - batch + 1, batch):
    lengths = [_tokens(e) for e in examples[i : i + batch]]
    out += [(max(lengths), [n]) for n in lengths]
  return out, sum(_tokens(e) for e in examples[: len(examples) // batch * batch])


def _stand_in(index: int, ex: Example) -> dict:
  """A packable example with one number per patch (patch size (1, 1, 1)); label = its index."""
  return {
    "video": np.zeros((*ex.grid, 1), np.float32),
    "text_tokens": np.ones(ex.text, np.int32),
    "label": np.int32(index),
    "drop_rate": np.float32(ex.drop),
    "seed": np.int64(0),
  }


def _source(examples):
  """The examples, repeated: packers are measured in steady state, not on a final flush."""
  return grain.MapDataset.source(examples).map_with_index(_stand_in).repeat()


def _rows(ds, examples) -> tuple[list, int]:
  """Rows until they hold len(examples) examples, and the sampled tokens of those examples."""
  it, rows, packed, total = iter(ds), [], 0, 0
  while packed < len(examples):
    row = next(it)
    seg = row["segment_ids"]
    lengths = [int((seg == k).sum()) for k in range(1, seg.max() + 1)]
    rows.append((len(seg), [n for n in lengths if n]))
    for label in row["labels"][row["labels"] >= 0]:
      total += _tokens(examples[int(label) % len(examples)])
      packed += 1
  return rows, total


GRAIN_PACKERS = {  # baselines
  "first_fit": grain.experimental.FirstFitPackIterDataset,
  "best_fit": grain.experimental.BestFitPackIterDataset,
}


def _grain_item(index: int, ex: Example) -> dict:
  """What grain's packers need of a stand-in: its tokens, caption and index (as the label)."""
  return {
    "tokens": np.ones(_tokens(ex), np.int32),
    "text": np.ones(ex.text, np.int32),
    "labels": np.full(1, index, np.int32),
  }


def _grain_row(packed: dict) -> dict:
  labels = np.where(packed["labels_segment_ids"] > 0, packed["labels"], -1)
  return {"segment_ids": packed["tokens_segment_ids"], "labels": labels}


def grain_rows(examples, kind: str, length: int, slots: int, text: int, bins: int):
  """grain's first-fit or best-fit packer (`kind`) over the same examples, bins shuffled."""
  source = grain.MapDataset.source(examples).map_with_index(_grain_item).repeat()
  ds = GRAIN_PACKERS[kind](
    source.to_iter_dataset(),
    length_struct={"tokens": length, "text": text, "labels": slots},
    padding_struct={"tokens": 0, "text": 0, "labels": -1},
    num_packing_bins=bins,
    max_sequences_per_bin=slots,
    shuffle_bins=True,
    seed=0,
  )
  return _rows(ds.map(_grain_row), examples)


def pool_rows(examples, length: int, slots: int, text: int, bins: int, shrink: float):
  ds = packing.PoolPackIterDataset(
    _source(examples),
    patch_size=(1, 1, 1),
    tokens_per_row=length,
    text_tokens_per_row=text,
    max_examples_per_row=slots,
    num_bins=bins,
    shrink_to_fill=shrink,
    read_threads=0,
  )
  return _rows(ds, examples)


FRAMES = (1, 2, 4, 8, 16, 32)  # temporal patches of the buckets
AREAS = (16, 24, 36, 48, 64, 96, 144, 192, 256, 384, 576)  # patches per frame
ASPECTS = (1 / 3, 1 / 2, 9 / 16, 3 / 4, 1.0, 4 / 3, 16 / 9, 2.0, 3.0)  # width / height


def bucket_of(grid) -> tuple[int, int, int]:
  """Open-Sora-style: the largest (frames, area, aspect) bucket that fits inside the example."""
  t, h, w = grid
  frames = max(f for f in FRAMES if f <= t)
  aspect = min(ASPECTS, key=lambda a: abs(math.log(a * h / w)))
  best = (frames, 1, 1)
  for area in AREAS:
    bh = max(1, round(math.sqrt(area / aspect)))
    bw = max(1, round(bh * aspect))
    if bh <= h and bw <= w and bh * bw > best[1] * best[2]:
      best = (frames, bh, bw)
  return best


def bucketing(examples, budget: int):
  """Batches of one bucket each, `budget // bucket_tokens` examples, no padding; a bucket's
  examples wait until its batch is full. Returns the full batches (as rows of `budget` slots),
  the examples' sampled tokens, the distinct batch shapes, and the tokens the buckets keep."""
  waiting, out, shapes, kept = collections.defaultdict(list), [], set(), 0
  for ex in examples:
    bucket = bucket_of(ex.grid)
    tokens = transforms_lib.kept_tokens(math.prod(bucket), ex.drop)
    kept += tokens
    size = max(1, budget // tokens)
    waiting[bucket].append(tokens)
    if len(waiting[bucket]) == size:
      out.append((budget, waiting.pop(bucket)))  # one "row" of `budget` token slots
      shapes.add((size, *bucket))
  return out, sum(_tokens(e) for e in examples), len(shapes), kept


def metrics(rows, total_tokens: int, attention_rows=None) -> dict:
  """rows: [(capacity, lengths)]; attention per row is capacity² (dense over the row);
  total_tokens: the sampled tokens of the examples in the rows."""
  capacity = sum(c for c, _ in rows)
  real = sum(sum(lengths) for _, lengths in rows)
  attention_rows = rows if attention_rows is None else attention_rows
  needed = sum(sum(n * n for n in lengths) for _, lengths in attention_rows)
  computed = sum(c * c for c, _ in attention_rows)
  return {
    "real_token_fraction": round(real / capacity, 4),
    "attention_needed": round(needed / computed, 4),
    "tokens_kept": round(real / total_tokens, 4),
    "examples_per_row": round(sum(len(lengths) for _, lengths in rows) / len(rows), 2),
    "rows": len(rows),
  }


def compare(examples, length: int, slots: int, text: int, bins=(16, 64)) -> dict:
  out = {}
  rows, total = pad_to_longest(examples)
  out["pad_to_longest"] = metrics(rows, total)
  rows, total, shapes, kept = bucketing(examples, budget=length * 8)
  # Each bucketed example attends over itself only: needed = computed.
  per_example = [(n, [n]) for _, lengths in rows for n in lengths]
  out["bucketing"] = {
    **metrics(rows, total, per_example),
    "tokens_kept": round(kept / total, 4),
    "batch_shapes": shapes,
  }
  for n in bins:
    for kind in GRAIN_PACKERS:
      out[f"grain_{kind}_{n}"] = metrics(*grain_rows(examples, kind, length, slots, text, n))
    for shrink in (0.0, 0.5):
      name = f"best_fit_pool_{n}" + ("_shrink" if shrink else "")  # vdit's packer
      out[name] = metrics(*pool_rows(examples, length, slots, text, n, shrink))
  return out


def run(options: dict) -> dict:
  n = int(options.get("examples", 600 if options.get("quick") else 4000))
  low = int(options.get("bundled_min_tokens", 48))
  bundled = bundled_examples(n, data_dir=options.get("data_dir"), min_tokens=low)
  navit = navit_examples(n)
  lengths = lambda xs: [_tokens(e) for e in xs]
  return {
    "bundled": {
      "setup": f"L=512, K=8, M=96; shapes:digits:photos 2:1:1 (tiny); budget {low}-384",
      "mean_example_tokens": round(float(np.mean(lengths(bundled))), 1),
      **compare(bundled, 512, 8, 96),
    },
    "navit": {
      "setup": "L=1024, K=32; images, side ~ U(64, 384) px, 16-px patches, aspect 1:2-2:1",
      "mean_example_tokens": round(float(np.mean(lengths(navit))), 1),
      **compare(navit, 1024, 32, 32),
    },
  }


# ---------------------------------------------------------------------------------------------
# docs/images/packing.png
# ---------------------------------------------------------------------------------------------
def write_png(options: dict) -> dict:
  """Rows of the bundled data under three strategies; each token coloured by its example, grey
  = padding. Drawn from the steady state (rows 40-47), not the first rows."""
  from PIL import Image, ImageDraw  # noqa: PLC0415

  path = options.get("out", "docs/images/packing.png")
  examples = bundled_examples(
    400, seed=int(options.get("seed", 1)), data_dir=options.get("data_dir")
  )
  panels = [
    ("pad to longest (batch of 8 examples)", pad_to_longest(examples)[0][8:16]),
    ("grain first-fit, 16 bins", grain_rows(examples, "first_fit", 512, 8, 96, 16)[0][40:48]),
    (
      "best_fit (pool), 16 bins, shrink_to_fill=0.5",
      pool_rows(examples, 512, 8, 96, 16, 0.5)[0][40:48],
    ),
  ]
  scale, row_h, gap, top = 2, 14, 3, 18
  longest = max(c for _, rows in panels for c, _ in rows)
  width = longest * scale + 20
  height = sum(top + len(rows) * (row_h + gap) + 10 for _, rows in panels)
  image = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(image)
  palette = np.random.default_rng(3).integers(40, 230, size=(64, 3))
  y = 0
  for title, rows in panels:
    real = sum(sum(lengths) for _, lengths in rows) / sum(c for c, _ in rows)
    draw.text((10, y + 3), f"{title}: {real:.1%} real tokens", fill=(0, 0, 0))
    y += top
    for r, (capacity, lengths) in enumerate(rows):
      x = 10
      draw.rectangle([x, y, x + capacity * scale - 1, y + row_h - 1], fill=(225, 225, 225))
      for k, n in enumerate(lengths):
        colour = tuple(int(v) for v in palette[(r * 8 + k) % 64])
        draw.rectangle([x, y, x + n * scale - 1, y + row_h - 1], fill=colour)
        draw.line([x, y, x, y + row_h - 1], fill=(255, 255, 255))  # example boundary
        x += n * scale
      y += row_h + gap
    y += 10
  image.save(path)
  return {"path": path, "size": [width, height]}
