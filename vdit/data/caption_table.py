"""Precomputed caption embeddings: sequences from a frozen text model, looked up per caption.

Large video models condition on a big frozen text encoder (T5-XXL in Imagen/PixArt/Sora-era
models) whose outputs are computed once, offline. vdit reads them from a *caption-embedding
table*, written by `python -m vdit.tools.embed_captions` (or by `write_table` from any program, e.g.
one running T5 where its weights are):

  DIR/embeddings.array_record   one msgpack record per caption: {"caption": str,
                                 "embedding": float [n, E]} (n tokens, E channels)
  DIR/meta.json                 {"dim": E, "embedder": spec, "captions": N, ...}
  DIR/index.json                {caption: record number}

`input.text_embeddings=DIR` makes the pipeline attach each example's embedding sequence instead
of token ids (an element that already carries `caption_embedding` [n, E] keeps it), and
`model.text_embed_dim=E` makes VideoDiT cross-attend to them (`TextEncoder` projects them to its
width). Sequences longer than `input.max_caption_tokens` are truncated with a warning (once); the
empty caption is the null condition: token [NULL], a learned null embedding in the model.

Embedders (`embedder` spec in meta.json; the sampler uses it for prompts not in the table,
built by `vdit.caption_embedders.from_spec`):
  words:<E>[:<seed>]  a frozen random word embedding: each word of the built-in tokenizer's
                      split gets a fixed Gaussian vector drawn from (seed, crc32(word)) — a
                      stand-in for a frozen language model that works offline (`words_embedder`)
  run:<workdir>       the trained `TextEncoder` of a vdit text-to-video run (EMA params)
  external:<name>     written by another program (`write_table`); only its captions are known
"""

import json
import logging
import os
import zlib
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from vdit.data import tokenizer as tokenizer_lib
from vdit.datasets import records

WRITER = "`python -m vdit.tools.embed_captions` (or `vdit.data.caption_table.write_table`)"
Embedder = Callable[[Sequence[str]], list[np.ndarray]]  # captions -> [n_i, E] each


def write_table(
  out: str, embeddings: Iterable[tuple[str, np.ndarray]], embedder: str, **meta
) -> dict:
  """Writes (caption, embedding [n, E]) pairs as a caption-embedding table; returns meta."""
  index, dim = {}, None
  with records.Writer(out, "embeddings") as w:
    for caption, emb in embeddings:
      emb = np.asarray(emb, np.float32)
      if emb.ndim != 2 or (dim is not None and emb.shape[1] != dim):
        raise ValueError(
          f"embedding of {caption!r} has shape {emb.shape}; expected [n, {dim or 'E'}]"
        )
      dim = emb.shape[1]
      if caption in index:
        continue
      index[caption] = w.count
      w.write({"caption": caption, "embedding": emb})
  if dim is None:
    raise ValueError(f"no captions to write to {out!r}")
  with open(os.path.join(out, "index.json"), "w") as f:
    json.dump(index, f)
  meta = dict(meta, dim=int(dim), embedder=embedder, captions=len(index))
  records.write_meta(out, meta)
  return meta


def read_meta(directory: str) -> dict:
  return records.read_meta(directory, WRITER)


def words_embedder(dim: int, seed: int = 0) -> Embedder:
  """Each word (the built-in tokenizer's split) → a fixed N(0, 1) vector of `dim` channels."""

  def vector(word: str) -> np.ndarray:
    rng = np.random.default_rng((seed, zlib.crc32(word.encode("utf-8"))))
    return rng.standard_normal(dim).astype(np.float32)

  def embed(captions: Sequence[str]) -> list[np.ndarray]:
    out = []
    for caption in captions:
      words = tokenizer_lib.words(caption)
      out.append(np.stack([vector(w) for w in words]) if words else np.zeros((0, dim), np.float32))
    return out

  return embed


class CaptionEmbeddings:
  """caption → (text_tokens [n] int32, embedding [n, E] float32), from a table, falling back to
  the table's embedder for captions it does not hold if `make_embedder` (spec → `Embedder`,
  called once, when first needed) is given: the sampler's prompts."""

  def __init__(
    self,
    directory: str,
    max_len: int,
    *,
    make_embedder: Callable[[str], Embedder] | None = None,
  ):
    self.directory, self.max_len, self.make_embedder = directory, max_len, make_embedder
    self.meta = read_meta(directory)
    self.dim = int(self.meta["dim"])
    with open(os.path.join(directory, "index.json")) as f:
      self._index = json.load(f)
    self._records = records.Source(directory, "embeddings")
    self._embedder = None
    self._warned = False

  def embedding(self, caption: str) -> np.ndarray:
    """The stored (or, with `make_embedder`, computed) sequence [n, E] of `caption`."""
    if caption in self._index:
      return np.asarray(self._records[self._index[caption]]["embedding"], np.float32)
    spec = self.meta["embedder"]
    if self.make_embedder is None or spec.startswith("external"):
      raise KeyError(
        f"caption {caption!r} is not in the caption-embedding table {self.directory!r} "
        f"(embedder {spec!r}); add it with {WRITER}"
      )
    if self._embedder is None:
      self._embedder = self.make_embedder(spec)
    return self._embedder([caption])[0]

  def __call__(self, caption: str | bytes, embedding: np.ndarray | None = None):
    """(text_tokens, embedding): [BOS]·n and the sequence, or [NULL] and zeros for no caption."""
    if isinstance(caption, bytes):
      caption = caption.decode("utf-8")
    if embedding is None:
      embedding = self.embedding(caption) if tokenizer_lib.words(caption) else None
    if embedding is None or len(embedding) == 0:
      return np.array([tokenizer_lib.NULL_ID], np.int32), np.zeros((1, self.dim), np.float32)
    embedding = np.asarray(embedding, np.float32)
    if embedding.shape[-1] != self.dim:
      raise ValueError(f"caption embedding has {embedding.shape[-1]} channels, expected {self.dim}")
    if len(embedding) > self.max_len:
      if not self._warned:
        logging.warning(
          "caption embedding of %d tokens truncated to max_caption_tokens=%d (warned once): %r",
          len(embedding), self.max_len, caption,
        )  # fmt: skip
        self._warned = True
      embedding = embedding[: self.max_len]
    return np.full((len(embedding),), tokenizer_lib.BOS_ID, np.int32), embedding
