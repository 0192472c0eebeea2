r"""Generating videos from a trained checkpoint: the command line of `vdit.sampling`.

  python -m vdit.sample --workdir=runs/shapes --prompt="a red circle moving right" \
      --num_frames=8 --height=32 --width=48 --out=x.gif
  python -m vdit.sample --workdir=runs/shapes --mode=i2v --image=first.png --prompt=... --out=x.mp4

  python -m vdit.sample --workdir=runs/shapes --mode=keyframes \
      --keyframes=img0.png@0,img1.png@12,img2.png@23 --prompt=... --out=x.gif
  python -m vdit.sample --workdir=runs/shapes --mode=retake --video=clip.mp4 --frames=4:8 \
      --prompt=... --out=x.gif
  python -m vdit.sample --workdir=runs/sora --mesh=sequence:8 --prompt=... --out=x.mp4
  python -m vdit.sample --workdir=runs/shapes --mode=long --num_frames=32 [--window=8 --context=4]
      --prompt=... --out=x.gif

Modes: t2v, t2i, i2v, extend, interpolate, keyframes, edit (SDEdit), loop, retake, inpaint,
outpaint, long (any length, window by window) — docs/sampling.md shows each. Any size works (one
that is not a patch multiple is cropped from a canvas of whole patches); impossible requests fail
with one line naming the bad flag before any compute (`InputError`). In latent space
(`config.autoencoder`) sizes are in latent units and the videos are decoded to pixels
(`vdit.sampling`); `.npz` outputs keep the latents too. `--mesh=sequence:8` samples one video on 8
devices, its tokens split over them (`vdit.sampling_mesh`).
"""

import math
import os
import sys

import numpy as np
from absl import app, flags

from vdit import checkpointing, media, sampling
from vdit.diffusion import given_frames
from vdit.diffusion.given_frames import InputError
from vdit.tasks import captioning

MODES = {  # --mode: (Sampler method, required inputs, optional inputs)
  "t2v": ("generate", (), ()),
  "t2i": ("text_to_image", (), ()),
  "i2v": ("image_to_video", ("image",), ()),
  "extend": ("extend", ("video",), ()),
  "interpolate": ("interpolate", ("video", "video2"), ()),
  "keyframes": ("keyframes", ("keyframes",), ()),
  "edit": ("edit", ("video",), ()),
  "loop": ("loop", (), ("image",)),
  "retake": ("retake", ("video",), ()),
  "inpaint": ("inpaint", ("video", "mask"), ()),
  "outpaint": ("outpaint", ("video",), ()),
  "long": ("long", (), ()),
}
LONG_FLAGS = ("window", "context", "context_noise")  # --mode=long only


