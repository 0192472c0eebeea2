"""`reconstruction`: how well an autoencoder codes its validation split (autoencoder task).

The whole split (the task's `batches`) is coded with the posterior mean (the task's
`reconstruct`): `psnr` (dB, on [0, 1] pixels, per clip, then averaged), `ssim` (per frame,
then averaged), `examples`, and the per-channel `latent_mean` / `latent_std` of the latents,
which are also written, as the `LatentStats` that latent consumers normalise with, to
workdir/latent_stats.json. For clips of several frames, `psnr_later_frames` (the frames after
the first) against `psnr_copy_first_frame` (repeating frame 0 there): the margin is what the
later latents contribute. A PNG of validation frames above their reconstructions goes to
workdir/samples/<step>/reconstructions.png.
"""

import jax
import numpy as np
from etils import epath

from vdit import media
from vdit.evaluators import Context, predict_fn
from vdit.models import autoencoder as ae
from vdit.tasks import autoencoding as ae_task


def evaluate(ctx: Context) -> dict:
  config, fns, params, workdir, step = ctx
  reconstruct, batches = predict_fn(fns, "reconstruct"), predict_fn(fns, "batches")
  totals = None  # clips, Σ psnr, Σ ssim, Σ z, Σ z² (over the global batches)
  mse_later = np.zeros(2, np.float64)  # Σ MSE of frames ≥ 1: reconstruction, frame-0 copy
  positions, shown = None, None
  for batch in batches():
    out = reconstruct(params, batch)
    v = np.asarray(out["valid"], np.float64)
    p, s, s1, s2, later, copy = (
      np.asarray(out[k], np.float64)
      for k in ("psnr", "ssim", "sum_z", "sum_z2", "mse_later", "mse_copy")
    )
    if totals is None:
      totals = np.zeros(3 + 2 * s1.shape[-1], np.float64)
      positions = int(out["positions"])
      recon = np.asarray(out["recon"])  # the global batch's first clips
      shown = (batch["video"][: len(recon)], recon)  # this host's first (host 0: the global's)
    totals += np.concatenate([[v.sum(), p @ v, s @ v], v @ s1, v @ s2])
    mse_later += [later @ v, copy @ v]
  if totals is None:
    raise ValueError("the validation split gave no batch; is input.split's dataset empty?")
  z = (len(totals) - 3) // 2
  n = max(totals[0], 1.0)
  to_db = lambda mse: float(10.0 * np.log10(1.0 / max(mse / n, 1e-10)))
  stats = ae.LatentStats.from_moments(totals[0] * positions, totals[3 : 3 + z], totals[3 + z :])
  results = {
    "psnr": float(totals[1] / n),
    "ssim": float(totals[2] / n),
    "examples": int(totals[0]),
    "latent_mean": stats.shift,
    "latent_std": stats.scale,
  }
  if config.input.size[0] > 1:
    results["psnr_later_frames"] = to_db(mse_later[0])
    results["psnr_copy_first_frame"] = to_db(mse_later[1])
  if jax.process_index() == 0:
    stats_path = epath.Path(workdir) / ae_task.STATS_FILE
    stats_path.parent.mkdir(parents=True, exist_ok=True)
    stats_path.write_text(stats.to_json())
    png = f"{workdir}/samples/{step}/reconstructions.png"
    original, recon = (media.to_uint8(x) for x in shown)
    rows = np.concatenate([original, recon], axis=2)  # [N, T, 2H, W, 3]: frame over recon
    media.write_image(png, media.grid(rows), scale=2)
    results["files"] = [str(stats_path), png]
    print(
      f"validation PSNR {results['psnr']:.2f} dB  SSIM {results['ssim']:.4f} over "
      f"{results['examples']} clips -> {workdir}/eval/{step}.json\nlatent stats -> {stats_path}",
      flush=True,
    )
  return results
