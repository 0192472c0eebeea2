"""`loss`: validation diffusion loss of a video_diffusion model per noise-level bucket.

The task's validation batches (`make_iterator(train=False, split="validation")`) go through
the training objective (`objectives.loss`) with fixed rngs, uniform times and no caption
dropout or frame conditioning (plain text-to-video), so two checkpoints are compared on the
same noise. Each example's loss lands in the bucket of its noise level t ∈ [0, 1] (the shifted
time the model saw); `loss` is the token-weighted mean over everything, `loss_t<i>` the mean
of bucket i over its examples, `t_edges` the bucket edges.
"""

import dataclasses

import jax
import numpy as np
from jax.experimental import multihost_utils

from vdit import tasks
from vdit.diffusion import objectives
from vdit.tasks import video_diffusion


def evaluate(
  config,
  params,
  workdir: str,
  step: int,
  *,
  num_batches: int = 4,
  num_buckets: int = 5,
  repeats: int = 2,
  seed: int = 0,
) -> dict:
  """`repeats` noise draws per batch (fold_in(seed, batch·repeats + r)); ≤ `num_batches`."""
  del workdir, step
  task = tasks.get(config)
  model = task.build_model(config)
  spec = dataclasses.replace(
    objectives.Spec.from_config(config.diffusion), time_sampling="uniform", text_dropout=0.0
  )
  keys = task.batch_keys(config)

  @jax.jit
  def loss_fn(params, batch, rng):
    batch = dict(batch, cond_mask=batch["cond_mask"] & False)
    _, aux = objectives.loss(spec, video_diffusion.packed_apply(model, params), batch, rng)
    return aux["per_example_loss"], aux["t"], aux["num_tokens"]

  edges = np.linspace(0.0, 1.0, num_buckets + 1)
  sums, counts = np.zeros(num_buckets), np.zeros(num_buckets)
  token_loss, tokens = 0.0, 0.0
  base = jax.random.PRNGKey(seed)
  iterator = task.make_iterator(config, train=False, split="validation")
  for b, batch in zip(range(num_batches), iterator):
    batch = {k: batch[k] for k in keys}
    weight = _example_tokens(batch)  # [B, K] loss tokens per example
    for r in range(repeats):
      rng = jax.random.fold_in(base, b * repeats + r)
      per_example, t, _ = (np.asarray(x) for x in loss_fn(params, batch, rng))
      valid = weight > 0
      bucket = np.clip(np.digitize(t, edges[1:-1]), 0, num_buckets - 1)
      np.add.at(sums, bucket[valid], per_example[valid])
      np.add.at(counts, bucket[valid], 1)
      token_loss += float(np.sum(per_example * weight))
      tokens += float(np.sum(weight))
  totals = np.concatenate([sums, counts, [token_loss, tokens]])
  if jax.process_count() > 1:
    totals = np.sum(multihost_utils.process_allgather(totals), axis=0)
  sums, counts = totals[:num_buckets], totals[num_buckets : 2 * num_buckets]
  token_loss, tokens = totals[-2:]
  if tokens == 0:
    raise ValueError("the validation split gave no loss tokens; is input.split's dataset empty?")
  out = {"loss": float(token_loss / tokens), "examples": int(counts.sum())}
  for i in range(num_buckets):
    out[f"loss_t{i}"] = float(sums[i] / counts[i]) if counts[i] else None
    out[f"count_t{i}"] = int(counts[i])
  out["t_edges"] = [float(e) for e in edges]
  return out


def _example_tokens(batch) -> np.ndarray:
  """Loss tokens per example slot [B, K] (segments 1..K of `loss_mask` tokens)."""
  k = batch["shapes"].shape[1]
  seg = np.asarray(batch["segment_ids"])
  mask = np.asarray(batch["loss_mask"]) | np.asarray(batch["cond_mask"])
  return np.stack([np.sum((seg == i + 1) & mask, axis=1) for i in range(k)], axis=1)
