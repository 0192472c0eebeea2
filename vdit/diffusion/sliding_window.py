"""Videos of any length, window by window: the plan `Sampler.long` follows.

A video of N frames (the model's units: latent frames in latent space) is generated in windows
of W frames. The first window comes from the text alone; every next one is given the last C
frames of what exists as its first C frames (`context`: clean tokens through `cond_mask`, as the
`extend_forward` task trains, or lightly noised ones, as the `forcing` task trains) and
generates W − C new frames. The last window is generated whole and only the frames up to N are
kept. Every window has one shape (positions restart at 0 in each, as in a training clip), so
the sampling loop compiles once and holds only the window on the device: memory is flat in N,
time linear (1 + ⌈(N − W) / (W − C)⌉ windows).

Diffusion forcing: Chen et al. 2024, "Diffusion Forcing: Next-token Prediction Meets Full-
Sequence Diffusion"; chunked long video with noisy context frames: SkyReels-V2 (2025), MAGI-1.
"""

import dataclasses

from vdit.diffusion.given_frames import InputError


@dataclasses.dataclass(frozen=True)
class Chunk:
  """One window of the plan: it covers frames [start, start + W) of the video, its frames from
  `new` on are generated (before: the given context) and the first `count` of them are kept."""

  start: int  # the video frame at the window's frame 0
  new: int  # the window's first generated frame: 0 for the first window, else C
  count: int  # the generated frames kept (the last window's may be fewer than W − new)


def check(num_frames: int, window: int, context: int, pt: int) -> None:
  """InputError, naming the value, for a request the plan cannot serve: counts below 1, a window
  or context that is not whole patch-frames of `pt` frames, no context, or a context that leaves
  the window nothing to generate."""
  for name, n in (("num_frames", num_frames), ("window", window), ("context", context)):
    if not isinstance(n, int) or isinstance(n, bool):
      raise InputError(f"{name}={n!r} must be a whole number of frames")
  if num_frames < 1:
    raise InputError(f"num_frames={num_frames} must be ≥ 1")
  if window < 1 or window % pt:
    raise InputError(
      f"window={window} must be a positive multiple of the patch's {pt} frames (whole "
      f"patch-frames), e.g. {max(pt, window // pt * pt)}"
    )
  if context < pt or context % pt:
    raise InputError(
      f"context={context} must be a positive multiple of the patch's {pt} frames (whole "
      f"patch-frames of the previous window given to the next), e.g. {max(pt, context // pt * pt)}"
    )
  if context >= window:
    raise InputError(
      f"context={context} must be smaller than window={window}: a window generates "
      "window − context new frames"
    )


def plan(num_frames: int, window: int, context: int, pt: int) -> list[Chunk]:
  """The windows of an N = `num_frames` video (module doc); `check`ed first."""
  check(num_frames, window, context, pt)
  chunks = [Chunk(0, 0, min(window, num_frames))]
  done = chunks[0].count
  while done < num_frames:
    chunks.append(Chunk(done - context, context, min(window - context, num_frames - done)))
    done += chunks[-1].count
  return chunks
