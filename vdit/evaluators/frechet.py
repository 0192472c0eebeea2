"""`frechet`: Fréchet distance between real and generated videos in a feature space.

FD = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^½)  (Heusel et al. 2017, FID Eq. 6; FVD uses the
same formula on I3D features, Unterthiner et al. 2018). The matrix square root is taken as
(Σ_r^½ Σ_g Σ_r^½)^½ through symmetric eigendecompositions (`scipy.linalg.eigh`), which equals
Tr((Σ_r Σ_g)^½) and stays real and stable for rank-deficient covariances.

Feature extractors (`extractor` option):
  classifier   the penultimate layer of a classifier trained in this project
               (`classifier_workdir`, e.g. `configs/vit/digits.py:tiny`); per frame, averaged
               over each video's frames (`Classifier.features`).
  npz          a user-supplied Inception (FID) or I3D (FVD) style network: `weights` is a file
               holding the network, and `EXTRACTORS["npz"]` must be replaced (`register_extractor`)
               by a function building `videos uint8 [N, T, H, W, 3] -> features [N, D]` from it.
               No such weights ship with vdit (no downloads), so without one this raises a clear
               error; see docs/evaluation.md.

Real videos come from the validation split of `dataset` (default: the run's dataset), the
generated ones from the run's sampler on the real videos' captions at `size`.
"""

from collections.abc import Callable

import numpy as np
from scipy import linalg

from vdit.evaluators import register

Extractor = Callable[[np.ndarray], np.ndarray]  # uint8 videos [N, T, H, W, 3] -> [N, D]
EXTRACTORS: dict[str, Callable[..., Extractor]] = {}


def register_extractor(name: str, factory: Callable[..., Extractor]) -> None:
  """Adds a feature-extractor factory `factory(**options) -> (videos -> features [N, D])`."""
  EXTRACTORS[name] = factory


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean [D], covariance [D, D]) of features [N, D] (unbiased, as in FID)."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"features {features.shape}: need [N, D] with N ≥ 2")
  return features.mean(0), np.cov(features, rowvar=False).reshape(features.shape[1], -1)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
  w, v = linalg.eigh((a + a.T) / 2)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1^½ Σ2 Σ1^½)^½) between two Gaussians."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  root1 = _sqrt_psd(sigma1)
  cross = np.trace(_sqrt_psd(root1 @ sigma2 @ root1))
  value = float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * cross)
  return max(value, 0.0)


def frechet_of_features(real: np.ndarray, fake: np.ndarray) -> float:
  return frechet_distance(*statistics(real), *statistics(fake))


def _classifier_extractor(classifier_workdir: str, classifier_step: int | None = None, **_):
  from vdit.evaluators import classifier  # noqa: PLC0415

  clf = classifier.load(classifier_workdir, classifier_step)
  return lambda videos: clf.features(videos).mean(axis=1)  # [N, T', D] → [N, D]


def _weights_extractor(weights: str | None = None, **_):
  raise NotImplementedError(
    f"extractor='npz' needs a user-supplied Inception/I3D network (weights={weights!r}): register "
    "a factory with `vdit.evaluators.frechet.register_extractor('npz', factory)` that loads "
    "`weights` and maps uint8 videos [N, T, H, W, 3] to features [N, D]; vdit ships no such "
    "weights (docs/evaluation.md). Use extractor='classifier' for an in-project network."
  )


register_extractor("classifier", _classifier_extractor)
register_extractor("npz", _weights_extractor)


def real_videos(config, num_videos: int, size, dataset: str | None, dataset_config: str | None):
  """(uint8 videos [N, T, H, W, 3] resized to `size`, captions) from the validation split."""
  from vdit import datasets  # noqa: PLC0415
  from vdit.data import transforms  # noqa: PLC0415

  inp = config.input
  source = datasets.data_source(
    dataset or inp.dataset,
    "validation",
    data_dir=inp.get("data_dir"),
    config=dataset_config or inp.get("dataset_config"),
  )
  t, h, w = (int(s) for s in size)
  videos, captions = [], []
  for i in range(min(num_videos, len(source))):
    ex = source[i]
    video = np.asarray(ex["video"], np.float32)[:t]
    video = np.concatenate([video, np.repeat(video[-1:], t - len(video), 0)])
    videos.append(np.round(transforms.area_resize(video, h, w)).astype(np.uint8))
    caption = ex["caption"]
    captions.append(caption.decode() if isinstance(caption, bytes) else str(caption))
  return np.stack(videos), captions


@register("frechet")
def evaluate(
  config,
  params,
  workdir: str,
  step: int,
  *,
  extractor: str = "classifier",
  num_videos: int = 32,
  size: tuple[int, int, int] = (8, 32, 32),
  steps: int = 16,
  guidance: float = 3.0,
  seed: int = 0,
  dataset: str | None = None,
  dataset_config: str | None = None,
  batch_size: int = 16,
  **extractor_options,
) -> dict:
  """FD between `num_videos` validation videos and videos generated from their captions."""
  del workdir, step
  from vdit import sample  # noqa: PLC0415

  if extractor not in EXTRACTORS:
    raise ValueError(f"extractor={extractor!r} is unknown; expected one of {sorted(EXTRACTORS)}")
  features_of = EXTRACTORS[extractor](**extractor_options)
  real, captions = real_videos(config, num_videos, size, dataset, dataset_config)
  sampler = sample.Sampler(config=config, params=params)
  t, h, w = (int(s) for s in size)
  fake = []
  for i in range(0, len(captions), batch_size):
    opts = dict(num_frames=t, height=h, width=w, steps=steps, guidance=guidance, seed=seed + i)
    fake.extend(sampler.generate(captions[i : i + batch_size], **opts))
  return {
    "fd": frechet_of_features(features_of(real), features_of(np.stack(fake))),
    "num_videos": len(captions),
    "extractor": extractor,
  }
