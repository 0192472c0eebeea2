"""A trained classifier workdir as a frame scorer, and the evaluators built on it.

  digits  digit accuracy of generated `moving_digits` videos: one video per digit prompt
          ("a handwritten {d} moving {direction}"), every frame classified by a classifier
          trained in this project (`configs/vit/digit_crops.py:tiny` through
          `python -m vdit.main`: a ViT on the box around each frame's ink, `input.fit="ink"`,
          `vdit.data.ink_crop`; ≈ 93% top-1 on held-out writers); `frame_accuracy` (frames
          classified as the prompt's digit), `video_accuracy` (majority vote over each video's
          frames), chance 0.1. A class-conditional image model (`configs/dit/digits.py`) is
          scored the same way on its images of each class.

`Classifier(workdir).logits(videos)` / `.features(videos)` take uint8 videos [N, T, H, W, 3] of
any size and return per-frame outputs [N, T, ·] (ViT, NaViT) or per-clip [N, 1, ·] (ViViT).
`features` are the penultimate layer (the pooled representation before the head), the
in-project feature space of `frechet`. Frames are preprocessed exactly as the classifier's
training batches were (`dense.FixedSize` with the run's `input.size` and `input.fit`: for
fit="ink" the same ink crop), so a classifier's validation top-1 carries over to real frames.
"""

import functools

import jax
import ml_collections
import numpy as np

from vdit import checkpointing, media, tasks
from vdit.data import dense, patchify, transforms
from vdit.evaluators import Context, predict_fn
from vdit.tasks import classification, restore


class Classifier:
  """The EMA params of a classification workdir and its input preprocessing."""

  def __init__(self, workdir: str, step: int | None = None):
    config = checkpointing.read_config(workdir)
    if tasks.name_of(config) != "classification":
      raise ValueError(
        f"{workdir!r} holds a task={tasks.name_of(config)!r} run; a classifier workdir "
        "(e.g. configs/vit/digit_crops.py) is needed"
      )
    self.config, self.step, params = restore.ema_params(workdir, step, config)
    self.name = self.config.model.name
    self.params = params
    self.model = tasks.get(self.config).build_model(self.config)
    headless = ml_collections.ConfigDict(self.config.to_dict())
    headless.model.num_classes = 0  # the model returns its pooled features
    self.body = tasks.get(headless).build_model(headless)
    self.body_params = {k: v for k, v in params.items() if k != "head"}

  def logits(self, videos: np.ndarray) -> np.ndarray:
    return self._apply(self.model, self.params, videos)

  def features(self, videos: np.ndarray) -> np.ndarray:
    return self._apply(self.body, self.body_params, videos)

  def _apply(self, model, params, videos: np.ndarray, batch: int = 64) -> np.ndarray:
    # [N, T, H, W, 3] in [-1, 1], converted bit for bit as the training batches were.
    videos = transforms.ToFloat().map({"video": np.asarray(videos)})["video"]
    n, t = videos.shape[:2]
    if self.name == "vivit":
      inputs, per = [self._dense(v) for v in videos], 1
    else:
      frames = videos.reshape(n * t, 1, *videos.shape[2:])
      prep = self._packed if self.name in classification.PACKED_MODELS else self._dense
      inputs, per = [prep(f) for f in frames], t
    outs = []
    for i in range(0, len(inputs), batch):
      stacked = jax.tree_util.tree_map(lambda *x: np.stack(x), *inputs[i : i + batch])
      outs.append(np.asarray(_run(model, params, self.name, stacked)))
    out = np.concatenate(outs)
    return out.reshape(n, per, out.shape[-1])

  def _dense(self, video: np.ndarray) -> dict:
    """[T, H, W, 3] → the input.size clip the dense pipeline would make (`dense.FixedSize`, with
    the run's `input.fit`: "ink" crops each frame to its ink box as in training)."""
    fit = self.config.input.get("fit", "crop")
    clip = dense.FixedSize(self.config.input.size, fit).map({"video": video})["video"]
    return {"x": clip[0] if self.name == "vit" else clip}

  def _packed(self, frame: np.ndarray) -> dict:
    """A [1, H, W, 3] frame → one packed row at the largest grid within the token budget."""
    _, ph, pw = self.config.input.patch_size
    h, w = frame.shape[1:3]
    budget = self.config.input.max_tokens_per_example
    grid = transforms.fit_grid((1, max(1, round(h / ph)), max(1, round(w / pw))), budget)
    resized = transforms.area_resize(frame, grid[1] * ph, grid[2] * pw)
    tokens, positions, grid = patchify.patchify(resized, (1, ph, pw))
    length = tokens.shape[0]
    return {
      "patches": tokens.astype(np.float32),
      "positions": positions.astype(np.int32),
      "segment_ids": np.ones(length, np.int32),
      "shapes": np.asarray([grid], np.int32),
    }


@functools.partial(jax.jit, static_argnums=(0, 2))
def _run(model, params, name: str, inputs: dict) -> jax.Array:
  if name in classification.PACKED_MODELS:
    args = (inputs["patches"], inputs["positions"], inputs["segment_ids"], inputs["shapes"])
    return model.apply({"params": params}, *args)[:, 0]  # [B, K=1, C] → [B, C]
  return model.apply({"params": params}, inputs["x"])


@functools.cache
def load(workdir: str, step: int | None = None) -> Classifier:
  """A cached `Classifier` (evaluations at many steps restore it once)."""
  return Classifier(workdir, step)


DIRECTIONS = ("left", "right", "up", "down")


def digits(
  ctx: Context,
  *,
  classifier_workdir: str,
  classifier_step: int | None = None,
  videos_per_digit: int = 1,
  size: tuple[int, int, int] = (8, 32, 32),
  steps: int = 16,
  guidance: float = 3.0,
  seed: int = 0,
) -> dict:
  """Generates `videos_per_digit` videos of each digit 0-9 at `size` and classifies them.

  A class-conditional image model (a task with `generate`, e.g. `configs/dit/digits.py`) draws
  `videos_per_digit` images of each class instead, at its own size, scored as 1-frame videos."""
  fns, params = ctx.fns, ctx.params
  clf = load(classifier_workdir, classifier_step)
  labels = np.asarray([d for d in range(10) for _ in range(videos_per_digit)])
  if "generate" in fns:  # class-conditional: the label is the digit
    images = fns["generate"](params, labels, steps=steps, guidance_scale=guidance, seed=seed)
    return digit_accuracy(clf, media.to_uint8(images)[:, None], labels)
  prompts = [f"a handwritten {d} moving {DIRECTIONS[i % 4]}" for i, d in enumerate(labels)]
  t, h, w = (int(s) for s in size)
  videos = predict_fn(fns, "sampler")(params).generate(
    prompts, num_frames=t, height=h, width=w, steps=steps, guidance=guidance, seed=seed
  )
  return digit_accuracy(clf, videos, labels)


def digit_accuracy(clf: Classifier, videos: np.ndarray, labels: np.ndarray) -> dict:
  """Frame and (majority-vote) video accuracy of `clf` on uint8 videos [N, T, H, W, 3]."""
  pred = np.argmax(clf.logits(videos), axis=-1)  # [N, T']
  votes = np.stack([np.bincount(p, minlength=10).argmax() for p in pred])
  return {
    "frame_accuracy": float(np.mean(pred == labels[:, None])),
    "video_accuracy": float(np.mean(votes == labels)),
    "chance": 0.1,
    "num_videos": int(len(labels)),
  }
