"""Precomputed caption embeddings: the table, the pipeline rows, the model and the whole run."""

import copy
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import configs
from vdit import caption_embedders, config_checks, models, sampling, train
from vdit.data import caption_table, pipeline, tokenizer, transforms
from vdit.models.text import TextEncoder
from vdit.tools import embed_captions


def test_table_lookup_null_truncation_and_new_captions(tmp_path, caplog):
  embed = caption_table.words_embedder(8, seed=3)
  texts = ["a red circle moving right", "a blue square"]
  meta = caption_table.write_table(str(tmp_path), zip(texts, embed(texts)), "words:8:3")
  assert meta["dim"] == 8 and meta["captions"] == 2
  table = caption_table.CaptionEmbeddings(str(tmp_path), max_len=3)
  # A stored caption: its sequence, [BOS] per position, truncated to max_len with one warning.
  with caplog.at_level(logging.WARNING):
    ids, emb = table(b"a red circle moving right")
  assert "truncated to max_caption_tokens=3" in caplog.text
  np.testing.assert_array_equal(emb, embed(texts[:1])[0][:3])
  assert ids.tolist() == [tokenizer.BOS_ID] * 3
  # The empty caption is the null condition; an element's own embedding wins over the table.
  ids, emb = table("")
  assert ids.tolist() == [tokenizer.NULL_ID] and not emb.any()
  own = np.ones((2, 8), np.float32)
  np.testing.assert_array_equal(table("a blue square", own)[1], own)
  # Unknown captions: an error naming the table, or (sampler) the table's embedder.
  with pytest.raises(KeyError, match="not in the caption-embedding table"):
    table("a green star")
  new = caption_table.CaptionEmbeddings(
    str(tmp_path), max_len=8, make_embedder=caption_embedders.from_spec
  )
  np.testing.assert_array_equal(new("a green star")[1], embed(["a green star"])[0])
  with pytest.raises(ValueError, match=r"shape \(3,\); expected \[n, 8\]"):
    caption_table.write_table(
      str(tmp_path / "bad"), [("x", np.zeros((2, 8))), ("y", np.zeros(3))], "e"
    )


def test_text_encoder_projects_embeddings_and_nulls_them():
  enc = TextEncoder(vocab_size=64, width=16, depth=1, num_heads=2, embed_dim=8)
  tokens = jnp.array([[1, 1, 1, 2, 0]])  # a 3-token caption, a null caption, padding
  seg = jnp.array([[1, 1, 1, 2, 0]])
  emb = jax.random.normal(jax.random.key(0), (1, 5, 8))
  params = enc.init(jax.random.key(1), tokens, seg, emb)
  out = enc.apply(params, tokens, seg, emb)
  # Other embeddings change the caption's encoding but not the null one (a learned vector).
  out2 = enc.apply(params, tokens, seg, emb.at[:, :3].multiply(-1.0).at[:, 3].add(5.0))
  assert np.abs(out2[0, :3] - out[0, :3]).max() > 1e-3
  np.testing.assert_allclose(out2[0, 3], out[0, 3], atol=1e-6)
  with pytest.raises(ValueError, match="needs embeddings"):
    enc.apply(params, tokens, seg)


@pytest.mark.slow
def test_embedding_run_trains_samples_and_is_checked(data_dir, tmp_path):
  # 1. A token run whose trained text encoder becomes the frozen "run:" embedder.
  teacher = str(tmp_path / "teacher")
  c = configs.small(data_dir, total_steps=1, checkpoint_every_steps=1)
  train.train_and_evaluate(c, teacher)
  table = str(tmp_path / "captions")
  texts = embed_captions.dataset_captions("shapes", ["validation"], "tiny", data_dir)
  meta = embed_captions.embed_captions(texts + [""], f"run:{teacher}", table)
  assert meta["dim"] == c.model.text_width and meta["captions"] == len(texts)

  # 2. The rows carry each example's embeddings where its caption tokens are, zeros elsewhere.
  c = configs.load(f"tiny,captions={table},caption_dim={meta['dim']}")
  small = configs.small(data_dir)
  c.input, c.model = small.input, small.model
  c.input.split = "validation"
  c.input.text_embeddings, c.model.text_embed_dim = table, meta["dim"]
  c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 2, 1, 2
  c.optimizer.warmup_steps = 1
  c.sample.prompts, c.sample.steps = ("a red circle moving right", "a purple zorblax"), 2
  c.evals = {"prompts": dict(type="prompts")}  # the sample prompts, at the end
  train.validate(c)
  batch = next(pipeline.make_iterator(c.input, seed=0))
  emb, seg, tok = batch["text_embeddings"], batch["text_segment_ids"], batch["text_tokens"]
  assert emb.shape == (*seg.shape, meta["dim"])
  real = (seg > 0) & (tok != tokenizer.NULL_ID)
  assert np.abs(emb[real]).sum(-1).min() > 0 and not emb[~real].any()
  lookup = caption_table.CaptionEmbeddings(table, c.input.max_caption_tokens)
  element = transforms.EmbedCaption(table, c.input.max_caption_tokens).map({"caption": texts[0]})
  np.testing.assert_array_equal(element["text_embeddings"], lookup(texts[0])[1])

  # 3. Training and sampling: prompts outside the table go through the table's embedder.
  workdir = str(tmp_path / "student")
  train.train_and_evaluate(c, workdir)
  assert os.path.exists(os.path.join(workdir, "samples", "2", "a_purple_zorblax.gif"))
  sampler = sampling.load(workdir)
  assert isinstance(sampler.tokenizer, caption_table.CaptionEmbeddings)
  videos = sampler.generate(["a blue square"], num_frames=2, height=8, width=8, steps=2)
  assert videos.shape == (1, 2, 8, 8, 3)
  params = sampler.params
  assert "embed_proj" in params["text"] and "embed" not in params["text"]
  assert models.build(c).text_embed_dim == meta["dim"]

  # 4. Mismatches fail before any compute.
  for overrides, message in [
    ({"model.text_embed_dim": 7}, f"model.text_embed_dim=7 but .* have {meta['dim']} channels"),
    ({"input.text_embeddings": ""}, "needs input.text_embeddings"),
    ({"input.text_embeddings": str(tmp_path)}, "holds no meta.json"),
  ]:
    with pytest.raises(config_checks.ConfigError, match=message):
      train.validate(configs.override(copy.deepcopy(c), **overrides))
