"""The real validation videos a generative run is compared with (`frechet`, `modes`).

A latent-space run's real videos are the pixel dataset its latents were encoded from.
"""

import numpy as np

from vdit import datasets
from vdit.data import transforms
from vdit.datasets import latents


def pixel_dataset(config, dataset: str | None = None, dataset_config: str | None = None):
  """(dataset, dataset_config) of the real videos: `dataset` (default: the run's
  `input.dataset`), or the pixel dataset a latent-space run's latents were encoded from."""
  dataset_config = dataset_config or (None if dataset else config.input.get("dataset_config"))
  dataset = dataset or config.input.dataset
  if dataset == "latents":
    meta = latents.meta(dataset_config, "validation")
    dataset, dataset_config = meta["dataset"], meta["dataset_config"]
  return dataset, dataset_config


def source(config, dataset: str | None = None, dataset_config: str | None = None):
  """The validation split (a data source of {"video", "caption", ...}) of `pixel_dataset`."""
  dataset, dataset_config = pixel_dataset(config, dataset, dataset_config)
  return datasets.data_source(
    dataset, "validation", data_dir=config.input.get("data_dir"), config=dataset_config
  )


def caption_of(example) -> str:
  caption = example["caption"]
  return caption.decode() if isinstance(caption, bytes) else str(caption)


def real_videos(
  config,
  num_videos: int,
  sizes,
  dataset: str | None,
  dataset_config: str | None,
  max_aspect: float | None = None,
) -> tuple[list[np.ndarray], list[str], list[int]]:
  """(uint8 videos, captions, size index per video): the first `num_videos` of the validation
  split, each resized to the one of `sizes` (T, H, W pixels) that stretches it least (ties: the
  first), short clips padded with their last frame. With `max_aspect`, only clips that size
  stretches by at most that factor."""
  data = source(config, dataset, dataset_config)
  sizes = [tuple(int(x) for x in s) for s in sizes]
  videos, captions, picked = [], [], []
  for i in range(len(data)):
    if len(videos) == num_videos:
      break
    ex = data[i]
    stretches = [stretch(ex["video"].shape[1:3], s[1:]) for s in sizes]
    k = int(np.argmin(stretches))
    if max_aspect is not None and stretches[k] > max_aspect:
      continue
    t, h, w = sizes[k]
    video = np.asarray(ex["video"], np.float32)[:t]
    video = np.concatenate([video, np.repeat(video[-1:], t - len(video), 0)])
    videos.append(np.round(transforms.area_resize(video, h, w)).astype(np.uint8))
    captions.append(caption_of(ex))
    picked.append(k)
  return videos, captions, picked


def stretch(shape, size) -> float:
  """How much resizing an (h, w) frame to `size` (H, W) distorts it: ≥ 1, 1 = same aspect."""
  ratio = (shape[1] / shape[0]) / (size[1] / size[0])
  return max(ratio, 1 / ratio)
