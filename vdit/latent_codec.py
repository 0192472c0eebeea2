"""A trained autoencoder as a codec between pixels and the latents a model denoises.

`load(workdir)` gives a `Codec`: the EMA params of the run's latest checkpoint, its model and
the `LatentStats` its evaluation stored (workdir/latent_stats.json). `Codec.encode` maps video
[B, T, H, W, 3] in [-1, 1] to *normalised* latents (posterior mean, (z − shift)/scale) and
`Codec.decode` inverts it; `Codec.identity()` is pixel space. The sampler decodes with it
(`vdit.sampling`); `python -m vdit.tools.encode_latents` encodes a dataset once with it.
"""

import dataclasses
from typing import Any

import jax
import numpy as np

from vdit import checkpointing, tasks
from vdit.models import autoencoder as ae
from vdit.models import tiling
from vdit.tasks import autoencoding as ae_task
from vdit.tasks import restore


@dataclasses.dataclass
class Codec:
  model: Any  # VideoAutoencoder or IdentityAutoencoder
  variables: Any  # {"params": ...} (None for the identity)
  stats: ae.LatentStats
  workdir: str | None = None  # the autoencoder run (None: pixel space)

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
  return Codec(model, {"params": params}, ae_task.load_stats(workdir), workdir=workdir)