# ---------------------------------------------------------------------------------------------
# CLI.
# ---------------------------------------------------------------------------------------------
def _define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """CLI flags; defined only when run as a program (tests import this module)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "Training workdir with checkpoints.", **fv)
  flags.DEFINE_enum("mode", "t2v", tuple(MODES), "What to generate (docs/sampling.md).", **fv)
  flags.DEFINE_string("prompt", None, "Text prompt.", **fv)
  flags.DEFINE_string("prompts_file", None, "File with one prompt per line.", **fv)
  flags.DEFINE_string("image", None, "i2v: the first frame; loop: the keyframe (optional).", **fv)
  flags.DEFINE_string(
    "video", None, "extend/edit/retake/inpaint/outpaint: the clip; interpolate: the start.", **fv
  )
  flags.DEFINE_string("video2", None, "interpolate: the end clip.", **fv)
  flags.DEFINE_list(
    "keyframes", None, "keyframes: path@index,… (an image or a clip at each frame index).", **fv
  )
  flags.DEFINE_string("frames", None, "retake: a:b, the frames a … b − 1 to regenerate.", **fv)
  flags.DEFINE_string(
    "mask", None, "inpaint: PNG (nonzero = regenerate) or NPY [H, W] / [T, H, W] mask.", **fv
  )
  flags.DEFINE_enum("direction", "forward", ("forward", "backward"), "extend: which way.", **fv)
  flags.DEFINE_float("strength", 0.6, "edit: noise level to start from, (0, 1]; 1: no input.", **fv)
  flags.DEFINE_integer("num_frames", None, "Frames (default: the config's; see the modes).", **fv)
  flags.DEFINE_integer(
    "window", None, "long: frames per window (default: the longest training clip).", **fv
  )
  flags.DEFINE_integer(
    "context", None, "long: frames of each window given to the next (default: half).", **fv
  )
  flags.DEFINE_float(
    "context_noise", None, "long: noise level of the context frames, [0, 1) (default 0).", **fv
  )
  flags.DEFINE_integer("height", None, "Height in pixels (outpaint: the canvas's).", **fv)
  flags.DEFINE_integer("width", None, "Width in pixels (outpaint: the canvas's).", **fv)
  flags.DEFINE_integer("steps", None, "Sampling steps (default: the config's).", **fv)
  flags.DEFINE_string("sampler", None, "euler|heun (flow), ddpm|ddim|dpmpp_2m (gaussian).", **fv)
  flags.DEFINE_float("guidance", None, "Classifier-free guidance (default: the config's).", **fv)
  flags.DEFINE_list("guidance_interval", None, "lo,hi: guide only for t in [lo, hi].", **fv)
  flags.DEFINE_integer("label", None, "Class label (class-conditional models).", **fv)
  flags.DEFINE_integer("seed", 0, "Noise seed.", **fv)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).", **fv)
  flags.DEFINE_string(
    "mesh",
    None,
    "Devices to sample on, e.g. sequence:8 (one video's tokens split over 8 devices) or "
    "sequence:4,tensor:2; sizes multiply to the device count, one may be -1 (default: the "
    "run's sample.mesh; '' = none).",
    **fv,
  )
  flags.DEFINE_integer("display_scale", 1, "Nearest-neighbour upscaling of GIF/MP4 output.", **fv)
  flags.DEFINE_float("fps", 8.0, "Frames per second of GIF/MP4 output.", **fv)
  flags.DEFINE_string("out", None, "Output file: .gif, .mp4 or .npz.", **fv)
  flags.DEFINE_string(
    "expand_prompt",
    None,
    "A prompt-expansion run (configs/caption/expand.py): each prompt is expanded into a full "
    "caption first, unspecified attributes sampled (--seed); the metadata keeps both.",
    **fv,
  )


def _request(f) -> tuple[list[str], dict]:
  """Prompts and the mode's inputs from the flags; raises InputError before any compute."""
  for name in ("workdir", "out"):
    if f[name].value is None:
      raise InputError(f"--{name} is required")
  try:
    media.check_path(f.out, writable=True)
  except ValueError as e:
    raise InputError(str(e)) from None
  if f.prompts_file and f.prompt is not None:
    raise InputError("give --prompt or --prompts_file, not both")
  if f.prompts_file:
    try:
      with open(f.prompts_file, encoding="utf-8") as fp:
        prompts = [line.strip() for line in fp if line.strip()]
    except UnicodeDecodeError as e:
      message = f"--prompts_file={f.prompts_file!r} is not UTF-8 text ({e.reason})"
      raise InputError(message) from None
    except OSError as e:
      raise InputError(f"--prompts_file={f.prompts_file!r} cannot be read: {e.strerror}") from None
    if not prompts:
      raise InputError(f"--prompts_file={f.prompts_file!r} holds no prompt (every line is blank)")
  elif f.prompt is not None:
    prompts = [f.prompt]
  else:
    raise InputError("give --prompt or --prompts_file")
  for name in ("num_frames", "height", "width", "steps"):  # None = the config's; 0 is not
    if f[name].value is not None and f[name].value < 1:
      raise InputError(f"--{name}={f[name].value} must be ≥ 1 (leave it out for the config's)")
  if f.guidance is not None and not math.isfinite(f.guidance):
    raise InputError(f"--guidance={f.guidance} must be a finite number (1 = no guidance)")
  if f.display_scale < 1:
    raise InputError(f"--display_scale={f.display_scale} must be ≥ 1")
  if not (math.isfinite(f.fps) and f.fps > 0):
    raise InputError(f"--fps={f.fps} must be a positive number")
  _, required, optional = MODES[f.mode]
  inputs = {}
  for name in ("image", "video", "video2"):
    path = f[name].value
    if name in required and path is None:
      raise InputError(f"--mode={f.mode} needs --{name}")
    if path is not None and name not in required + optional:
      raise InputError(f"--{name} is not used by --mode={f.mode}")
    try:
      inputs[name] = media.read_video(path) if path is not None else None
    except (OSError, ValueError) as e:
      raise InputError(f"--{name}={path!r} cannot be read: {e}") from None
  if f.mode == "keyframes" and not f.keyframes:
    raise InputError("--mode=keyframes needs --keyframes=path@index,… (e.g. first.png@0)")
  if f.keyframes and f.mode != "keyframes":
    raise InputError(f"--keyframes is not used by --mode={f.mode}")
  inputs["keyframes"] = _keyframes(f.keyframes) if f.keyframes else None
  inputs["frames"], inputs["mask"] = _region(f, inputs["video"])
  if f.mode == "outpaint" and f.height is None and f.width is None:
    raise InputError("--mode=outpaint needs --width and/or --height (the larger canvas)")
  if f.mode == "long" and f.num_frames is None:
    raise InputError("--mode=long needs --num_frames=N (the frames of the whole video)")
  for name in LONG_FLAGS:
    if f[name].value is not None and f.mode != "long":
      raise InputError(f"--{name} is not used by --mode={f.mode}")
  for name in ("window", "context"):
    if f[name].value is not None and f[name].value < 1:
      raise InputError(f"--{name}={f[name].value} must be ≥ 1 (leave it out for the default)")
  if f.context_noise is not None and not 0.0 <= f.context_noise < 1.0:
    raise InputError(f"--context_noise={f.context_noise} must be in [0, 1) (0: a clean context)")
  if f.mode == "t2i" and f.num_frames is not None:
    raise InputError("--num_frames is not used by --mode=t2i (an image is one frame)")
  return prompts, inputs


