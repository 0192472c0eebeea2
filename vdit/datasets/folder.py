"""Users' own data: a folder of videos and images with a `captions.jsonl`.

Layout (any subset):

  my_data/
    captions.jsonl        one {"file": "clip1.mp4", "caption": "...", "label": 3, "split": ...}
                          per line; "label" (int) and "split" ("train" | "validation") optional
    clip1.mp4 ...         videos: .mp4 .mov .webm .mkv .avi .gif, decoded with ffmpeg
                          (imageio-ffmpeg, which ships its own ffmpeg binary)
    photo.jpg ...         images: .png .jpg .jpeg .bmp .webp, 1-frame examples
    frames_dir/           a folder of images = one video, frames in sorted file-name order

Files without a caption line get the empty caption (the null condition); caption lines naming
missing files are reported. Files that cannot be decoded are skipped, counted and reported
(`FolderSource.report()`, a warning in the log), never a crash and never silent; a folder with
nothing usable is a `ValueError`. Files whose split is not given go to validation when
crc32(file name) % 20 == 0 (stable when files are added; at least one if there are ≥ 2 files).

Two ways in:
  * `FolderSource(path, split)`: a grain random-access source that decodes on the fly (an
    unreadable file found late yields None, which the pipeline skips and counts);
  * `build(data_dir, path)` / `data_source(split, data_dir, path)` (input.dataset="folder",
    input.dataset_config=path): a TFDS builder that decodes once into ArrayRecord, keyed by a
    fingerprint of the folder (names, sizes, mtimes, captions), so a changed folder rebuilds.
"""

import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
import zlib

import numpy as np
import tensorflow_datasets as tfds

from vdit.datasets import building

VIDEO_EXTS = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".gif")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
CAPTIONS = "captions.jsonl"
VALIDATION_MODULUS = 20  # 1 in 20 files (by crc32 of the name) is validation unless told


@dataclasses.dataclass(frozen=True)
class Entry:
  file: str  # path relative to the folder
  caption: str
  label: int  # -1 = none
  split: str


SPLITS = ("train", "validation")


def _check_record(record) -> str:
  """What is wrong with one parsed captions.jsonl record, or "" (it is used as it is)."""
  if not isinstance(record, dict):
    return f"expected a JSON object, got {type(record).__name__}"
  if not isinstance(record.get("file"), str) or not record["file"]:
    return f"'file' must be a non-empty string, got {record.get('file')!r}"
  if "caption" in record and not isinstance(record["caption"], str):
    return f"'caption' must be a string, got {type(record['caption']).__name__}"
  label = record.get("label", -1)
  if isinstance(label, bool) or not isinstance(label, int) or label < -1:
    return f"'label' must be an integer >= 0 (or -1 = none), got {label!r}"
  if record.get("split", "train") not in SPLITS:
    return f"'split' must be one of {SPLITS}, got {record['split']!r}"
  return ""


def _read_captions(path: str) -> tuple[dict, list[str]]:
  """file -> record from captions.jsonl, and human-readable problems with its lines (a line
  that is not UTF-8 or JSON, has a field of the wrong type or value, or names a file an
  earlier line already named: the line is not used, its file keeps the earlier record)."""
  records, problems = {}, []
  name = os.path.join(path, CAPTIONS)
  if not os.path.exists(name):
    return records, problems
  with open(name, "rb") as f:
    for n, raw in enumerate(f, 1):
      where = f"{CAPTIONS}:{n}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        problems.append(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})")
        continue
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError as e:
        problems.append(f"{where}: not JSON ({e}) in {line.strip()[:80]!r}")
        continue
      if problem := _check_record(record):
        problems.append(f"{where}: {problem}; line skipped")
        continue
      file = os.path.normpath(record["file"])
      if file in records:
        problems.append(f"{where}: {file!r} was already captioned on an earlier line; line skipped")
        continue
      records[file] = record
  return records, problems


def _media(path: str) -> list[str]:
  """Relative paths of videos, images and frame folders directly inside `path`, sorted."""
  out = []
  for name in sorted(os.listdir(path)):
    full = os.path.join(path, name)
    if os.path.isdir(full):
      if any(f.lower().endswith(IMAGE_EXTS) for f in os.listdir(full)):
        out.append(name)
    elif name.lower().endswith(VIDEO_EXTS + IMAGE_EXTS):
      out.append(name)
  return out


