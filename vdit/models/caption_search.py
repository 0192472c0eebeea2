"""Decoding captions: greedy, temperature sampling and beam search, each one jitted loop.

Every example slot k of a packed row gets N caption positions; the decoder row is the K slots
side by side, [B, K·N], slot k's positions carrying segment id k + 1 (0 for an empty slot), so
each caption cross-attends to its own example's context only. A step recomputes the decoder
over the whole row (no key/value cache): at this size (K·N ≤ 256 tokens, two blocks) a full
recompute costs less than compiling and carrying a cache, and the causal mask makes the
positions not yet written irrelevant. Position 0 is BOS; a caption ends at `END_ID` and is
END-padded after it.

`logits_fn(tokens [R, K·N]) -> [R, K·N, V]` is the decoder over a fixed context (the caller
encodes once); greedy and sampling call it on the B rows, beam search on B·W rows (the context
repeated W times, beam-major inside each row: row b·W + w).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from vdit.data.tokenizer import BOS_ID
from vdit.models.captioner import END_ID

LogitsFn = Callable[[jax.Array], jax.Array]


def slot_segment_ids(valid: jax.Array, length: int) -> jax.Array:
  """valid [B, K] bool -> segment ids [B, K·N] of the decoder row (k + 1, or 0 if empty)."""
  b, k = valid.shape
  ids = jnp.where(valid, jnp.arange(1, k + 1, dtype=jnp.int32)[None], 0)  # [B, K]
  return jnp.repeat(ids, length, axis=1)


def _start(rows: int, k: int, length: int) -> jax.Array:
  tokens = jnp.full((rows, k, length), END_ID, jnp.int32)
  return tokens.at[:, :, 0].set(BOS_ID)


def greedy(
  logits_fn: LogitsFn,
  valid: jax.Array,
  length: int,
  *,
  temperature: float = 0.0,
  rng: jax.Array | None = None,
  prefix: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
  """Captions [B, K, N] (BOS first, END after the end): the most likely next token at every
  step (`temperature` 0), or one drawn from softmax(logits / temperature) with `rng`. A
  `prefix` (tokens [B, K, N] starting with BOS, lengths [B, K]) is given, not decoded: each
  caption continues its own (e.g. "… on a" to make the captioner name the background)."""
  b, k = valid.shape
  if temperature > 0 and rng is None:
    raise ValueError(f"temperature={temperature} > 0 samples and needs an rng")

  def step(i, carry):
    tokens, done = carry  # [B, K, N], [B, K]
    logits = logits_fn(tokens.reshape(b, k * length)).reshape(b, k, length, -1)
    logits = jnp.take(logits, i, axis=2)  # [B, K, V] at position i
    if temperature > 0:
      nxt = jax.random.categorical(jax.random.fold_in(rng, i), logits / temperature, axis=-1)
    else:
      nxt = jnp.argmax(logits, axis=-1)
    nxt = jnp.where(done, END_ID, nxt).astype(jnp.int32)
    if prefix is not None:
      nxt = jnp.where(i + 1 < prefix[1], jnp.take(prefix[0], i + 1, axis=2), nxt)
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, nxt, i + 1, axis=2)
    return tokens, done | (nxt == END_ID)

  tokens, _ = jax.lax.fori_loop(0, length - 1, step, (_start(b, k, length), ~valid))
  return tokens


def beam_search(logits_fn: LogitsFn, valid: jax.Array, length: int, beams: int) -> jax.Array:
  """Captions [B, K, N] of the highest total log-probability among `beams` hypotheses kept per
  slot at every step (no length normalisation: captions of one dataset have similar lengths).
  A finished hypothesis extends only by END at no cost. With one beam this is `greedy`."""
  b, k = valid.shape
  w = beams
  # Only beam 0 is live at the start, so the first step does not pick one token W times.
  scores = jnp.where(jnp.arange(w) == 0, 0.0, -jnp.inf)[None, None].repeat(b, 0).repeat(k, 1)
  tokens = _start(b * w, k, length).reshape(b, w, k, length).transpose(0, 2, 1, 3)  # [B,K,W,N]
  done = jnp.broadcast_to(~valid[:, :, None], (b, k, w))

  def step(i, carry):
    tokens, scores, done = carry
    rows = tokens.transpose(0, 2, 1, 3).reshape(b * w, k * length)  # beam-major per row
    logits = logits_fn(rows).reshape(b, w, k, length, -1)
    logp = jax.nn.log_softmax(jnp.take(logits, i, axis=3), axis=-1).transpose(0, 2, 1, 3)
    vocab = logp.shape[-1]
    only_end = jnp.where(jnp.arange(vocab) == END_ID, 0.0, -jnp.inf)
    logp = jnp.where(done[..., None], only_end, logp)  # [B, K, W, V]
    total = (scores[..., None] + logp).reshape(b, k, w * vocab)
    scores, index = jax.lax.top_k(total, w)  # [B, K, W], best first
    beam, token = index // vocab, (index % vocab).astype(jnp.int32)
    tokens = jnp.take_along_axis(tokens, beam[..., None], axis=2)
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, i + 1, axis=3)
    done = jnp.take_along_axis(done, beam, axis=2) | (token == END_ID)
    return tokens, scores, done

  tokens, scores, _ = jax.lax.fori_loop(0, length - 1, step, (tokens, scores, done))
  return tokens[:, :, 0]  # top_k sorts: beam 0 is the best
