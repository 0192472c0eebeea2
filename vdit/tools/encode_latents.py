r"""Latents of a trained autoencoder: encode a dataset once.

  python -m vdit.tools.encode_latents --autoencoder=runs/vae --dataset=shapes \
      --dataset_config=tiny --split=train --out=runs/vae/latents/shapes_train \
      [--max_examples=100] [--chunk=4 --tile=256]

The autoencoder is loaded as a `vdit.latent_codec.Codec` (`Codec.encode`: video [B, T, H, W, 3]
in [-1, 1] → *normalised* latents). `encode_dataset` writes
`latents.array_record` (one msgpack record per example: `index` in the source, `label`,
`caption`, `latents` float32 [T', H', W', Z]; `vdit.datasets.records`) and `meta.json` (channels,
compression, the autoencoder, counts per latent shape, skipped examples). Each example is cut to
T = 1 + ft·n frames and centre-cropped to multiples of fs; examples are encoded in groups of one
size (see `encode_dataset` for why grouping, not padding).
"""

import collections
import json
import os
import time

import numpy as np
from absl import app, flags, logging

from vdit import config_lib, datasets, latent_codec, media
from vdit.data import transforms
from vdit.datasets import records
from vdit.models import tiling


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


def shrink(video: np.ndarray, max_side: int | None, fs: int) -> np.ndarray:
  """[T, H, W, 3] area-resized (keeping the aspect ratio, never upsampled) so that its longer side
  is ≤ `max_side` pixels, both sides multiples of fs; unchanged if None or already small enough.
  Done in pixels, before encoding: a smaller video's latents, where resizing latents would not
  be (the token budget of a latent run then never has to shrink an example)."""
  t, h, w, _ = video.shape
  if not max_side or max(h, w) <= max_side:
    return video
  scale = max_side / max(h, w)
  height, width = (max(fs, int(round(s * scale / fs)) * fs) for s in (h, w))
  return transforms.area_resize(video, height, width)


def time_bucket(latent_frames: int) -> int:
  """The latent length an example is encoded at: the next power of two (≤ 2× the work, a
  handful of lengths per dataset)."""
  return 1 << max(0, latent_frames - 1).bit_length()


def is_per_frame(codec: latent_codec.Codec) -> bool:
  """Whether each latent frame codes its own frame alone (a per-frame autoencoder: ft = 1 and no
  temporal look-back), so frames of any number of videos can be encoded as one batch."""
  model = codec.model
  return (
    codec.variables is not None and codec.compression[0] == 1 and model.temporal_lookback()[0] == 0
  )


