"""`top1`: top-1 accuracy and loss of the classifier being trained, on its validation split.

Every example of the split once (the task's `batches`), through the task's `logits` (global
batches over the sharded state, results on every host); slots without a label (−1) and padded
rows do not count. Results: `top1`, `loss` (mean cross-entropy), `examples`.
"""

import jax
import numpy as np

from vdit.evaluators import predict_fn


def evaluate(config, fns, params, workdir: str, step: int) -> dict:
  del config
  logits_fn, batches = predict_fn(fns, "logits"), predict_fn(fns, "batches")
  correct = total = 0
  nll = 0.0
  for batch in batches():
    logits, labels, valid = (np.asarray(x) for x in logits_fn(params, batch))
    valid = valid & (labels >= 0)
    logp = np.asarray(jax.nn.log_softmax(logits.astype(np.float32), axis=-1))
    picked = np.take_along_axis(logp, np.maximum(labels, 0)[..., None], -1)[..., 0]
    correct += int(np.sum((np.argmax(logits, -1) == labels) & valid))
    total += int(np.sum(valid))
    nll -= float(np.sum(np.where(valid, picked, 0.0)))
  results = {"top1": correct / max(total, 1), "loss": nll / max(total, 1), "examples": int(total)}
  if jax.process_index() == 0:
    print(
      f"validation top-1 {results['top1']:.4f} over {results['examples']} examples "
      f"(loss {results['loss']:.4f}) -> {workdir}/eval/{step}.json",
      flush=True,
    )
  return results
