r"""Latents of a trained autoencoder: load it from its workdir; encode a dataset once.

  python -m vdit.tools.latents --autoencoder=runs/vae --dataset=shapes --dataset_config=tiny \
      --split=train --out=runs/vae/latents/shapes_train [--max_examples=100] [--chunk=4 --tile=256]

`load(workdir)` gives a `Codec`: the EMA params of the run's latest checkpoint, its model and
the `LatentStats` its evaluation stored (workdir/latent_stats.json). `Codec.encode` maps video
[B, T, H, W, 3] in [-1, 1] to *normalised* latents (posterior mean, (z − shift)/scale) and
`Codec.decode` inverts it; `Codec.identity()` is pixel space. `encode_dataset` writes one
`<T'>x<H'>x<W'>.npz` per latent shape (examples grouped by shape: one compilation per shape,
stacked arrays `latents` [N, T', H', W', Z], `index` [N], `label` [N]) and `captions.jsonl`;
each example is cut to T = 1 + ft·n frames and centre-cropped to multiples of fs.
"""

import collections
import dataclasses
import json
from typing import Any

import jax
import numpy as np
from absl import app, flags
from etils import epath

from vdit import checkpointing, datasets, tasks
from vdit.models import autoencoder as ae
from vdit.models import tiling
from vdit.tasks import autoencoder as ae_task
from vdit.tasks import restore


@dataclasses.dataclass
class Codec:
  model: Any  # VideoAutoencoder or IdentityAutoencoder
  variables: Any  # {"params": ...} (None for the identity)
  stats: ae.LatentStats

  @classmethod
  def identity(cls) -> "Codec":
    return cls(ae.IdentityAutoencoder(), None, ae.LatentStats.identity(3))

  @property
  def compression(self) -> tuple[int, int, int]:
    return tuple(self.model.compression)

  @property
  def channels(self) -> int:
    return int(self.model.latent_channels)

  def encode(self, video, **tiling_kwargs) -> np.ndarray:
    """Normalised latents [B, T', H', W', Z] of video [B, T, H, W, 3] (`tiling.encode` kwargs:
    chunk, tile, overlap)."""
    if self.variables is None:
      return np.asarray(video, np.float32)
    mean, _ = tiling.encode(self.model, self.variables, video, **tiling_kwargs)
    return np.asarray(self.stats.normalize(mean), np.float32)

  def decode(self, z, **tiling_kwargs) -> np.ndarray:
    """Video [B, T, H, W, 3] of normalised latents (the inverse of `encode`'s normalisation)."""
    if self.variables is None:
      return np.asarray(z, np.float32)
    raw = self.stats.denormalize(np.asarray(z, np.float32))
    return tiling.decode(self.model, self.variables, raw, **tiling_kwargs)


def load(workdir: str, step: int | None = None) -> Codec:
  """The autoencoder trained in `workdir` (EMA params, latest or given checkpoint) and its
  latent statistics."""
  config = checkpointing.read_config(workdir)
  if tasks.name_of(config) != "autoencoder":
    raise ValueError(f"{workdir} holds a {tasks.name_of(config)!r} run, not an autoencoder")
  _, _, params = restore.ema_params(workdir, step, config)
  params = jax.device_get(params)
  model = tasks.get(config).build_model(config)
  return Codec(model, {"params": params}, ae_task.load_stats(workdir))


def fit_to_compression(video: np.ndarray, compression) -> np.ndarray:
  """[T, H, W, 3] → the first 1 + ft·n frames, centre-cropped to multiples of fs."""
  ft, fs, _ = compression
  t, h, w, _ = video.shape
  t = 1 + (t - 1) // ft * ft
  ch, cw = h // fs * fs, w // fs * fs
  if not ch or not cw:
    raise ValueError(f"a {h}×{w} frame is smaller than the spatial compression {fs}")
  y, x = (h - ch) // 2, (w - cw) // 2
  return video[:t, y : y + ch, x : x + cw]


def encode_dataset(
  codec: Codec,
  dataset: str,
  split: str,
  out: str,
  *,
  dataset_config: str | None = "tiny",
  data_dir: str | None = None,
  max_examples: int | None = None,
  **tiling_kwargs,
) -> dict[str, int]:
  """Encodes a dataset split once; returns {shape file name: examples}."""
  source = datasets.data_source(dataset, split, data_dir=data_dir, config=dataset_config)
  n = len(source) if max_examples is None else min(max_examples, len(source))
  buckets = collections.defaultdict(lambda: {"latents": [], "index": [], "label": []})
  out_dir = epath.Path(out)
  out_dir.mkdir(parents=True, exist_ok=True)
  with (out_dir / "captions.jsonl").open("w") as captions:
    for i in range(n):
      ex = source[i]
      video = fit_to_compression(np.asarray(ex["video"]), codec.compression)
      z = codec.encode((video[None].astype(np.float32) / 127.5) - 1.0, **tiling_kwargs)[0]
      b = buckets["x".join(str(s) for s in z.shape[:3])]
      b["latents"].append(z)
      b["index"].append(i)
      b["label"].append(int(ex.get("label", -1)))
      caption = ex.get("caption", b"")
      caption = caption.decode() if isinstance(caption, bytes) else str(caption)
      captions.write(json.dumps({"index": i, "caption": caption}) + "\n")
  counts = {}
  for name, b in buckets.items():
    with (out_dir / f"{name}.npz").open("wb") as f:
      np.savez(f, **{k: np.stack(v) for k, v in b.items()})
    counts[f"{name}.npz"] = len(b["index"])
  return counts


def _define_flags() -> None:
  """CLI flags; defined only when run as a program (`vdit.sample` imports this module and has
  its own --out)."""
  flags.DEFINE_string("autoencoder", None, "workdir of an autoencoder run", required=True)
  flags.DEFINE_string("dataset", "shapes", "dataset name (vdit.datasets.SOURCES)")
  flags.DEFINE_string("dataset_config", "tiny", "dataset config")
  flags.DEFINE_string("split", "train", "split")
  flags.DEFINE_string("out", None, "output directory", required=True)
  flags.DEFINE_integer("max_examples", None, "encode at most this many examples")
  flags.DEFINE_integer("chunk", None, "latent frames per chunk (None: whole)")
  flags.DEFINE_integer("tile", None, "square tile in pixels (None: whole)")
  flags.DEFINE_integer("overlap", 0, "tile overlap in pixels")


def main(argv):
  del argv
  f = flags.FLAGS
  codec = load(f.autoencoder)
  tile = (f.tile, f.tile) if f.tile else None
  counts = encode_dataset(
    codec, f.dataset, f.split, f.out, dataset_config=f.dataset_config,
    max_examples=f.max_examples, chunk=f.chunk, tile=tile, overlap=f.overlap,
  )  # fmt: skip
  print(json.dumps({"out": f.out, "files": counts}))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
