"""input.dataset="latents": videos pre-encoded by an autoencoder (`vdit.tools.encode_latents`).

`dataset_config` is the directory `python -m vdit.tools.encode_latents` wrote (`--out`):
`latents.array_record`, one msgpack record per example (`vdit.datasets.records`), and
`meta.json` (channels, compression, the autoencoder's workdir, counts per latent shape). If it
holds a sub-directory named like the split (`<dir>/train`, `<dir>/validation`), that is read;
otherwise the directory itself, for any split. Records are read on demand (random access), not
loaded into memory. Elements are {"video": float32 normalised latents [T', H', W', Z],
"caption": bytes, "label": int32}; the per-example transforms pass float video through unscaled
(`transforms.ToFloat`).
"""

import os

import numpy as np

from vdit.datasets import records

NUM_CLASSES = 0  # labels are kept as written (e.g. shapes' classes) but not counted here
WRITER = "`python -m vdit.tools.encode_latents --autoencoder=... --out=...`"


def directory(path: str, split: str) -> str:
  """`path/split` if it exists, else `path`."""
  sub = os.path.join(path, split)
  return sub if os.path.isdir(sub) else path


class LatentSource:
  """Random access over one latents directory."""

  def __init__(self, path: str, split: str):
    self.path = directory(path, split)
    self.meta = meta(path, split)
    self._records = records.Source(self.path, "latents")

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, i: int) -> dict:
    r = self._records[i]
    return {
      "video": np.asarray(r["latents"], np.float32),
      "caption": str(r["caption"]).encode(),
      "label": np.int32(r["label"]),
    }

  def __repr__(self) -> str:
    return f"LatentSource({self.path!r}, {len(self)} examples)"


def data_source(split: str, data_dir: str | None = None, config: str = "") -> LatentSource:
  """The latents of `split` under directory `config` (data_dir is unused)."""
  del data_dir
  if not config:
    raise ValueError("input.dataset='latents' needs input.dataset_config = a latents directory")
  return LatentSource(config, split)


def meta(path: str, split: str = "train") -> dict:
  """The meta.json of the latents of `split` under `path` (channels, compression, autoencoder)."""
  return records.read_meta(directory(path, split), WRITER)
