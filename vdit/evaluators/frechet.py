"""`frechet`: Fréchet distance between real and generated videos in a feature space.

FD = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^½)  (Heusel et al. 2017, FID Eq. 6; FVD uses the
same formula on I3D features, Unterthiner et al. 2018). The matrix square root is taken as
(Σ_r^½ Σ_g Σ_r^½)^½ through symmetric eigendecompositions (`scipy.linalg.eigh`), which equals
Tr((Σ_r Σ_g)^½) and stays real and stable for rank-deficient covariances; with fewer videos
than feature dimensions `frechet_of_features` takes the same trace from the samples (the nuclear
norm of A_r A_gᵀ), which is exact and O(N²D) instead of O(D³).

Feature extractors (`extractor` option):
  classifier   the penultimate layer of a classifier trained in this project
               (`classifier_workdir`, e.g. `configs/vit/digits.py:tiny`); per frame, averaged
               over each video's frames (`Classifier.features`).
  inception    Inception-v3 as used for FID (pytorch-fid's variant of the TF 2015-12-05 graph):
               2048-d pool3 features at 299×299, per frame, averaged over each video's frames
               (`frames="mean"`) or of its middle frame (`frames="middle"`).
  i3d          I3D (Kinetics-400) as used for FVD: the 400 logits (`features="logits"`) or the
               1024-d pool (`features="pool"`) at 224×224, videos padded to ≥ 9 frames.
               Both read `weights=<.npz|.safetensors>`: the reference PyTorch state dict converted
               once by the user (vdit downloads nothing; `vdit/evaluators/extractors/`,
               docs/evaluation.md).

Real videos come from the validation split of `dataset` (default: the run's dataset), the
generated ones from the task's `sampler` on the real videos' captions at `size`.
"""

from collections.abc import Callable

import numpy as np
from scipy import linalg

from vdit import sampling
from vdit.evaluators import Context, classifier, predict_fn
from vdit.evaluators.extractors import i3d, inception
from vdit.evaluators.validation import real_videos

Extractor = Callable[[np.ndarray], np.ndarray]  # uint8 videos [N, T, H, W, 3] -> [N, D]
EXTRACTORS: dict[str, Callable[..., Extractor]] = {}


def register_extractor(name: str, factory: Callable[..., Extractor]) -> None:
  """Adds a feature-extractor factory `factory(**options) -> (videos -> features [N, D])`."""
  EXTRACTORS[name] = factory