def encode_dataset(
  codec: latent_codec.Codec,
  dataset: str,
  split: str,
  out: str,
  *,
  dataset_config: str | None = "tiny",
  data_dir: str | None = None,
  max_examples: int | None = None,
  max_side: int | None = None,
  batch_size: int = 8,
  log_every_seconds: float = 10.0,
  **tiling_kwargs,
) -> dict:
  """Encodes a dataset split once into `out/latents.array_record` + `out/meta.json`.

  Examples are grouped, not padded to the largest: a group holds examples of one pixel size
  (H, W) and one time bucket (`time_bucket` of the latent length). A group is encoded `batch_size`
  at a time; each video is padded at the end to its bucket with its last frame, which the causal
  encoder makes exact (latent frame j never sees later frames), and the extra latent frames are
  dropped. Spatial padding would not be exact (a conv's border differs from real neighbours), so
  sizes are never mixed; a short group is filled up with repeats of its last example, so every
  (H, W, bucket) compiles once. A per-frame autoencoder (`is_per_frame`) groups by (H, W) only
  and encodes 8 × `batch_size` frames per call, of any videos: one compilation per frame size.
  Returns the meta dict (also in meta.json).
  """
  source = datasets.data_source(dataset, split, data_dir=data_dir, config=dataset_config)
  n = len(source) if max_examples is None else min(max_examples, len(source))
  ft = codec.compression[0]
  per_frame = is_per_frame(codec)
  frame_batch = batch_size * 8  # per-frame codecs: frames of one size encoded per call
  groups = collections.defaultdict(list)  # size key -> [(index, video, label, caption)]
  shapes, skipped = collections.Counter(), {}
  progress = _Progress(n, log_every_seconds)
  with records.Writer(out, "latents") as writer:

    def encode_group(key, group) -> list[np.ndarray]:
      """The normalised latents [T', H', W', Z] of each video of one group."""
      if per_frame:  # all the group's frames as 1-frame clips, `frame_batch` per call
        frames = np.concatenate([v for _, v, _, _ in group])
        pad = -len(frames) % frame_batch
        frames = media.from_uint8(np.concatenate([frames, np.repeat(frames[-1:], pad, 0)]))
        z = np.concatenate(
          [
            codec.encode(frames[i : i + frame_batch, None], **tiling_kwargs)
            for i in range(0, len(frames), frame_batch)
          ]
        )[:, 0]
        return np.split(z[: len(z) - pad], np.cumsum([len(v) for _, v, _, _ in group])[:-1])
      frames = 1 + ft * (key[2] - 1)
      videos = [tiling.pad_frames(media.from_uint8(v)[None], frames)[0] for _, v, _, _ in group]
      videos += [videos[-1]] * (batch_size - len(videos))
      z = codec.encode(np.stack(videos), **tiling_kwargs)
      return [zi[: 1 + (len(v) - 1) // ft] for (_, v, _, _), zi in zip(group, z)]

    def flush(key):
      group, groups[key] = groups[key], []
      for (index, _, label, caption), zi in zip(group, encode_group(key, group)):
        if not np.all(np.isfinite(zi)):
          skipped[index] = "non-finite latents"
          continue
        writer.write(dict(index=index, label=label, caption=caption, latents=zi))
        shapes["x".join(str(s) for s in zi.shape[:3])] += 1
      progress.update(len(group), compiled=key)

    def full(key) -> bool:
      if per_frame:
        return sum(len(v) for _, v, _, _ in groups[key]) >= frame_batch
      return len(groups[key]) == batch_size

    for i in range(n):
      try:
        ex = source[i]
        video = np.asarray(ex["video"])
        video = fit_to_compression(shrink(video, max_side, codec.compression[1]), codec.compression)
      except (ValueError, OSError) as e:  # an unreadable or too-small video: skipped, counted
        skipped[i] = f"{type(e).__name__}: {e}"
        progress.update(1)
        continue
      caption = ex.get("caption", b"")
      caption = caption.decode() if isinstance(caption, bytes) else str(caption)
      key = (
        video.shape[1:3]
        if per_frame
        else (*video.shape[1:3], time_bucket(1 + (len(video) - 1) // ft))
      )
      # uint8 while waiting for the group to fill (a quarter of the host memory of float32).
      groups[key].append((i, video, int(ex.get("label", -1)), caption))
      if full(key):
        flush(key)
    for key in [k for k, g in groups.items() if g]:
      flush(key)
  if skipped:
    logging.warning("latents: skipped %d of %d examples: %s", len(skipped), n, skipped)
  meta = dict(
    autoencoder=config_lib.absolute_path(codec.workdir),
    channels=codec.channels,
    compression=list(codec.compression),
    dataset=dataset,
    dataset_config=dataset_config,
    split=split,
    examples=sum(shapes.values()),
    skipped=len(skipped),
    skipped_examples={str(k): v for k, v in skipped.items()},
    shapes=dict(sorted(shapes.items())),
    max_side=max_side,
    compilations=len(progress.compiled),
    seconds=round(progress.elapsed(), 1),
  )
  records.write_meta(out, meta)  # last: its presence marks a complete set
  return meta


class _Progress:
  """Logs examples/s, ETA and compilations every `every` seconds."""

  def __init__(self, total: int, every: float):
    self.total, self.every, self.done = total, every, 0
    self.start = self.last = time.perf_counter()
    self.compiled = set()

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def update(self, examples: int, compiled=None) -> None:
    self.done += examples
    if compiled is not None:
      self.compiled.add(compiled)
    now = time.perf_counter()
    if now - self.last >= self.every or self.done == self.total:
      self.last = now
      rate = self.done / max(now - self.start, 1e-9)
      eta = (self.total - self.done) / max(rate, 1e-9)
      logging.info(
        "latents: %d/%d examples, %.1f ex/s, ETA %dm%02ds, %d shapes compiled",
        self.done, self.total, rate, eta // 60, eta % 60, len(self.compiled),
      )  # fmt: skip


def _define_flags() -> None:
  """CLI flags; defined only when run as a program (tests import this module)."""
  flags.DEFINE_string("autoencoder", None, "workdir of an autoencoder run", required=True)
  flags.DEFINE_string("dataset", "shapes", "dataset name (vdit.datasets.SOURCES)")
  flags.DEFINE_string("dataset_config", "tiny", "dataset config")
  flags.DEFINE_string("split", "train", "split, or several (train,validation: each to out/<split>)")
  flags.DEFINE_string("out", None, "output directory", required=True)
  flags.DEFINE_integer("max_examples", None, "encode at most this many examples")
  flags.DEFINE_integer(
    "max_side", None, "shrink videos (pixels, keeping aspect) to this longer side"
  )
  flags.DEFINE_integer("batch_size", 8, "examples of one size encoded per call")
  flags.DEFINE_integer("chunk", None, "latent frames per chunk (None: whole)")
  flags.DEFINE_integer("tile", None, "square tile in pixels (None: whole)")
  flags.DEFINE_integer("overlap", 0, "tile overlap in pixels")


def main(argv):
  del argv
  f = flags.FLAGS
  codec = latent_codec.load(f.autoencoder)
  tile = (f.tile, f.tile) if f.tile else None
  splits = f.split.split(",")
  for split in splits:  # one process: the compilations are shared between splits
    out = f.out if len(splits) == 1 else os.path.join(f.out, split)
    meta = encode_dataset(
      codec, f.dataset, split, out, dataset_config=f.dataset_config,
      max_examples=f.max_examples, max_side=f.max_side, batch_size=f.batch_size,
      chunk=f.chunk, tile=tile, overlap=f.overlap,
    )  # fmt: skip
    meta.pop("skipped_examples")
    print(json.dumps({"out": out, **meta}))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
