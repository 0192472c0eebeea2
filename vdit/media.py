"""Reading and writing the videos people look at: GIF, MP4 and NPZ (raw frames + metadata)."""

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

FORMATS = (".gif", ".mp4", ".npz")


def to_uint8(video: np.ndarray) -> np.ndarray:
  """[-1, 1] float video → uint8 [T, H, W, C]."""
  video = np.asarray(video, np.float32)
  return np.clip(np.round((video + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(video: np.ndarray) -> np.ndarray:
  """uint8 video → float32 in [-1, 1]."""
  return np.asarray(video, np.float32) / 127.5 - 1.0


def upscale(video: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour spatial upscaling for display (tiny videos are hard to see)."""
  if factor == 1:
    return video
  return video.repeat(factor, axis=-3).repeat(factor, axis=-2)


def check_path(path: str, *, writable: bool = False) -> str:
  """The output format of `path` (its extension); ValueError unless it is one of FORMATS or,
  with `writable`, unless its directory can be created and written (checked by writing a probe
  file, before any compute)."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in FORMATS:
    raise ValueError(f"output {path!r} has extension {ext!r}; expected one of {FORMATS}")
  if writable:
    directory = os.path.dirname(os.path.abspath(path))
    existing = directory
    while not os.path.exists(existing):
      existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
      raise ValueError(f"output {path!r} cannot be written: {existing!r} is a file")
    try:
      os.makedirs(directory, exist_ok=True)
      with tempfile.NamedTemporaryFile(dir=directory, prefix=".vdit_probe_"):
        pass
    except OSError as e:
      raise ValueError(f"output {path!r} cannot be written: {e.strerror or e}") from None
    if os.path.isdir(path):
      raise ValueError(f"output {path!r} is a directory; expected a file name")
  return ext


def write_video(
  path: str,
  frames: np.ndarray,
  *,
  fps: float = 8.0,
  scale: int = 1,
  metadata: Mapping[str, Any] | None = None,
  extra_arrays: Mapping[str, np.ndarray] | None = None,
) -> str:
  """Writes uint8 frames [T, H, W, 3] as GIF/MP4 (display `scale`) or NPZ (raw, with metadata)."""
  ext = check_path(path)
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if ext == ".npz":
    np.savez_compressed(
      path,
      frames=frames,
      metadata=np.asarray(json.dumps(dict(metadata or {}))),
      **dict(extra_arrays or {}),
    )
    return path
  import imageio.v3 as iio  # noqa: PLC0415 (heavy import, only when writing media)

  shown = upscale(frames, scale)
  if ext == ".gif":
    iio.imwrite(path, shown, extension=".gif", duration=1000.0 / fps, loop=0)
  else:
    # yuv420p needs even sizes; patch multiples are even, odd sizes get one pixel padded.
    h, w = shown.shape[1:3]
    shown = np.pad(shown, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    iio.imwrite(path, shown, plugin="FFMPEG", fps=fps, codec="libx264", macro_block_size=1)
  return path


def _imread(path: str, what: str, **options) -> np.ndarray:
  """`imageio.v3.imread(path, **options)`, its many error types as one ValueError naming `what`
  the file should have been."""
  import imageio.v3 as iio  # noqa: PLC0415

  try:
    return np.asarray(iio.imread(path, **options))
  except Exception as e:  # noqa: BLE001 (imageio raises many types, with install hints)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"{path!r} is not a readable {what} ({first})") from None


def read_video(path: str) -> np.ndarray:
  """Reads a video (GIF/MP4/NPZ) or an image as uint8 frames [T, H, W, 3]."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"no such video or image: {path!r}")
  if path.lower().endswith(".npz"):
    with np.load(path) as f:
      return np.asarray(f["frames"])
  frames = _imread(path, "image or video", index=None)
  if frames.ndim == 3 and frames.shape[-1] in (3, 4):  # a still image (or a one-frame gif)
    frames = frames[None]
  elif frames.ndim == 3:  # a greyscale video [T, H, W] or image [H, W]
    frames = frames[..., None]
  elif frames.ndim == 2:
    frames = frames[None, ..., None]
  if frames.ndim == 4 and frames.shape[-1] == 4:  # RGBA: only an opaque one is an RGB image
    if frames.dtype != np.uint8 or frames[..., 3].min() < 255:
      raise ValueError(
        f"{path!r} has transparent pixels (RGBA); expected RGB: flatten it onto a background"
      )
    frames = frames[..., :3]
  if frames.ndim == 4 and frames.shape[-1] == 1:
    frames = frames.repeat(3, axis=-1)
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"{path!r}: expected RGB frames, got an array of shape {frames.shape}")
  return frames.astype(np.uint8)


def read_mask(path: str) -> np.ndarray:
  """A pixel mask: a `.npy` array as stored ([H, W] or [T, H, W]; the sampler checks its values),
  else an image (PNG, …) as bool [H, W], True where any colour channel is nonzero (alpha is
  ignored)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"no such mask: {path!r}")
  if path.lower().endswith(".npy"):
    try:
      return np.load(path, allow_pickle=False)
    except ValueError as e:
      raise ValueError(f"{path!r} is not a readable .npy array ({e})") from None
  image = _imread(path, "image")
  if image.ndim == 3:  # [H, W, C]: grey + alpha, RGB or RGBA
    return (image[..., : 3 if image.shape[-1] >= 3 else 1] > 0).any(axis=-1)
  if image.ndim != 2:
    raise ValueError(f"{path!r}: expected one image [H, W] as a mask, got shape {image.shape}")
  return image > 0


def grid(images: np.ndarray, pad: int = 1) -> np.ndarray:
  """uint8 images [R, C, H, W, 3] → one image [R·(H+pad)+pad, C·(W+pad)+pad, 3] (white lines)."""
  r, c, h, w, ch = images.shape
  out = np.full((r * (h + pad) + pad, c * (w + pad) + pad, ch), 255, np.uint8)
  for i in range(r):
    for j in range(c):
      y, x = pad + i * (h + pad), pad + j * (w + pad)
      out[y : y + h, x : x + w] = images[i, j]
  return out


def write_image(path: str, image: np.ndarray, *, scale: int = 1) -> str:
  """Writes a uint8 image [H, W, 3] as PNG (nearest-neighbour `scale` for display)."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 image [H, W, 3], got {image.dtype} {image.shape}")
  import imageio.v3 as iio  # noqa: PLC0415

  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  iio.imwrite(path, upscale(image[None], scale)[0], extension=".png")
  return path


def gif_bytes(frames: np.ndarray, *, fps: float = 8.0, scale: int = 1) -> bytes:
  """uint8 frames [T, H, W, 3] as an in-memory looping GIF (display `scale`)."""
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
  import imageio.v3 as iio  # noqa: PLC0415

  return iio.imwrite(
    "<bytes>", upscale(frames, scale), extension=".gif", duration=1000.0 / fps, loop=0
  )


def html(videos, captions=None, *, fps: float = 8.0, scale: int = 4) -> str:
  """An HTML row of inline (base64) GIFs with captions, for notebooks:
  `IPython.display.HTML(media.html(videos, prompts))`; videos: uint8 [N, T, H, W, 3]."""
  import base64  # noqa: PLC0415
  import html as html_lib  # noqa: PLC0415

  captions = [""] * len(videos) if captions is None else list(captions)
  if len(captions) != len(videos):
    raise ValueError(f"{len(captions)} captions for {len(videos)} videos; expected one each")
  figures = []
  for video, caption in zip(videos, captions):
    data = base64.b64encode(gif_bytes(video, fps=fps, scale=scale)).decode("ascii")
    figures.append(
      '<figure style="display:inline-block;margin:4px;text-align:center">'
      f'<img src="data:image/gif;base64,{data}" style="image-rendering:pixelated"/>'
      f'<figcaption style="font-size:11px">{html_lib.escape(str(caption))}</figcaption></figure>'
    )
  return "<div>" + "".join(figures) + "</div>"