def scan(path: str) -> tuple[list[Entry], list[str]]:
  """Every media entry of the folder with its caption/label/split, and problems found."""
  if not os.path.isdir(path):
    raise ValueError(f"folder dataset path={path!r} is not a directory")
  records, problems = _read_captions(path)
  files = _media(path)
  for missing in sorted(set(records) - set(files)):
    problems.append(f"{CAPTIONS} names {missing!r}, which is not a video/image in {path}")
  entries = []
  for file in files:
    record = records.get(file, {})
    split = record.get("split")
    if split is None:
      split = "validation" if zlib.crc32(file.encode()) % VALIDATION_MODULUS == 0 else "train"
    entries.append(Entry(file, record.get("caption", ""), record.get("label", -1), split))
  if len(entries) >= 2 and all(e.split == "train" for e in entries):
    first = min(entries, key=lambda e: zlib.crc32(e.file.encode()))
    entries = [dataclasses.replace(e, split="validation") if e is first else e for e in entries]
  return entries, problems


def decode(full_path: str, max_frames: int | None = None) -> np.ndarray:
  """uint8 [T, H, W, 3] of a video, image or frame folder; raises on anything unreadable."""
  import imageio.v3 as iio  # noqa: PLC0415

  if os.path.isdir(full_path):
    names = sorted(f for f in os.listdir(full_path) if f.lower().endswith(IMAGE_EXTS))
    frames = [_rgb(iio.imread(os.path.join(full_path, f))) for f in names[:max_frames]]
    if len({f.shape for f in frames}) != 1:
      raise ValueError(f"frames in {full_path} differ in size: {sorted({f.shape for f in frames})}")
    video = np.stack(frames)
  elif full_path.lower().endswith(IMAGE_EXTS):
    video = _rgb(iio.imread(full_path))[None]
  elif full_path.lower().endswith(".gif"):
    video = np.stack([_rgb(f) for f in iio.imread(full_path, index=None)[:max_frames]])
  else:
    video = _read_video(full_path, max_frames)
  if video.ndim != 4 or min(video.shape) < 1:
    raise ValueError(f"{full_path} decoded to an empty array of shape {video.shape}")
  return video


def _read_video(full_path: str, max_frames: int | None) -> np.ndarray:
  import imageio_ffmpeg  # noqa: PLC0415

  reader = imageio_ffmpeg.read_frames(full_path)
  try:
    meta = next(reader)
    w, h = meta["size"]
    frames = []
    for frame in reader:
      frames.append(np.frombuffer(frame, np.uint8).reshape(h, w, 3))
      if max_frames and len(frames) >= max_frames:
        break
  finally:
    reader.close()
  if not frames:
    raise ValueError(f"{full_path} has no decodable frames")
  return np.stack(frames)


def _rgb(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"expected 8-bit images, got dtype {image.dtype}")
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  return image[..., :3] if image.shape[-1] >= 3 else np.repeat(image[..., :1], 3, axis=-1)


