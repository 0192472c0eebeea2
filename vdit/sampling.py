r"""The sampler library: a trained VideoDiT generates videos in every mode of one model.

`load(workdir)` → `Sampler` (the EMA params of a checkpoint), with `generate` (text-to-video) and
one method per mode: t2v, t2i, i2v, extend, interpolate, keyframes, edit (SDEdit), loop, retake,
inpaint, outpaint, long (any length, window by window) — docs/sampling.md shows each; `python -m
vdit.sample` is its CLI. Any size works: the model sees packed spacetime patches with their
positions, not a fixed grid, and a size that is not a multiple of the patch size is generated on the
smallest canvas of whole patches that holds it and cropped to it (`Sampler.canvas`). Given frames
are trained conditioning (`vdit.diffusion.conditioning`) and come out unchanged; inputs of another
size are cropped and resized with a warning (`vdit.diffusion.given_frames`); impossible requests
raise `InputError`.

Latent space: with `config.autoencoder` (the workdir of a trained VAE) the model denoises
normalised latents and the sampler decodes them to pixels (`vdit.latent_codec.Codec`); sizes
(`num_frames`/`height`/`width`, `config.sample`) are then in latent units (T', H', W') and a
video of T' latent frames decodes to 1 + ft·(T' − 1) frames of fs·H' × fs·W' pixels. Given
frames (i2v, extend, interpolate, edit, loop) are pixels, resized to fs·H' × fs·W' and encoded
with the VAE first (`Sampler._frames`); a clip given at the end is encoded on its own, so its
first latent frame summarises one frame, not ft (an approximation the forward modes avoid).
Retake/inpaint/outpaint masks are pixels too, mapped to latent cells conservatively (a cell is
kept only if every pixel it encodes is: `given_frames.latent_cells`).
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from vdit import (
  caption_embedders,
  checkpointing,
  latent_codec,
  media,
  models,
  sampling_mesh,
  section_spec,
  sharding,
  tasks,
)
from vdit.axes import BATCH, HEADS, LENGTH
from vdit.data import caption_table, packing, patchify, tokenizer
from vdit.diffusion import given_frames, objectives, sliding_window
from vdit.diffusion.given_frames import InputError, fit_size, patch_frames
from vdit.tasks import restore


@dataclasses.dataclass(frozen=True)
class Settings:
  """`config.sample` of a video run: what `vdit.sample`, the sampling evals and `Sampler` use
  unless told otherwise (sizes in model units: latent ones in latent space)."""

  prompts: tuple[str, ...] = ()  # the `prompts` / `samples` evals' and the CLI's default prompts
  num_frames: int = 8
  height: int = 32
  width: int = 32
  steps: int = 32
  guidance: float = 3.0
  seed: int = 0
  display_scale: int = 1  # nearest-neighbour upscaling of written GIF/MP4 for viewing
  # The mesh samples are drawn on ("sequence:8": one video's tokens over 8 devices; "" = none:
  # the params' own placement); `sampling_mesh.make` reads it.
  mesh: str = ""


def settings(config: ml_collections.ConfigDict) -> Settings:
  """The run's `sample` section (absent keys: the defaults, as in runs from before a key);
  ValueError naming an unknown key, a value of the wrong type or a size below 1."""
  s = section_spec.read(Settings, config.get("sample"), "sample")
  for dim in ("num_frames", "height", "width", "steps", "display_scale"):
    if getattr(s, dim) < 1:  # any size ≥ 1 (cropped from whole patches)
      raise ValueError(f"sample.{dim}={getattr(s, dim)} must be an integer ≥ 1")
  return s


def prompt_rows(
  prompts: Sequence[str],
  grid: tuple,
  tok: tokenizer.Tokenizer | caption_table.CaptionEmbeddings,
  max_tokens: int,
  labels=None,
) -> dict[str, np.ndarray]:
  """One packed row per prompt holding one video of `grid` patches (the packer's rows, without
  `patches`: the sampler draws them); captions tokenized (or embedded, with a caption-embedding
  table) and padded; `labels` (one per prompt) or −1 (null)."""
  length = int(np.prod(grid))
  embedded = isinstance(tok, caption_table.CaptionEmbeddings)
  rows = []
  for i, prompt in enumerate(prompts):
    example = {
      "patches": np.zeros((length, 0), np.float32),
      "positions": patchify.grid_positions(grid),
      "shapes": np.asarray([grid], np.int32),
      "labels": np.asarray([-1 if labels is None else labels[i]], np.int32),
    }
    if embedded:
      ids, example["text_embeddings"] = tok(prompt)
    else:
      ids = tok.encode(prompt, max_tokens)
    example["text_tokens"] = np.asarray(ids, np.int32)
    row = packing.assemble_row([example], length, max_tokens, slots=1)
    del row["patches"]
    rows.append(row)
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


# ---------------------------------------------------------------------------------------------
# The sampler.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Sampler:
  """A model, its (EMA) params and its config; generates videos of any valid size.

  Every mode takes `prompts` (N) and returns uint8 videos [N, T, H, W, 3]. `**options` are
  `height`, `width` (default: the config's `sample` size) and the sampling options of
  `generate`: steps, guidance, seed, sampler, guidance_interval, labels.
  """

  config: ml_collections.ConfigDict
  params: Any
  model: Any = None
  codec: Any = None  # latents → pixels (`latent_codec.Codec`); None: config.autoencoder
  # The mesh to sample on (`sampling_mesh.make`: a Mesh, {"sequence": 8} or "sequence:8"): one
  # video's tokens over `sequence`, heads over `tensor`, params as the run's rules say. None:
  # the params' own placement.
  mesh: Any = None

  def __post_init__(self):
    self.settings = settings(self.config)
    self.model = self.model or models.build(self.config)
    self.mesh = sampling_mesh.make(self.mesh)
    self.rules = sharding.rules_from_config(self.config.sharding_rules)
    if self.mesh is not None:  # a no-op for params restored on this mesh (`load`)
      dummy = lambda: tasks.get(self.config).dummy_inputs(self.config)
      shardings = sampling_mesh.param_shardings(self.model, dummy, self.mesh, self.rules)
      self.params = jax.device_put(self.params, shardings)
    self.channels = models.channels(self.config)
    if self.codec is None and self.config.get("autoencoder"):
      self.codec = latent_codec.load(self.config.autoencoder)
    self.last_latents = None  # latent space: the latents [N, T', H', W', Z] of the last call
    self.patch_size = tuple(self.config.input.patch_size)
    self.pt = self.patch_size[0]
    inp = self.config.input
    if inp.get("text_embeddings"):  # precomputed caption embeddings; new prompts via the embedder
      self.tokenizer = caption_table.CaptionEmbeddings(
        inp.text_embeddings, inp.max_caption_tokens, make_embedder=caption_embedders.from_spec
      )
    else:
      self.tokenizer = tokenizer.Tokenizer(inp.vocab_size)
    self.spec = objectives.Spec.from_config(self.config.diffusion)

  def check_per_frame(self, what: str, why: str) -> None:
    """InputError unless every frame has a latent frame of its own (pixel space, or an
    autoencoder that does not compress time): `what` needs it because `why`."""
    ft = 1 if self.codec is None else self.codec.compression[0]
    if ft != 1:
      raise InputError(
        f"{what} need a per-frame autoencoder (time compression 1); this one compresses time "
        f"{ft}×, so {why}"
      )

  def canvas(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """The smallest size of whole patches holding (num_frames, height, width): what is
    generated before the crop to the requested size."""
    size = (num_frames, height, width)
    for name, n in zip(("num_frames", "height", "width"), size):
      if int(n) < 1:
        raise InputError(f"{name}={n} must be ≥ 1")
    return tuple(-(-int(n) // p) * p for n, p in zip(size, self.patch_size))

  def grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """The patch grid (T/pt, H/ph, W/pw) of the canvas of a requested size."""
    canvas = self.canvas(num_frames, height, width)
    return tuple(n // p for n, p in zip(canvas, self.patch_size))

  def pixel_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """The (T, H, W) in pixels of a video sampled at this size (in latent units in latent space:
    T' latent frames decode to 1 + ft·(T' − 1) frames of fs·H' × fs·W')."""
    if self.codec is None:
      return num_frames, height, width
    ft, fs, _ = self.codec.compression
    return 1 + ft * (num_frames - 1), fs * height, fs * width

  def generate(self, prompts: Sequence[str], *, num_frames: int, **options) -> np.ndarray:
    """Text-to-video: uint8 [N, T, H, W, 3] for N prompts. `options`, those of every mode:
    `height`, `width` (unset: the config's `sample` size), `steps` (32), `guidance` (3.0),
    `seed` (0), `sampler` and `guidance_interval` (guide only for noise levels lo ≤ t ≤ hi;
    both default to the config's `diffusion` ones), `labels` (one per prompt; see `_run`)."""
    h, w, options = self._size(options)
    return self._run(prompts, (num_frames, h, w), **options)

  def text_to_image(self, prompts, **options) -> np.ndarray:
    """Images as 1-frame videos [N, 1, H, W, 3]: one patch-frame, its first frame kept."""
    h, w, options = self._size(options)
    return self._run(prompts, (self.pt, h, w), **options)[:, :1]

  def image_to_video(self, prompts, image, *, num_frames=None, **options) -> np.ndarray:
    """The image [H, W, 3] (or the first frame of [F, H, W, 3]) fills the first patch-frame,
    repeated pt times (a still, as trained); `num_frames` (default: the config's) in all."""
    h, w, options = self._size(options, like=image)
    frames = np.asarray(image)
    if frames.ndim == 4 and frames.shape[0] > 1:
      logging.warning("image: %d frames given, using the first", frames.shape[0])
    still = self._frames(frames[:1] if frames.ndim == 4 else frames, h, w, "image", "first")
    num_frames = num_frames or self.settings.num_frames
    return self._given(prompts, num_frames, h, w, [still], [], options)

  def extend(self, prompts, video, *, direction="forward", num_frames=None, **options):
    """`num_frames` in all (default: the clip's + the config's) with the clip at the start
    (forward: generate what follows) or at the end (backward: what came before)."""
    if direction not in ("forward", "backward"):
      raise InputError(f"direction={direction!r} must be 'forward' or 'backward'")
    h, w, options = self._size(options, like=video)
    keep = "last" if direction == "forward" else "first"
    clip = self._frames(video, h, w, "video", keep)
    num_frames = num_frames or len(clip) + self.settings.num_frames
    head, tail = ([clip], []) if direction == "forward" else ([], [clip])
    return self._given(prompts, num_frames, h, w, head, tail, options)

  def interpolate(self, prompts, video, video2, *, num_frames=None, **options) -> np.ndarray:
    """Connects two clips: `video` at the start, `video2` at the end, `num_frames` in all
    (default: both clips + the config's), the frames between generated."""
    h, w, options = self._size(options, like=video)
    a = self._frames(video, h, w, "video", "last")
    b = self._frames(video2, h, w, "video2", "first")
    num_frames = num_frames or len(a) + len(b) + self.settings.num_frames
    return self._given(prompts, num_frames, h, w, [a], [b], options)

  def keyframes(self, prompts, keyframes, *, num_frames=None, **options) -> np.ndarray:
    """A video through keyframes: `keyframes` is a list of (frames [F, H, W, 3] or an image
    [H, W, 3], frame index), in any order; the patch-frames between them are generated.

    An image (or a 1-frame clip) fills the patch-frame holding its index as a still (pt equal
    frames, as image-to-video), so the frame at the index is the image; a clip must start at a
    multiple of pt (`given_frames.keyframe_start`) and is cut to whole patch-frames. Keyframes
    that overlap or lie outside 0 … num_frames − 1 → InputError. `num_frames` defaults to the
    end of the last keyframe's patch-frames, at least the config's `sample.num_frames`. In
    latent space indices are latent frames, which needs a per-frame autoencoder (ft = 1).
    """
    if not keyframes:
      raise InputError("keyframes: none given; expected a list of (frames, index)")
    self.check_per_frame("keyframes", "a frame index has no latent frame of its own")
    h, w, options = self._size(options, like=keyframes[0][0])
    fitted = []  # (clip [F, ...] of whole patch-frames, index, still, name)
    for i, (frames, index) in enumerate(keyframes):
      name = f"keyframe {i + 1} (@{index})"
      if not isinstance(index, (int, np.integer)) or index < 0:
        raise InputError(f"{name}: the index must be a frame number ≥ 0")
      frames = np.asarray(frames)
      still = frames.ndim == 3 or len(frames) == 1
      fitted.append((self._frames(frames, h, w, name, "first"), int(index), still, name))
    ends = [i - i % self.pt + self.pt if still else i + len(c) for c, i, still, _ in fitted]
    num_frames = num_frames or max(*ends, self.settings.num_frames)
    t = self.canvas(num_frames, h, w)[0]
    clips = [
      (clip, given_frames.keyframe_start(i, len(clip), still, num_frames, self.pt, name), name)
      for clip, i, still, name in fitted
    ]
    given = given_frames.place_at(clips, t, self.pt)
    return self._run(prompts, (num_frames, h, w), given=given, **options)

  def edit(self, prompts, video, *, strength=0.6, num_frames=None, **options) -> np.ndarray:
    """SDEdit (Meng et al. 2022, Sec. 3.2): noise the video to `strength` ∈ (0, 1] of the
    schedule, denoise it with the new prompts. Keeps the first `num_frames` frames (default:
    all)."""
    h, w, options = self._size(options, like=video)
    clip = self._fit(video, h, w, "video", "first")
    num_frames = num_frames or len(clip)
    if num_frames > len(clip):
      raise InputError(f"num_frames={num_frames} exceeds the video's {len(clip)} frames")
    t = self.canvas(num_frames, h, w)[0]
    init = np.concatenate(
      [clip[:num_frames], np.repeat(clip[num_frames - 1 : num_frames], t - num_frames, 0)]
    )
    return self._run(prompts, (num_frames, h, w), init=init[None], strength=strength, **options)

  def retake(self, prompts, video, *, frames, num_frames=None, **options) -> np.ndarray:
    """Regenerates frames a … b − 1 (`frames` = (a, b)) of `video` [F, H, W, 3] with the prompts
    and keeps the others (the `retake` training task). The range widens to whole patch-frames
    (a patch-frame is kept only if all its frames are; `_regenerate`); `num_frames`: the
    video's first frames (model units, as `edit`; default all)."""
    clip = given_frames.rgb_frames(video, "video")
    a, b = given_frames.frame_range(frames, len(clip))
    regen = np.zeros(clip.shape[:3], bool)
    regen[a:b] = True
    return self._regenerate(prompts, clip, regen, num_frames, options, f"frames={a}:{b}")

  def inpaint(self, prompts, video, mask, *, num_frames=None, **options) -> np.ndarray:
    """Regenerates the pixels of `video` [F, H, W, 3] where `mask` ([H, W], the same in every
    frame, or [F, H, W]; booleans or 0…1, nonzero = regenerate) is set, keeping the rest (the
    `inpaint` training task, trained on boxes). The region widens to whole patches."""
    clip = given_frames.rgb_frames(video, "video")
    regen = given_frames.region_mask(mask, clip.shape[:3])
    return self._regenerate(prompts, clip, regen, num_frames, options, "mask")

  def outpaint(
    self, prompts, video, *, height=None, width=None, num_frames=None, **options
  ) -> np.ndarray:
    """`video` [F, H, W, 3] centred on a larger canvas of `height` × `width` (the model's units:
    pixels, latent cells in latent space; each defaults to the video's), the border generated
    (the `outpaint` training task). The given video is never resized; a canvas smaller than it,
    or no larger in either direction → InputError."""
    clip = given_frames.rgb_frames(video, "video")
    fs = self.codec.compression[1] if self.codec is not None else 1
    unit = "latent cells" if self.codec is not None else "pixels"
    size = []
    for name, n, given in (("height", height, clip.shape[1]), ("width", width, clip.shape[2])):
      least = -(-given // fs)
      n = least if n is None else n
      if n < least:
        raise InputError(
          f"outpaint: {name}={n} {unit} is smaller than the video's {given} pixels; expected "
          f"≥ {least} (the video is placed centred on the larger canvas)"
        )
      size.append(int(n))
    (h, w), (_, hv, wv, _) = size, clip.shape
    if (fs * h, fs * w) == (hv, wv):
      raise InputError(
        f"outpaint: height={h}, width={w} is the video's own size, nothing to generate; expected "
        "a larger height or width"
      )
    top, left = (fs * h - hv) // 2, (fs * w - wv) // 2
    pad = ((0, 0), (top, fs * h - hv - top), (left, fs * w - wv - left), (0, 0))
    canvas = np.pad(clip, pad, mode="edge")  # the border's pixels are generated, not kept
    regen = np.ones(canvas.shape[:3], bool)
    regen[:, top : top + hv, left : left + wv] = False
    options = dict(options, height=h, width=w)
    return self._regenerate(prompts, canvas, regen, num_frames, options, "outpaint")

  def loop(self, prompts, *, image=None, num_frames=None, **options) -> np.ndarray:
    """A seamless loop of `num_frames` frames: frame `num_frames` would be frame 0 again.

    Interpolation from a keyframe back to itself (a trained task): a clip of num_frames + pt
    frames whose first and last patch-frames are the keyframe — `image`, or else a
    text-to-image sample of each prompt — is generated; its first num_frames are returned.
    """
    h, w, options = self._size(options, like=image)
    num_frames = num_frames or self.settings.num_frames
    if image is None:
      images = self.text_to_image(prompts, height=h, width=w, **options)  # uint8 [N, 1, H, W, 3]
      key = np.stack([self._frames(im, h, w, "image", "first")[:1] for im in images])
    else:
      key = self._frames(np.asarray(image)[:1] if np.ndim(image) == 4 else image, h, w, "image")
      key = key[:1]
    key = np.repeat(key, self.pt, axis=-4)  # [(N,) pt, H, W, C]
    return self._given(prompts, num_frames + self.pt, h, w, [key], [key], options)[:, :num_frames]

  def long_window(self, window: int | None = None, context: int | None = None) -> tuple[int, int]:
    """`long`'s (window, context) with their defaults filled in: the longest training clip
    (`input.max_frames`, whole patch-frames) and half of it (whole patch-frames)."""
    pt = self.pt
    window = window or max(pt, self.config.input.max_frames // pt * pt)
    return window, context if context is not None else max(pt, window // 2 // pt * pt)

  def long(
    self,
    prompts,
    *,
    num_frames: int,
    window: int | None = None,
    context: int | None = None,
    context_noise: float = 0.0,
    on_chunk=None,
    **options,
  ) -> np.ndarray:
    """A video of any length `num_frames`, generated window by window (`sliding_window`): the
    first `window` frames from the text, then each next window given the last `context` frames
    of what exists (clean, or noised to the time `context_noise` ∈ [0, 1), which needs a model
    trained with the `forcing` task's per-frame noise levels) and generating the rest. Only one
    window is on the device at a time, and every window has one shape (one compilation): the
    device memory does not grow with `num_frames`; the frames are decoded and appended on the
    host window by window. `window` defaults to the longest training clip
    (`input.max_frames`, whole patch-frames), `context` to half the window; in latent space all
    three are latent frames (a per-frame autoencoder is needed: a window's latents are decoded
    on their own). The first window is `generate(num_frames=window)` with the same seed, the
    others draw their noise from (seed, window index). `on_chunk(index, start, frames)`, if
    given, receives each window's frames (uint8 [N, W, H, W, 3], its context included) and its
    first frame's index in the video. Bad requests → InputError before any compute."""
    pt = self.pt
    window, context = self.long_window(window, context)
    chunks = sliding_window.plan(num_frames, window, context, pt)
    if not 0.0 <= context_noise < 1.0:
      raise InputError(f"context_noise={context_noise} must be in [0, 1) (0: a clean context)")
    if context_noise and self.spec.objective != "rectified_flow":
      raise InputError(f"context_noise={context_noise} needs a rectified-flow model")
    if context_noise and self.model.shared_conditioning:
      raise InputError(
        f"context_noise={context_noise}: this model has shared_conditioning (one time per "
        "video), so its context frames cannot carry their own noise level; use context_noise=0"
      )
    self.check_per_frame("long videos", "a window's latents do not decode on their own")
    h, w, options = self._size(options)
    seed = int(options.pop("seed", 0))
    out = latents = tail = None  # the video (uint8), its latents, the context: on the host
    for i, chunk in enumerate(chunks):
      given = None
      if tail is not None:  # the last `context` frames, in the model's space, on the canvas
        t = self.canvas(window, h, w)[0]
        video = np.zeros((len(prompts), t, *tail.shape[2:]), np.float32)
        video[:, :context] = tail
        given = given_frames.Given(video, np.arange(t // pt) < context // pt)
      chunk_seed = seed if i == 0 else int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
      frames = self._run(
        prompts,
        (window, h, w),
        given=given,
        seed=chunk_seed % 2**31,
        cond_time=float(context_noise) if i else 0.0,
        **options,
      )
      space = self.last_latents if self.codec is not None else media.from_uint8(frames)
      tail = self._canvas_pad(space[:, window - context :], h, w)
      if out is None:
        out = np.zeros((len(prompts), num_frames, *frames.shape[2:]), np.uint8)
        if self.codec is not None:
          latents = np.zeros((len(prompts), num_frames, *space.shape[2:]), np.float32)
      keep = slice(chunk.new, chunk.new + chunk.count)
      at = slice(chunk.start + chunk.new, chunk.start + chunk.new + chunk.count)
      out[:, at] = frames[:, keep]
      if latents is not None:
        latents[:, at] = space[:, keep]
      if on_chunk is not None:
        on_chunk(i, chunk.start, frames)
    self.last_latents = latents  # latent space: the whole video's (the CLI's .npz keeps them)
    return out

  def memory_estimate(self, rows: int, length: int) -> int:
    """Bytes a sampling step of `rows` rows of `length` tokens needs at its peak, roughly: the
    attention logits and probabilities of one block ([rows, heads, L, L] float32 each with
    the dense `xla` backend; the kernels keep O(L)), one block's live activations, and the
    sampler's per-token arrays (noise, given frames, state, velocities, neighbour windows).
    On a mesh, per device: rows over `data` × `fsdp`, tokens over `sequence`, the logits'
    heads over `tensor`."""
    m = self.model
    b, s, t = (sampling_mesh.shards(self.mesh, self.rules, a) for a in (BATCH, LENGTH, HEADS))
    rows, local = -(-rows // b), -(-length // s)
    patch_dim = int(np.prod(self.patch_size)) * self.channels
    window = int(np.prod(m.patch_context or (1,)))
    per_token = 4 * (m.width * (6 + 2 * m.mlp_ratio) + patch_dim * (8 + window))
    attention = 8 * -(-m.num_heads // t) * local * s if m.attention_backend == "xla" else 0
    return rows * local * (per_token + attention)

  def check_memory(self, rows: int, length: int) -> None:
    """InputError, before any allocation, if `memory_estimate` exceeds the memory available
    (the device's free memory, or the host's MemAvailable on CPU), naming the largest token
    count that fits."""
    available = _available_bytes()
    need = self.memory_estimate(rows, length)
    if available is None or need <= available:
      return
    fits = 1
    while self.memory_estimate(rows, fits * 2) <= available:
      fits *= 2
    lo, hi = fits, fits * 2  # the largest length that fits lies in [lo, hi)
    while hi - lo > 1:
      mid = (lo + hi) // 2
      lo, hi = (mid, hi) if self.memory_estimate(rows, mid) <= available else (lo, mid)
    pt, ph, pw = self.patch_size
    raise InputError(
      f"{rows // 2} video(s) of {length:,} tokens need about {need / 2**30:,.1f} GiB to sample "
      f"and {available / 2**30:,.1f} GiB are free; at most {lo:,} tokens per video fit "
      f"(tokens = frames/{pt} × height/{ph} × width/{pw}; e.g. fewer frames, a smaller size, "
      "or fewer prompts at once)"
    )

  def _frames(self, frames, h: int, w: int, name: str, keep: str = "first") -> np.ndarray:
    """Given uint8 frames [F, H, W, 3] (or an image) as whole patch-frames of the model's space
    on the canvas of a (h, w) request (`_fit`); `keep` says which frames survive a cut."""
    return patch_frames(self._fit(frames, h, w, name, keep), self.pt, keep, name)

  def _fit(self, frames, h: int, w: int, name: str, keep: str = "first") -> np.ndarray:
    """Given uint8 frames [F, H, W, 3] (or an image) in the model's space: resized to h × w
    pixels, or in latent space resized to fs·h × fs·w, cut to 1 + ft·k frames (`keep` says
    which survive) and encoded to [1 + k, h, w, Z] (the first latent frame summarises frame 0
    alone, so an image is one latent frame, as the VAE was trained); then padded at the bottom
    and right, repeating the edge, to the canvas of whole patches (`canvas`), which the output
    is cropped back from."""
    if self.codec is None:
      video = fit_size(frames, h, w, name)
    else:
      ft, fs, _ = self.codec.compression
      pixels = fit_size(frames, h * fs, w * fs, name)
      usable = 1 + (len(pixels) - 1) // ft * ft
      if usable < len(pixels):
        logging.warning(
          "%s: %d frames cut to %d (1 + %d·k for the VAE)", name, len(pixels), usable, ft
        )
        pixels = pixels[-usable:] if keep == "last" else pixels[:usable]
      video = self.codec.encode(pixels[None])[0]
    return self._canvas_pad(video, h, w)

  def _canvas_pad(self, video: np.ndarray, h: int, w: int) -> np.ndarray:
    """Frames [..., h, w, C] in the model's space padded at the bottom and right, repeating the
    edge, to the canvas of whole patches (`canvas`)."""
    _, hc, wc = self.canvas(1, h, w)
    pad = [(0, 0)] * (video.ndim - 3) + [(0, hc - h), (0, wc - w), (0, 0)]
    return np.pad(video, pad, mode="edge")

  def _size(self, options: dict, like=None) -> tuple[int, int, dict]:
    """(height, width, the other options): the requested size, else that of `like` (the given
    image or video, [..., H, W, 3]; in latent units in latent space), else the config's
    sample size."""
    s = self.settings
    options = dict(options)
    h, w = options.pop("height", None), options.pop("width", None)
    if like is not None:
      fs = self.codec.compression[1] if self.codec is not None else 1
      H, W = np.shape(like)[-3:-1]
      h, w = h or H // fs or None, w or W // fs or None
    return h or s.height, w or s.width, options

  def _regenerate(self, prompts, video, regen, num_frames, options, name: str) -> np.ndarray:
    """`video` uint8 [F, H, W, 3] with its pixels where `regen` [F, H, W] is True generated anew
    and the rest kept as clean tokens (retake, inpaint, outpaint). A token is kept only if every
    pixel it covers is (in latent space: every latent cell, each kept only if every pixel it
    encodes is); the canvas of whole patches repeats the edge cells (the crop drops them).
    `num_frames` (model units): the video's first (default: all). All checks before encoding."""
    h, w, options = self._size(options, like=video)
    ft, fs, _ = self.codec.compression if self.codec is not None else (1, 1, 1)
    kept = ~given_frames.fit_mask(regen, fs * h, fs * w)[: 1 + (len(regen) - 1) // ft * ft]
    cells = given_frames.latent_cells(kept, (ft, fs, fs)) if self.codec is not None else kept
    num_frames = num_frames or len(cells)
    if num_frames > len(cells):
      raise InputError(f"num_frames={num_frames} exceeds the video's {len(cells)} frames")
    t, hc, wc = self.canvas(num_frames, h, w)
    cells = np.pad(cells[:num_frames], ((0, t - num_frames), (0, hc - h), (0, wc - w)), "edge")
    tokens = given_frames.pool_all(cells, self.patch_size)
    if tokens.all():
      raise InputError(
        f"{name}: nothing to regenerate in the first {num_frames} frames; expected a region "
        "to generate"
      )
    if not tokens.any():
      raise InputError(
        f"{name}: nothing to keep, every patch {self.patch_size} holds a pixel to regenerate; "
        "expected a region to keep (to generate everything: text-to-video)"
      )
    whole = tokens.repeat(self.pt, 0).repeat(self.patch_size[1], 1).repeat(self.patch_size[2], 2)
    widened = int((cells & ~whole)[:num_frames, :h, :w].sum())
    if widened:
      logging.warning(
        "%s: %d %s to keep (over all frames) share a patch %s with ones to regenerate and are "
        "regenerated too",
        *(name, widened, "latent cells" if self.codec else "pixels", self.patch_size),
      )
    clip = self._fit(video, h, w, "video", "first")[:num_frames]
    clip = np.pad(clip, ((0, t - num_frames), (0, 0), (0, 0), (0, 0)), mode="edge")
    given = given_frames.Given.region(clip[None], tokens)
    return self._run(prompts, (num_frames, h, w), given=given, **options)

  def _given(self, prompts, num_frames, h, w, head, tail, options) -> np.ndarray:
    """Clips at the start (`head`) and the end (`tail`) of a `num_frames`-frame video, the
    rest generated. On a longer canvas (`num_frames` not whole patch-frames) the frames past
    the request are dropped after the generation: the last ones without a tail, the first ones
    without a head, else the last generated frames before the tail (one step of the motion is
    then a double one)."""
    given_count = sum(len(c) if c.ndim == 4 else c.shape[1] for c in head + tail)
    if num_frames <= given_count:
      raise InputError(
        f"num_frames={num_frames} leaves nothing to generate after the {given_count} given "
        f"frames; expected more than {given_count}"
      )
    t = self.canvas(num_frames, h, w)[0]
    given = given_frames.place(head, tail, t, self.pt)
    keep, extra = np.arange(t), t - num_frames
    if extra and not tail:
      keep = keep[:num_frames]
    elif extra and not head:
      keep = keep[extra:]
    elif extra:
      end = t - given.last * self.pt  # the first frame of the tail
      keep = np.delete(keep, np.arange(end - extra, end))
    return self._run(prompts, (num_frames, h, w), given=given, frames=keep, **options)

  def _run(
    self,
    prompts: Sequence[str],
    size: tuple[int, int, int],
    *,
    given: given_frames.Given | None = None,
    init: np.ndarray | None = None,
    frames: np.ndarray | None = None,
    strength: float = 1.0,
    steps: int = 32,
    guidance: float = 3.0,
    seed: int = 0,
    sampler: str | None = None,
    guidance_interval: tuple[float, float] | None = None,
    labels: Sequence[int] | None = None,
    cond_time: float = 0.0,
  ) -> np.ndarray:
    """Denoises one row per prompt (plus its null row for guidance) on the canvas of `size`
    (T, H, W) and crops it to `size`: its first T frames, or the canvas frames `frames`
    → uint8 videos. `cond_time` > 0: the given tokens are noised to that time with the
    video's own noise and held there (a noisy context, `long`)."""
    prompts, sampler = list(prompts), sampler or self.spec.default_sampler
    grid, (t, h, w) = self.grid(*size), size
    interval = tuple(float(x) for x in (guidance_interval or self.spec.guidance_interval))
    try:
      self.spec.check_request(steps, strength, sampler, interval)
    except ValueError as e:
      raise InputError(str(e)) from None
    if labels is not None and len(labels) != len(prompts):
      raise InputError(f"{len(labels)} labels for {len(prompts)} prompts; expected one each")
    n, max_tokens = len(prompts), self.config.input.max_caption_tokens
    guided = float(guidance) != 1.0  # guidance 1 is the conditional call alone: no null rows
    self.check_memory(2 * n if guided else n, int(np.prod(grid)))  # prompt (and null) rows
    cond = prompt_rows(prompts, grid, self.tokenizer, max_tokens, labels)
    rows = cond
    if guided:
      null = prompt_rows([""] * n, grid, self.tokenizer, max_tokens)
      rows = {k: np.concatenate([cond[k], null[k]]) for k in cond}
    length, patch_dim = int(np.prod(grid)), int(np.prod(self.patch_size)) * self.channels
    rng, noise_rng = jax.random.split(jax.random.PRNGKey(seed))
    noise_fn = objectives.noise_fn(self.spec, cond["segment_ids"], cond["positions"])
    noise = noise_fn(noise_rng, (n, length, patch_dim))
    x_cond, cond_mask = np.zeros((n, length, patch_dim), np.float32), np.zeros((n, length), bool)
    if given is not None:
      x_cond[:], cond_mask[:] = given.tokens(grid, self.patch_size)
    if cond_time:
      noisy = (1 - cond_time) * x_cond + cond_time * np.asarray(noise)
      x_cond = np.where(cond_mask[..., None], noisy, x_cond).astype(np.float32)
    x_init = x_cond * 0 + (0 if init is None else patchify.patchify(init, self.patch_size)[0])
    x0 = sampling_mesh.sample_rows(
      *(self.model, self.params, self.mesh, self.rules),
      *(rows, noise, x_cond, cond_mask, x_init, rng),
      float(guidance),
      interval,
      spec=self.spec,
      steps=steps,
      sampler=sampler,
      strength=float(strength),
      cond_time=float(cond_time),
    )
    x0 = sharding.to_host(x0)[:, :length]  # the videos may span hosts; padding cut off
    videos = patchify.unpatchify(x0, grid, self.patch_size, self.channels)
    videos = videos[:, np.arange(t) if frames is None else frames, :h, :w]
    if self.codec is not None:
      self.last_latents = videos
      videos = np.clip(self.codec.decode(videos), -1.0, 1.0)
    return media.to_uint8(videos)


def _available_bytes() -> int | None:
  """Free memory of this host's first device (accelerators report it), else MemAvailable."""
  stats = jax.local_devices()[0].memory_stats() or {}  # this host's (others: not addressable)
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


# ---------------------------------------------------------------------------------------------
# Loading from a workdir.
# ---------------------------------------------------------------------------------------------
def configured_mesh(config: ml_collections.ConfigDict) -> str:
  """`sample.mesh` of a run: the mesh its sampling uses unless a caller names one, e.g.
  "sequence:8" ("" = none: the params' own placement; runs from before the key have none)."""
  return settings(config).mesh


def load(workdir: str, step: int | None = None, mesh: Any = None) -> Sampler:
  """The EMA params of the latest (or given) checkpoint in `workdir`: replicated locally, or
  restored sharded on `mesh` (`Sampler.mesh`; None: the run's `sample.mesh`, "": none) and
  sampled there."""
  given, mesh = mesh is not None, sampling_mesh.make(mesh)  # a bad request fails first
  config = checkpointing.read_config(workdir)
  if tasks.name_of(config) != "video_diffusion":  # before its `sample` section is read
    raise InputError(
      f"{workdir!r} holds a task={tasks.name_of(config)!r} run; vdit.sample generates from "
      "video_diffusion runs (configs/vdit/*.py)"
    )
  if not given:
    mesh = sampling_mesh.make(configured_mesh(config))
  config, step, params = restore.ema_params(workdir, step, config, mesh)
  logging.info("loaded step %d from %s", step, workdir)
  model = tasks.get(config).build_model(config)
  return Sampler(config=config, params=params, model=model, mesh=mesh)