def _centred(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean [D], A [N, D]) of features [N, D] with Σ = AᵀA (unbiased, as in FID)."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"features {features.shape}: need [N, D] with N ≥ 2")
  mu = features.mean(0)
  return mu, (features - mu) / np.sqrt(features.shape[0] - 1)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean [D], covariance [D, D]) of features [N, D] (unbiased, as in FID)."""
  mu, a = _centred(features)
  return mu, a.T @ a


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
  """FD between Gaussians fitted to features [N_r, D] and [N_g, D].

  With fewer samples than dimensions (e.g. 32 videos, 2048-d Inception features) the trace term
  comes from the samples, O(N²D) instead of the O(D³) of D×D eigendecompositions: with Σ = AᵀA
  (A = centred features [N, D] / √(N − 1)) the nonzero eigenvalues of Σ_r Σ_g are the squared
  singular values of A_r A_gᵀ, so Tr((Σ_r Σ_g)^½) = ‖A_r A_gᵀ‖_* and Tr Σ = ‖A‖_F².
  """
  (mu1, a1), (mu2, a2) = _centred(real), _centred(fake)
  if max(len(a1), len(a2)) >= a1.shape[1]:
    return frechet_distance(mu1, a1.T @ a1, mu2, a2.T @ a2)
  cross = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
  value = float(np.sum((mu1 - mu2) ** 2) + np.sum(a1**2) + np.sum(a2**2) - 2 * cross)
  return max(value, 0.0)


def _classifier_extractor(classifier_workdir: str, classifier_step: int | None = None, **_):
  clf = classifier.load(classifier_workdir, classifier_step)
  return lambda videos: clf.features(videos).mean(axis=1)  # [N, T', D] → [N, D]


def _inception_extractor(**options):
  return inception.extractor(**options)  # weights, frames, batch_size


def _i3d_extractor(**options):
  return i3d.extractor(**options)  # weights, features, min_frames, batch_size


register_extractor("classifier", _classifier_extractor)
register_extractor("inception", _inception_extractor)
register_extractor("i3d", _i3d_extractor)


def evaluate(
  ctx: Context,
  *,
  extractor: str = "classifier",
  num_videos: int = 32,
  size: tuple[int, int, int] = (8, 32, 32),
  steps: int = 16,
  guidance: float | None = None,
  seed: int = 0,
  dataset: str | None = None,
  dataset_config: str | None = None,
  batch_size: int = 16,
  max_aspect: float | None = None,
  sizes: tuple[tuple[int, int, int], ...] = (),
  **extractor_options,
) -> dict:
  """FD between `num_videos` validation videos and videos generated from their captions
  (`guidance` defaults to the config's `sample.guidance`). When the split has twice as many
  videos, `fd_real` is the FD between the first `num_videos` and the next ones — the distance
  two real sets of this size keep — and `fd_ratio` = fd / fd_real. `max_aspect` keeps only real
  clips whose aspect ratio is within that factor of `size`'s (a clip of another aspect is
  squashed to `size`, distorting its content; the generated videos are not). With `sizes`
  (instead of `size`), every real clip is resized to the one of `sizes` nearest its own aspect
  and its caption generated at that size: no clip is left out, none stretched by more than the
  sizes' aspect steps (the features must then not depend on the frame size, as the ink-crop
  classifier's do not)."""
  config, fns, params = ctx.config, ctx.fns, ctx.params
  if extractor not in EXTRACTORS:
    raise ValueError(f"extractor={extractor!r} is unknown; expected one of {sorted(EXTRACTORS)}")
  features_of = EXTRACTORS[extractor](**extractor_options)
  sampler = predict_fn(fns, "sampler")(params)
  if guidance is None:
    guidance = sampling.settings(config).guidance
  sizes = [tuple(int(x) for x in s) for s in (sizes or (size,))]  # the model's units
  pixels = [sampler.pixel_size(*s) for s in sizes]
  videos, captions, picked = real_videos(
    config, 2 * num_videos, pixels, dataset, dataset_config, max_aspect
  )
  n = min(num_videos, len(videos))
  fake = [None] * n
  for k, (t, h, w) in enumerate(sizes):
    idx = [i for i in range(n) if picked[i] == k]
    for j in range(0, len(idx), batch_size):
      chunk = idx[j : j + batch_size]
      opts = dict(num_frames=t, height=h, width=w, steps=steps, guidance=guidance, seed=seed + j)
      for i, video in zip(chunk, sampler.generate([captions[i] for i in chunk], **opts)):
        fake[i] = video

  def features(vids, which) -> np.ndarray:  # one extraction per size, in clip order
    out = [None] * len(which)
    for k in sorted(set(which)):
      idx = [i for i, p in enumerate(which) if p == k]
      for i, f in zip(idx, features_of(np.stack([vids[i] for i in idx]))):
        out[i] = f
    return np.stack(out)

  real_features = features(videos[:n], picked[:n])
  out = {
    "fd": frechet_of_features(real_features, features(fake, picked[:n])),
    "num_videos": n,
    "extractor": extractor,
    "per_size": [picked[:n].count(k) for k in range(len(sizes))],
  }
  if len(videos) - n == n:
    out["fd_real"] = frechet_of_features(real_features, features(videos[n:], picked[n:]))
    out["fd_ratio"] = out["fd"] / max(out["fd_real"], 1e-12)
  return out
