"""ArrayRecord files of msgpack records: what vdit's offline tools write once and training reads.

A record is a flat dict of numbers, strings and numpy arrays, serialised with
`flax.serialization.msgpack_serialize` (arrays keep dtype and shape; no pickle). Files are
random access (`grain.sources.ArrayRecordDataSource`), so a pipeline reads record i without
reading the others, and `meta.json` beside them describes the set (written last: a directory
without it is an interrupted write).

  with records.Writer(directory, "latents") as w:   # → directory/latents.array_record
    w.write({"index": 0, "latents": z})
  records.write_meta(directory, {...})
  source = records.Source(directory, "latents"); source[0]["latents"]
"""

import json
import os
from typing import Any

import grain
from array_record.python import array_record_module
from flax import serialization

META = "meta.json"


def path_of(directory: str, name: str) -> str:
  return os.path.join(directory, f"{name}.array_record")


class Writer:
  """Appends records to `directory/<name>.array_record` (one record per group: random access)."""

  def __init__(self, directory: str, name: str):
    os.makedirs(directory, exist_ok=True)
    self.path = path_of(directory, name)
    self._writer = array_record_module.ArrayRecordWriter(self.path, "group_size:1")
    self.count = 0

  def write(self, record: dict[str, Any]) -> None:
    self._writer.write(serialization.msgpack_serialize(record))
    self.count += 1

  def close(self) -> None:
    self._writer.close()

  def __enter__(self) -> "Writer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def write_meta(directory: str, meta: dict) -> None:
  with open(os.path.join(directory, META), "w") as f:
    json.dump(meta, f, indent=1, sort_keys=True)


def read_meta(directory: str, what: str) -> dict:
  """`directory/meta.json`; `what` names the tool that writes it, for the error."""
  path = os.path.join(directory, META)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{directory!r} holds no {META}: not a complete output of {what} (missing, or the write "
      "was interrupted)"
    )
  with open(path) as f:
    return json.load(f)


class Source:
  """Random access over the records of `directory/<name>.array_record`, decoded."""

  def __init__(self, directory: str, name: str):
    self.path = path_of(directory, name)
    if not os.path.exists(self.path):
      raise FileNotFoundError(f"no record file {self.path}")
    self._source = grain.sources.ArrayRecordDataSource([self.path])

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return serialization.msgpack_restore(self._source[int(i)])
