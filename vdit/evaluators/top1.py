"""`top1`: top-1 accuracy and loss of the classifier being trained, on its validation split.

Every example of the split once (the task's `batches`), through the task's `logits` (global
batches over the sharded state, results on every host); slots without a label (−1) and padded
rows do not count. Results: `top1`, `loss` (mean cross-entropy), `examples` (0 of each for a
split without a labelled example).
"""

import flax
import jax
import jax.numpy as jnp
import optax
from clu import metrics

from vdit.evaluators import Context, predict_fn


@flax.struct.dataclass
class Top1(metrics.Collection):
  """Masked means over the split's labelled examples (clu's running totals and counts)."""

  top1: metrics.Accuracy
  loss: metrics.Average.from_output("loss")


def evaluate(ctx: Context) -> dict:
  _, fns, params, workdir, step = ctx
  logits_fn, batches = predict_fn(fns, "logits"), predict_fn(fns, "batches")
  totals = Top1.empty()
  for batch in batches():
    # logits: [B, C] or [B, K, C] (packed slots); labels, valid: [B] or [B, K]
    logits, labels, valid = (jnp.asarray(x) for x in logits_fn(params, batch))
    labels = labels.astype(jnp.int32)
    valid = valid & (labels >= 0)
    loss = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), jnp.maximum(labels, 0)
    )
    totals = totals.merge(
      Top1.single_from_model_output(logits=logits, labels=labels, loss=loss, mask=valid)
    )
  examples = int(totals.top1.count)
  results = {k: float(v) if examples else 0.0 for k, v in totals.compute().items()}
  results["examples"] = examples
  if jax.process_index() == 0:
    print(
      f"validation top-1 {results['top1']:.4f} over {results['examples']} examples "
      f"(loss {results['loss']:.4f}) -> {workdir}/eval/{step}.json",
      flush=True,
    )
  return results
