"""Caption embedders by spec (the `embedder` of a caption-embedding table's meta.json).

  words:<E>[:<seed>]  a frozen random word embedding (`vdit.data.caption_table.words_embedder`)
  run:<workdir>       the trained `TextEncoder` of a vdit text-to-video run (EMA params)

`python -m vdit.tools.embed_captions` embeds a dataset's captions with one; the sampler embeds the
prompts a table does not hold with the table's own (`vdit.data.caption_table.CaptionEmbeddings`,
`make_embedder`). The table itself (reading, writing) is `vdit.data.caption_table`.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vdit.data import caption_table
from vdit.data import tokenizer as tokenizer_lib
from vdit.models.text import TextEncoder
from vdit.tasks import restore


def run_embedder(workdir: str) -> caption_table.Embedder:
  """The TextEncoder of a trained vdit text-to-video run (EMA params), frozen."""
  config, _, params = restore.ema_params(workdir, None)
  if config.model.get("text_embed_dim", 0):
    raise ValueError(f"{workdir!r} reads precomputed embeddings; it has no token text encoder")
  m, inp = config.model, config.input
  encoder = TextEncoder(
    inp.vocab_size, m.text_width, m.text_depth, m.text_heads, mlp_ratio=m.get("mlp_ratio", 4.0),
    scan_layers=m.scan_layers, dtype=jnp.dtype(m.dtype),
  )  # fmt: skip
  variables = {"params": jax.device_get(params["text"])}
  apply = jax.jit(encoder.apply)
  tok = tokenizer_lib.Tokenizer(inp.vocab_size)

  def embed(texts: Sequence[str]) -> list[np.ndarray]:
    out = []
    for caption in texts:
      ids = tok.encode(caption, inp.max_caption_tokens)
      if ids[0] == tokenizer_lib.NULL_ID:
        out.append(np.zeros((0, m.text_width), np.float32))
        continue
      seg = np.ones((1, len(ids)), np.int32)
      out.append(np.asarray(apply(variables, ids[None], seg)[0], np.float32))
    return out

  return embed


def from_spec(spec: str) -> caption_table.Embedder:
  """The embedder named by `spec` (words:<dim>[:<seed>] or run:<workdir>)."""
  kind, _, arg = spec.partition(":")
  if kind == "words":
    dim, _, seed = arg.partition(":")
    return caption_table.words_embedder(int(dim), int(seed or 0))
  if kind == "run":
    return run_embedder(arg)
  raise ValueError(f"embedder {spec!r} is unknown; expected words:<dim>[:<seed>] or run:<workdir>")