def _keyframes(items: list[str]) -> list[tuple[np.ndarray, int]]:
  """`path@index` items → (frames [F, H, W, 3], index); bad syntax, a negative index or an
  unreadable file → InputError. Overlaps and the range are the sampler's checks."""
  keyframes = []
  for item in items:
    path, at, index = item.rpartition("@")
    if not at or not path:
      raise InputError(f"--keyframes: {item!r} is not path@index (e.g. first.png@0)")
    try:
      index = int(index)
    except ValueError:
      raise InputError(f"--keyframes: {item!r}: index {index!r} is not a frame number") from None
    if index < 0:
      raise InputError(f"--keyframes: {item!r}: index {index} must be ≥ 0 (a frame number)")
    try:
      keyframes.append((media.read_video(path), index))
    except (OSError, ValueError) as e:
      raise InputError(f"--keyframes: {path!r} cannot be read: {e}") from None
  return keyframes


def _region(f, video: np.ndarray | None) -> tuple[tuple[int, int] | None, np.ndarray | None]:
  """retake's (a, b) from `--frames=a:b` and inpaint's bool mask [F, H, W] from `--mask`,
  checked against the video: bad syntax, a range outside it or a mask of another size →
  InputError (the sampler checks again; here it is before the checkpoint is loaded)."""
  for name, mode, example in (("frames", "retake", "4:8"), ("mask", "inpaint", "PATH")):
    if f.mode == mode and f[name].value is None:
      raise InputError(f"--mode={mode} needs --{name}={example}")
    if f[name].value is not None and f.mode != mode:
      raise InputError(f"--{name} is not used by --mode={f.mode}")
  frames = mask = None
  if f.frames is not None:
    a, colon, b = f.frames.partition(":")
    try:
      frames = (int(a), int(b)) if colon else None
    except ValueError:
      pass
    if frames is None:
      raise InputError(f"--frames={f.frames} is not a:b (e.g. 4:8: frames 4 … 7 regenerated)")
    frames = given_frames.frame_range(frames, len(video), "--frames")
  if f.mask is not None:
    try:
      mask = media.read_mask(f.mask)
    except (OSError, ValueError) as e:
      raise InputError(f"--mask={f.mask!r} cannot be read: {e}") from None
    mask = given_frames.region_mask(mask, video.shape[:3], f"--mask={f.mask!r}")
  return frames, mask


