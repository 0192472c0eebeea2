"""Captioning and prompt expansion: one decoder, conditioned on a packed video or on a prompt.

`caption.source="video"`: the captioner. The packed rows of `vdit.data.pipeline` (native size,
any duration) are encoded by `Captioner.encode` and each example's caption is decoded from its
own tokens (segment ids); the loss is next-token cross-entropy on the row's packed captions.

`caption.source="prompt"`: prompt expansion. The context is the example's own caption with
attributes dropped at random (`drop_attributes`: each of colour, object, motion, speed,
background, lead-in and the function words is left out of an example's prompt with probability
`caption.attribute_drop`), the target the full caption; sampling with a temperature fills the
attributes a user leaves out (`Expander`, `vdit.sample --expand_prompt`).

The run records the tokenizer it was trained with (`caption.tokenizer`,
`tokenizer.fingerprint`): captions come back as words through it, so a run made with another
word list or vocabulary size is refused with a message (`check_tokenizer`).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vdit import checkpointing, config_checks, models, sharding
from vdit.data import caption_attributes, tokenizer
from vdit.models import caption_search, captioner, posemb
from vdit.tasks import base, restore

MODEL_FIELDS = ("width", "depth", "decoder_depth", "num_heads", "mlp_ratio")


def default_caption_config() -> dict:
  """The `caption` section: what the decoder reads and how the evaluators decode."""
  return dict(
    source="video",  # captioner.SOURCES: a packed video, or a prompt (expansion)
    attribute_drop=0.5,  # source="prompt": probability of leaving each attribute out
    tokenizer="",  # tokenizer.fingerprint(input.vocab_size) of the run (set by the configs)
  )


class Captioning(base.Task):
  def check_config(self, config: ml_collections.ConfigDict, mesh_shape: dict[str, int]) -> None:
    config_checks.check_input(config)
    if "caption" not in config:
      raise config_checks.ConfigError(
        f"task=captioning needs a `caption` section ({sorted(default_caption_config())})"
      )
    m, c = config.model, config.caption
    config_checks.choice("model.name (task captioning)", m.name, ("captioner",))
    config_checks.check_model_common(m, mesh_shape)
    for key in ("width", "depth", "decoder_depth", "num_heads"):
      config_checks.positive(f"model.{key}", m[key])
    config_checks.choice("caption.source", c.source, captioner.SOURCES)
    context = tuple(m.get("patch_context", ()))
    if context and (
      len(context) != 3 or any(not isinstance(k, int) or k < 1 or k % 2 == 0 for k in context)
    ):
      raise config_checks.ConfigError(
        f"model.patch_context={context} must be () or three odd sizes >= 1 (kt, kh, kw)"
      )
    config_checks.choice(
      "model.position_code", m.get("position_code", "absolute"), posemb.POSITION_CODES
    )
    if not 0.0 <= c.attribute_drop < 1.0:
      raise config_checks.ConfigError(
        f"caption.attribute_drop={c.attribute_drop} must be in [0, 1)"
      )
    if config.input.get("text_embeddings"):
      raise config_checks.ConfigError(
        "input.text_embeddings is set: the captioner decodes token ids; leave it empty"
      )
    try:
      check_tokenizer(config, "this config")
    except ValueError as e:
      raise config_checks.ConfigError(str(e)) from None

  def build_model(self, config: ml_collections.ConfigDict) -> captioner.Captioner:
    fields = {k: v for k, v in config.model.to_dict().items() if k != "name"}
    for key in ("dtype", "param_dtype"):
      if key in fields:
        fields[key] = jnp.dtype(fields[key])
    fields["patch_context"] = tuple(fields.get("patch_context", ()))
    return captioner.Captioner(
      vocab_size=config.input.vocab_size,
      source=config.caption.source,
      channels=models.channels(config),
      **fields,
    )

  def dummy_inputs(self, config: ml_collections.ConfigDict) -> tuple:
    patches, _, positions, segment_ids, tokens, text_ids, _ = models.dummy_inputs(config)
    return (patches, positions, segment_ids, tokens, text_ids, tokens, text_ids)

  def context(self, batch, rng, config) -> tuple[jax.Array, jax.Array]:
    """The prompt tokens and segment ids the decoder is conditioned on (source="prompt"): the
    captions with attributes dropped; for a video source the captions themselves (unused)."""
    tokens, ids = batch["text_tokens"], batch["text_segment_ids"]
    if config.caption.source != "prompt":
      return tokens, ids
    kinds = jnp.asarray(caption_attributes.word_kinds(config.input.vocab_size))
    return drop_attributes(tokens, ids, rng, config.caption.attribute_drop, kinds)

  def loss(self, model, params, batch, rng, config):
    prompt, prompt_ids = self.context(batch, rng, config)
    tokens, ids = batch["text_tokens"], batch["text_segment_ids"]
    logits = model.apply(
      {"params": params},
      batch["patches"],
      batch["positions"],
      batch["segment_ids"],
      prompt,
      prompt_ids,
      tokens,
      ids,
    )  # [B, M, V]
    targets, weights = captioner.caption_targets(tokens, ids)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    count = jnp.maximum(jnp.sum(weights), 1).astype(jnp.float32)
    loss = jnp.sum(jnp.where(weights, nll, 0.0)) / count
    correct = jnp.sum(weights & (jnp.argmax(logits, -1) == targets)) / count
    return loss, {"token_accuracy": correct, "caption_tokens": jnp.sum(weights)}

  def generate(
    self, model, params, batch, rng, config, *, beams: int, temperature: float, prefix=None
  ):
    """Decoded captions [B, K, N] of every example slot (`caption_search`), and the prompts
    they were conditioned on ([B, M] tokens and segment ids; the captions for a video). A
    `prefix` ((tokens [B, K, N], lengths [B, K]); greedy only) is each caption's given start."""
    prompt, prompt_ids = self.context(batch, rng, config)
    variables = {"params": params}
    context, context_ids = model.apply(
      variables,
      batch.get("patches"),
      batch.get("positions"),
      batch.get("segment_ids"),
      prompt,
      prompt_ids,
      method="encode",
    )
    valid = batch["shapes"][..., 0] > 0  # [B, K]
    length = config.input.max_caption_tokens
    ids = caption_search.slot_segment_ids(valid, length)
    if beams > 1:
      context, context_ids = (jnp.repeat(a, beams, axis=0) for a in (context, context_ids))
      ids = jnp.repeat(ids, beams, axis=0)

    def logits_fn(tokens):
      return model.apply(variables, context, context_ids, tokens, ids, method="decode")

    if beams > 1:
      tokens = caption_search.beam_search(logits_fn, valid, length, beams)
    else:
      tokens = caption_search.greedy(
        logits_fn,
        valid,
        length,
        temperature=temperature,
        rng=jax.random.fold_in(rng, 1),
        prefix=prefix,
      )
    return {"captions": tokens, "prompts": prompt, "prompt_segment_ids": prompt_ids}

  def predict_fns(self, config, model, mesh, rules) -> base.PredictFns:
    """`captions(params, batch, rng, beams=1, temperature=0.0, prefix=None)` → {captions
    [B, K, N], prompts [B, M], prompt_segment_ids [B, M]}, global (the `captions` evaluator);
    one jitted program per (beams, temperature, with a prefix or not)."""
    keys = self.batch_keys(config)

    @functools.cache
    def program(beams: int, temperature: float):
      fn = functools.partial(
        self.generate, model, config=config, beams=beams, temperature=temperature
      )
      return base.on_global_batch(
        lambda p, b, r, *x: fn(p, b, r, prefix=x or None), keys, mesh, rules
      )

    def captions(params, batch, rng, beams: int = 1, temperature: float = 0.0, prefix=None):
      return program(int(beams), float(temperature))(params, batch, rng, *(prefix or ()))

    return super().predict_fns(config, model, mesh, rules) | {"captions": captions}


