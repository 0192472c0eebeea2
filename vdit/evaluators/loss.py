"""`loss`: validation diffusion loss of a video_diffusion model per noise-level bucket.

The task's `batches` (the validation split, one pass) go through its `validation_loss`: the
training objective with fixed rngs, uniform times and no caption dropout or frame conditioning
(plain text-to-video), so two checkpoints are compared on the same noise. Each example's loss
lands in the bucket of its noise level t ∈ [0, 1] (the shifted time the model saw); `loss` is
the token-weighted mean over everything, `loss_t<i>` the mean of bucket i over its examples,
`t_edges` the bucket edges.
"""

import jax
import numpy as np

from vdit.evaluators import Context, predict_fn


def evaluate(
  ctx: Context,
  *,
  num_batches: int = 4,
  num_buckets: int = 5,
  repeats: int = 2,
  seed: int = 0,
) -> dict:
  """`repeats` noise draws per batch (fold_in(seed, batch·repeats + r)); ≤ `num_batches`
  (per host: each batch is global, every host's rows)."""
  fns, params = ctx.fns, ctx.params
  loss_fn, batches = predict_fn(fns, "validation_loss"), predict_fn(fns, "batches")
  edges = np.linspace(0.0, 1.0, num_buckets + 1)
  sums, counts = np.zeros(num_buckets), np.zeros(num_buckets)
  token_loss, tokens = 0.0, 0.0
  base = jax.random.PRNGKey(seed)
  for b, batch in zip(range(num_batches), batches()):
    for r in range(repeats):
      rng = jax.random.fold_in(base, b * repeats + r)
      # [B, K] each, of the global batch (replicated: every host sums the same numbers)
      per_example, t, weight = (np.asarray(x) for x in loss_fn(params, batch, rng))
      valid = weight > 0
      bucket = np.clip(np.digitize(t, edges[1:-1]), 0, num_buckets - 1)
      np.add.at(sums, bucket[valid], per_example[valid])
      np.add.at(counts, bucket[valid], 1)
      token_loss += float(np.sum(per_example * weight))
      tokens += float(np.sum(weight))
  if tokens == 0:
    raise ValueError("the validation split gave no loss tokens; is input.split's dataset empty?")
  out = {"loss": float(token_loss / tokens), "examples": int(counts.sum())}
  for i in range(num_buckets):
    out[f"loss_t{i}"] = float(sums[i] / counts[i]) if counts[i] else None
    out[f"count_t{i}"] = int(counts[i])
  out["t_edges"] = [float(e) for e in edges]
  return out