class FolderSource:
  """grain random-access source over a folder (decodes on the fly; see the module docstring).

  `source[i]` is {"video": uint8 [T, H, W, 3], "caption": bytes, "label": int32} or None if the
  file cannot be decoded (counted in `report()`; the pipeline skips None elements).
  """

  def __init__(self, path: str, split: str = "train", max_frames: int | None = 256):
    entries, self.problems = scan(path)
    self.path, self.split, self.max_frames = path, split, max_frames
    self.entries = [e for e in entries if e.split == split]
    for problem in self.problems:
      logging.warning("folder %s: %s", path, problem)
    if not self.entries:
      raise ValueError(
        f"folder dataset {path!r} has no usable {split!r} examples: expected videos "
        f"{VIDEO_EXTS}, images {IMAGE_EXTS} or frame folders (found {len(entries)} media "
        f"files in all splits; problems: {self.problems or 'none'})"
      )
    self._lock = threading.Lock()
    self.failed: dict[str, str] = {}  # file -> error, for report()

  def __len__(self) -> int:
    return len(self.entries)

  def __getitem__(self, index: int) -> dict | None:
    entry = self.entries[index]
    try:
      video = decode(os.path.join(self.path, entry.file), self.max_frames)
    except Exception as e:  # noqa: BLE001 (any decoder error means: skip this file)
      lines = [line for line in str(e).splitlines() if line.strip()]  # ffmpeg's last word
      error = f"{type(e).__name__}: {lines[-1] if lines else ''}"[:200]
      with self._lock:
        if entry.file not in self.failed:
          logging.warning("folder %s: skipping unreadable %s: %s", self.path, entry.file, error)
        self.failed[entry.file] = error
      return None
    return {"video": video, "caption": entry.caption.encode(), "label": np.int32(entry.label)}

  def report(self) -> dict:
    """{"examples", "skipped", "skipped_files": {file: error}, "problems": [...]}."""
    return {
      "examples": len(self.entries),
      "skipped": len(self.failed),
      "skipped_files": dict(self.failed),
      "problems": list(self.problems),
    }


# ---------------------------------------------------------------------------------------------
# TFDS: convert a folder once.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
  path: str = ""  # the folder
  max_frames: int = 256  # longer videos are cut (first frames)


def fingerprint(path: str) -> str:
  """Hash of the folder's media names, sizes and mtimes and its captions file."""
  digest = hashlib.sha1(os.path.abspath(path).encode())
  for name in sorted(_media(path)) + ([CAPTIONS] if os.path.exists(f"{path}/{CAPTIONS}") else []):
    full = os.path.join(path, name)
    files = [full]
    if os.path.isdir(full):
      files += [os.path.join(full, f) for f in sorted(os.listdir(full))]
    stats = [(os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    digest.update(name.encode() + str(stats).encode())
  return digest.hexdigest()[:12]


def folder_config(path: str) -> FolderConfig:
  if not os.path.isdir(path):
    raise ValueError(f"folder dataset path={path!r} is not a directory")
  base = re.sub(r"[^a-z0-9_]+", "_", os.path.basename(os.path.abspath(path)).lower())
  return FolderConfig(name=f"{base}_{fingerprint(path)}", path=os.path.abspath(path))


class Folder(building.Builder):
  """A folder of videos/images + captions.jsonl, decoded once (see `vdit.datasets.folder`)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = []  # one config per folder, made by folder_config(path)

  def _info(self) -> tfds.core.DatasetInfo:
    return building.info(self, __doc__, label=building.int_feature(), file=tfds.features.Text())

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    entries, _ = scan(cfg.path)
    splits = [s for s in ("train", "validation") if any(e.split == s for e in entries)]
    if "train" not in splits:
      FolderSource(cfg.path, "train", cfg.max_frames)  # raises, naming what it found
    return {s: self._generate_examples(FolderSource(cfg.path, s, cfg.max_frames)) for s in splits}

  def _generate_examples(self, source: FolderSource):
    for i, entry in enumerate(source.entries):
      example = source[i]
      if example is not None:
        yield entry.file, {**example, "file": entry.file}
    report = source.report()
    if report["skipped"]:
      logging.warning(
        "folder %s: %d of %d %s files skipped: %s",
        source.path,
        report["skipped"],
        report["examples"],
        source.split,
        report["skipped_files"],
      )
    if report["skipped"] == report["examples"]:
      raise ValueError(
        f"folder dataset {source.path!r}: none of the {report['examples']} {source.split!r} "
        f"files could be decoded: {report['skipped_files']}"
      )


def build(data_dir: str | None = None, config: str = "") -> None:
  """Converts the folder `config` (a path) once; a changed folder gets a new conversion."""
  building.build(Folder, data_dir, folder_config(config))


def data_source(split: str, data_dir: str | None = None, config: str = ""):
  """Random-access source of one split of the converted folder `config` (a path)."""
  return building.data_source(Folder, split, data_dir, folder_config(config))


def raw_source(split: str, data_dir: str | None = None, config: str = "") -> FolderSource:
  """input.dataset="folder_raw": the folder decoded on the fly (data_dir is unused)."""
  del data_dir
  return FolderSource(config, split)