def drop_attributes(
  tokens: jax.Array, segment_ids: jax.Array, rng: jax.Array, rate: float, kinds: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Packed captions [B, M] → packed prompts [B, M] (tokens, segment ids): in each caption every
  kind of attribute (`caption_attributes`: colour, object, motion, speed, the background phrase
  "on a … background", the lead-in "… of", the function words) is left out with probability
  `rate`, drawn per example; BOS stays. The kept tokens move to the front in order (segments
  stay contiguous and increasing), the rest is padding."""
  b, m = tokens.shape
  kind = kinds[tokens]  # [B, M]
  seg = segment_ids

  def phrase(marker):  # [B, M] bool: at or after `marker` in the same caption
    return jax.lax.cummax(jnp.where(kind == marker, seg, 0), axis=1) == seg

  big = jnp.iinfo(jnp.int32).max
  lead_in = (
    jnp.flip(
      jax.lax.cummin(jnp.flip(jnp.where(kind == caption_attributes.OF, seg, big), 1), axis=1), 1
    )
    == seg
  )
  groups = caption_attributes.NUM_KINDS  # group ids: the word kinds, ON = background, OF = lead-in
  group = jnp.where(phrase(caption_attributes.IN), caption_attributes.COLOUR, kind)
  group = jnp.where(lead_in, caption_attributes.OF, group)
  group = jnp.where(phrase(caption_attributes.ON), caption_attributes.ON, group)
  drop = jax.random.uniform(rng, (b, m + 1, groups)) < rate  # per (row, segment, group)
  dropped = jax.vmap(lambda d, s, g: d[s, g])(drop, seg, group)
  keep = (seg > 0) & (~dropped | (tokens == tokenizer.BOS_ID))
  order = jnp.argsort(~keep, axis=1, stable=True)
  kept = jnp.take_along_axis(keep, order, axis=1)
  out_tokens = jnp.where(kept, jnp.take_along_axis(tokens, order, axis=1), tokenizer.PAD_ID)
  out_ids = jnp.where(kept, jnp.take_along_axis(seg, order, axis=1), 0)
  return out_tokens, out_ids


def check_tokenizer(config: ml_collections.ConfigDict, what: str) -> None:
  """ValueError unless `config` (a captioning run's) was made with this vdit's tokenizer."""
  want = tokenizer.fingerprint(config.input.vocab_size)
  got = config.caption.get("tokenizer", "")
  if got != want:
    raise ValueError(
      f"{what} was trained with tokenizer {got or '(none recorded)'!r}, but this vdit's "
      f"tokenizer at input.vocab_size={config.input.vocab_size} is {want!r}: its caption ids "
      "would decode to other words; retrain it (configs/caption/*.py record the tokenizer)"
    )


def caption_texts(tokens: np.ndarray, vocab_size: int) -> list[str]:
  """Captions [..., N] (BOS first) → their words, flattened over the leading axes."""
  flat = np.asarray(tokens).reshape(-1, np.shape(tokens)[-1])
  return [tokenizer.decode_words(row[1:], vocab_size) for row in flat]


def packed_texts(tokens: np.ndarray, segment_ids: np.ndarray, slots: int, vocab_size: int):
  """Packed captions [B, M] → [B][K] texts of segments 1..K ("" for an empty slot)."""
  out = []
  for row, ids in zip(np.asarray(tokens), np.asarray(segment_ids)):
    texts = []
    for k in range(1, slots + 1):
      caption = row[ids == k]
      words = caption[1:] if caption.size and caption[0] == tokenizer.BOS_ID else caption
      texts.append(tokenizer.decode_words(words, vocab_size) if caption.size else "")
    out.append(texts)
  return out


class Expander:
  """A prompt-expansion run (`caption.source="prompt"`): `expand(prompts, seed)` → full captions
  in its dataset's style, the attributes a prompt leaves out sampled at `temperature`."""

  def __init__(self, workdir: str, step: int | None = None):
    config = load_run_config(workdir, "prompt", "--expand_prompt")
    mesh = sharding.make_mesh({"data": -1})
    self.config, self.step, self.params = restore.ema_params(workdir, step, config, mesh)
    self.task = Captioning()
    self.model = self.task.build_model(self.config)
    self.tokenizer = tokenizer.Tokenizer(self.config.input.vocab_size)
    # The prompt is the user's: the context keeps all of it (attribute dropping is training's).
    keep_all = ml_collections.ConfigDict(self.config.to_dict())
    keep_all.caption.attribute_drop = 0.0
    self._generate = jax.jit(
      functools.partial(self.task.generate, self.model, config=keep_all, beams=1),
      static_argnames="temperature",
    )

  def expand(self, prompts: list[str], seed: int = 0, temperature: float = 1.0) -> list[str]:
    inp = self.config.input
    m = inp.text_tokens_per_row
    tokens = np.zeros((len(prompts), m), np.int32)
    ids = np.zeros((len(prompts), m), np.int32)
    for i, prompt in enumerate(prompts):
      encoded = self.tokenizer.encode(prompt, inp.max_caption_tokens)
      tokens[i, : len(encoded)], ids[i, : len(encoded)] = encoded, 1
    shapes = np.ones((len(prompts), 1, 3), np.int32)  # one example per row
    batch = dict(text_tokens=tokens, text_segment_ids=ids, shapes=shapes)
    out = self._generate(self.params, batch, jax.random.PRNGKey(seed), temperature=temperature)
    return caption_texts(np.asarray(out["captions"])[:, 0], inp.vocab_size)


def load_run_config(workdir: str, source: str, flag: str) -> ml_collections.ConfigDict:
  """The config of a captioning run with `caption.source=source`, or a ValueError saying what
  `workdir` is instead (missing, another task or source, another tokenizer)."""
  try:
    config = checkpointing.read_config(workdir)
  except FileNotFoundError:
    raise checkpointing.NoCheckpointError(
      f"{flag}={workdir!r} holds no run (no config.json); train one with "
      f"`python -m vdit.main --config=configs/caption/{'expand' if source == 'prompt' else 'video'}"
      f".py:tiny --workdir={workdir}`"
    ) from None
  if config.get("task", "video_diffusion") != "captioning":
    raise ValueError(f"{flag}={workdir!r} holds a task={config.get('task')!r} run, not captioning")
  if config.caption.source != source:
    raise ValueError(
      f"{flag}={workdir!r} is a caption.source={config.caption.source!r} run; "
      f"expected source={source!r}"
    )
  check_tokenizer(config, f"{flag}={workdir!r}")
  return config