def _generate(
  sampler: sampling.Sampler, f, prompts: list[str], inputs: dict
) -> tuple[np.ndarray, dict]:
  """The mode's videos and the options used (defaults resolved)."""
  s = sampler.settings
  if f.label is not None and not sampler.model.num_classes:
    raise InputError(f"--label={f.label} but this model is not class-conditional (num_classes=0)")
  try:
    interval = f.guidance_interval and tuple(float(x) for x in f.guidance_interval)
  except ValueError:
    raise InputError(f"--guidance_interval={','.join(f.guidance_interval)} is not lo,hi") from None
  options = dict(
    steps=f.steps or s.steps,
    guidance=s.guidance if f.guidance is None else f.guidance,
    seed=f.seed,
    sampler=f.sampler or sampler.spec.default_sampler,
    guidance_interval=interval or sampler.spec.guidance_interval,
    labels=None if f.label is None else [f.label] * len(prompts),
    height=f.height,  # None: the given image's or video's size, else the config's
    width=f.width,
  )
  method, required, _ = MODES[f.mode]
  if f.mode != "t2i":
    options["num_frames"] = f.num_frames or (s.num_frames if f.mode == "t2v" else None)
  extra = dict(direction=f.direction) if f.mode == "extend" else {}
  extra = dict(strength=f.strength) if f.mode == "edit" else extra
  extra = dict(frames=inputs["frames"]) if f.mode == "retake" else extra
  if f.mode == "long":  # the window and context used (defaults filled in) go in the metadata
    window, context = sampler.long_window(f.window, f.context)
    extra = dict(window=window, context=context, context_noise=f.context_noise or 0.0)
  options |= dict(image=inputs["image"]) if f.mode == "loop" else extra
  videos = getattr(sampler, method)(prompts, *[inputs[name] for name in required], **options)
  return videos, {k: v for k, v in options.items() if k not in ("image", "labels", "frames")}


def _expand(f, prompts: list[str]) -> list[str]:
  """The prompts expanded by the `--expand_prompt` run (a wrong run → InputError)."""
  try:
    expander = captioning.Expander(f.expand_prompt)
  except ValueError as e:
    raise InputError(str(e)) from None
  return expander.expand(prompts, seed=f.seed)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with a one-line error (no usage dump)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}")


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    prompts, inputs = _request(f)
    given = prompts
    if f.expand_prompt:
      prompts = _expand(f, prompts)
      for p, e in zip(given, prompts):  # stdout lists the written files only
        print(f"expanded {p!r} -> {e!r}", file=sys.stderr, flush=True)
    sampler = sampling.load(f.workdir, f.step, mesh=f.mesh)
    videos, used = _generate(sampler, f, prompts, inputs)
  except (InputError, checkpointing.NoCheckpointError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  root, ext = os.path.splitext(f.out)
  paths = [f.out] if len(prompts) == 1 else [f"{root}_{i:03d}{ext}" for i in range(len(prompts))]
  for i, (prompt, video, path) in enumerate(zip(prompts, videos, paths)):
    meta = dict(mode=f.mode, prompt=prompt, workdir=f.workdir, step=f.step)
    if f.expand_prompt:  # `prompt` is what the model was given, `user_prompt` what was asked
      meta.update(user_prompt=given[i], expand_prompt=f.expand_prompt)
    meta.update(used)
    meta.update(zip(("num_frames", "height", "width"), video.shape[:3]))
    names = ("image", "video", "video2", "label", "frames", "mask", *LONG_FLAGS)
    meta.update({k: f[k].value for k in names if f[k].value})
    mesh = sampling.configured_mesh(sampler.config) if f.mesh is None else f.mesh
    meta.update({"mesh": mesh} if mesh else {})  # the flag's, else the run's `sample.mesh`
    meta.update({"keyframes": ",".join(f.keyframes)} if f.keyframes else {})
    latent = sampler.last_latents is not None and path.endswith(".npz")
    extra = {"latents": sampler.last_latents[i]} if latent else None  # latent space: keep them
    media.write_video(
      path, video, fps=f.fps, scale=f.display_scale, metadata=meta, extra_arrays=extra
    )
    print(path, flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=_parse_flags)
