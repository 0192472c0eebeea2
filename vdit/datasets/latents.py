"""input.dataset="latents": videos pre-encoded by an autoencoder (`python -m vdit.tools.latents`).

`dataset_config` is the directory the latents tool wrote (`--out`): one `<T'>x<H'>x<W'>.npz` per
latent shape (`latents` [N, T', H', W', Z], `index` [N], `label` [N]) and `captions.jsonl`. If it
holds a sub-directory named like the split (`<dir>/train`, `<dir>/validation`), that is read;
otherwise the directory itself, for any split. Elements are {"video": float32 normalised
latents [T', H', W', Z], "caption": bytes, "label": int32} in the order of the source `index`.
The per-example transforms pass float video through unscaled (`transforms.ToFloat`).
"""

import json
import os

import numpy as np

NUM_CLASSES = 0  # labels are kept as written (e.g. shapes' classes) but not counted here


class LatentSource:
  """Random access over the .npz files of one latents directory (loaded into memory)."""

  def __init__(self, path: str, split: str):
    sub = os.path.join(path, split)
    self.path = sub if os.path.isdir(sub) else path
    files = sorted(f for f in os.listdir(self.path) if f.endswith(".npz"))
    if not files:
      raise FileNotFoundError(
        f"no <T'>x<H'>x<W'>.npz latents in {self.path}; write them with "
        "`python -m vdit.tools.latents --autoencoder=... --out=...`"
      )
    captions = {}
    cap_path = os.path.join(self.path, "captions.jsonl")
    if os.path.exists(cap_path):
      with open(cap_path) as f:
        for line in f:
          if line.strip():
            row = json.loads(line)
            captions[int(row["index"])] = row["caption"]
    entries = []  # (source index, array, row, label)
    for name in files:
      with np.load(os.path.join(self.path, name)) as data:
        z, index, label = data["latents"], data["index"], data["label"]
      for row in range(len(index)):
        entries.append((int(index[row]), z, row, int(label[row])))
    entries.sort(key=lambda e: e[0])
    self._entries = entries
    self._captions = captions

  def __len__(self) -> int:
    return len(self._entries)

  def __getitem__(self, i: int) -> dict:
    index, z, row, label = self._entries[int(i)]
    return {
      "video": np.asarray(z[row], np.float32),
      "caption": self._captions.get(index, "").encode(),
      "label": np.int32(label),
    }

  def __repr__(self) -> str:
    return f"LatentSource({self.path!r}, {len(self)} examples)"


def data_source(split: str, data_dir: str | None = None, config: str = "") -> LatentSource:
  """The latents of `split` under directory `config` (data_dir is unused)."""
  del data_dir
  return LatentSource(config, split)


def channels_of(path: str, split: str = "train") -> int:
  """Z of the latents stored in `path` (to check against `input.channels`)."""
  return int(LatentSource(path, split)[0]["video"].shape[-1])
