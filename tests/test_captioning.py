"""Captioning and prompt expansion: the decoder's masks, the searches, training to exact captions,
attribute dropping, the evaluator's parsing and the errors for a wrong run."""

import json

import flax.linen as nn
import imageio.v3 as iio
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import configs
from vdit import checkpointing, config_checks, media, sampling, sharding, tasks, train, train_state
from vdit.data import caption_attributes, tokenizer
from vdit.datasets import shapes
from vdit.evaluators import captions as captions_eval
from vdit.models import caption_search, captioner
from vdit.tasks import captioning
from vdit.tools import expansion_adherence, recaption

SHAPES_TEST = shapes.Shapes.BUILDER_CONFIGS[2]  # the `test` variant


def _config(data_dir, source="video", **overrides):
  c = configs.load("tiny", "configs/caption/video.py")
  c.caption.source = source
  c.input.update(dataset_config="test", data_dir=data_dir, read_threads=0, prefetch_batches=0)
  c.input.update(tokens_per_row=256, max_tokens_per_example=128, rows_per_batch=2)
  c.input.update(max_examples_per_row=4, text_tokens_per_row=64, num_packing_bins=4)
  c.model.update(width=32, depth=1, decoder_depth=1, num_heads=2)
  c.evals = {}
  return configs.override(c, **overrides)


def _batch_and_params(config, seed=0):
  task = tasks.get(config)
  batch = {k: jnp.asarray(v) for k, v in next(task.make_iterator(config)).items()}
  model = task.build_model(config)
  params = _init(model, task, config, seed)
  # Off the init, so that every input moves the output.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  params = tree.unflatten([p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  return task, model, params, batch


def _init(model, task, config, seed=0):
  init = jax.jit(lambda r: model.init(r, *task.dummy_inputs(config)))
  return nn.unbox(init(jax.random.key(seed)))["params"]


def _generate(task, model, params, batch, config, beams):
  fn = lambda p, b: task.generate(
    model, p, b, jax.random.key(0), config, beams=beams, temperature=0.0
  )  # noqa: E731
  return jax.jit(fn)(params, batch)


def _logits(model, params, batch, tokens=None):
  return model.apply(
    {"params": params},
    batch["patches"],
    batch["positions"],
    batch["segment_ids"],
    batch["text_tokens"],
    batch["text_segment_ids"],
    batch["text_tokens"] if tokens is None else tokens,
    batch["text_segment_ids"],
  )


@pytest.mark.parametrize("position_code", ["absolute", "fractional"])
def test_an_example_never_sees_another_nor_a_caption_its_future(data_dir, position_code):
  """Changing example 2's video or caption leaves example 1's logits as they are; changing a
  caption's later token leaves its earlier logits as they are (causal), not the later ones.
  The fractional position code (each example's own grid) changes the logits and keeps this."""
  # With the convolutional patch embedding and the per-example centring: neither crosses.
  config = _config(
    data_dir,
    **{
      "model.patch_context": (3, 3, 3),
      "model.center_input": True,
      "model.position_code": position_code,
    },
  )
  _, model, params, batch = _batch_and_params(config)
  if position_code != "absolute":
    absolute = model.clone(position_code="absolute")
    moved = _logits(model, params, batch) - _logits(absolute, params, batch)
    assert float(jnp.max(jnp.abs(moved))) > 1e-2
  seg, text_seg = batch["segment_ids"][0], batch["text_segment_ids"][0]
  assert int(jnp.max(seg)) >= 2, "the test needs two examples in row 0"
  logits = jax.jit(lambda p, b, t: _logits(model, p, b, t))
  base = logits(params, batch, batch["text_tokens"])
  other = dict(batch)
  other["patches"] = (
    batch["patches"].at[0].set(jnp.where((seg == 2)[:, None], 0.7, batch["patches"][0]))
  )
  tokens = batch["text_tokens"].at[0].set(jnp.where(text_seg == 2, 5, batch["text_tokens"][0]))
  changed = logits(params, other, tokens)
  one, two = text_seg == 1, text_seg == 2
  np.testing.assert_allclose(changed[0][one], base[0][one], atol=1e-5)
  assert float(jnp.max(jnp.abs(changed[0][two] - base[0][two]))) > 1e-2
  first = int(jnp.argmax(one))
  later = batch["text_tokens"].at[0, first + 2].set(7)
  causal = logits(params, batch, later)
  np.testing.assert_allclose(causal[0, : first + 2], base[0, : first + 2], atol=1e-5)
  assert float(jnp.max(jnp.abs(causal[0, first + 2] - base[0, first + 2]))) > 1e-2


def test_targets_end_each_caption_and_skip_null_ones():
  tokens = jnp.array([[1, 5, 6, 1, 7, 2, 0, 0]])
  ids = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
  targets, weights = captioner.caption_targets(tokens, ids)
  end = captioner.END_ID
  assert targets.tolist() == [[5, 6, end, 7, end, end, end, end]]
  assert weights.tolist() == [[True] * 5 + [False] * 3]  # [NULL] (segment 3) and padding: none


def test_a_beam_of_one_is_greedy(data_dir):
  config = _config(data_dir)
  task, model, params, batch = _batch_and_params(config)
  greedy = _generate(task, model, params, batch, config, 1)
  one = jax.jit(lambda p, b: _beam(model, p, b, config, 1))(params, batch)
  np.testing.assert_array_equal(one, greedy["captions"])
  three = jax.jit(lambda p, b: _beam(model, p, b, config, 3))(params, batch)
  valid = np.asarray(batch["shapes"][..., 0] > 0)
  assert not np.array_equal(np.asarray(three)[valid], np.asarray(one)[valid])  # it searched
  assert (np.asarray(one)[..., 0][valid] == tokenizer.BOS_ID).all()
  assert (np.asarray(one)[~valid][:, 1:] == captioner.END_ID).all()  # empty slots: nothing
  # A given prefix is kept as it is and the caption continues from it.
  n = config.input.max_caption_tokens
  forced = np.zeros(valid.shape + (n,), np.int32)
  forced[..., :3] = (tokenizer.BOS_ID, 7, 9)
  lengths = np.full(valid.shape, 3, np.int32)
  fn = lambda p, b, x: task.generate(  # noqa: E731
    model, p, b, jax.random.key(0), config, beams=1, temperature=0.0, prefix=x
  )
  given = np.asarray(jax.jit(fn)(params, batch, (forced, lengths))["captions"])
  assert (given[valid][:, :3] == (tokenizer.BOS_ID, 7, 9)).all()


def _beam(model, params, batch, config, beams):
  # The beam search over the task's decoder (as `Captioning.generate` calls it).
  context, ids = model.apply(
    {"params": params},
    batch["patches"],
    batch["positions"],
    batch["segment_ids"],
    None,
    None,
    method="encode",
  )
  valid = batch["shapes"][..., 0] > 0
  n = config.input.max_caption_tokens
  slots = jnp.repeat(caption_search.slot_segment_ids(valid, n), beams, axis=0)
  context, ids = jnp.repeat(context, beams, axis=0), jnp.repeat(ids, beams, axis=0)
  fn = lambda t: model.apply({"params": params}, context, ids, t, slots, method="decode")  # noqa: E731
  return caption_search.beam_search(fn, valid, n, beams)


def test_a_tiny_captioner_overfits_fixed_clips_to_their_exact_captions(data_dir):
  """Trained on one fixed batch, greedy and beam decoding give back its true captions word
  for word (a captioner that ignored its video, or mixed examples up, could not)."""
  config = _config(data_dir, **{"model.width": 64, "model.num_heads": 4})
  task, model, params, batch = _batch_and_params(config)
  params = _init(model, task, config)
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt):
    loss, grads = jax.value_and_grad(lambda p: task.loss(model, p, batch, None, config)[0])(params)
    updates, opt = tx.update(grads, opt)
    return optax.apply_updates(params, updates), opt, loss

  for _ in range(150):
    params, opt, loss = step(params, opt)
  assert float(loss) < 0.05
  slots, vocab = config.input.max_examples_per_row, config.input.vocab_size
  truths = captioning.packed_texts(batch["text_tokens"], batch["text_segment_ids"], slots, vocab)
  valid = np.asarray(batch["shapes"][..., 0] > 0)
  for beams in (1, 3):
    out = _generate(task, model, params, batch, config, beams)
    decoded = captioning.caption_texts(out["captions"], vocab)
    want = [t for row in truths for t in row]
    got = [d for d, v in zip(decoded, valid.reshape(-1)) if v]
    assert got == [w for w, v in zip(want, valid.reshape(-1)) if v]
    assert len(set(got)) > 1


def test_dropping_attributes_leaves_whole_attributes_out():
  tok = tokenizer.Tokenizer(1024)
  texts = [
    "a video of a red circle moving up-left slowly on a gray background",
    "the digit 7 bouncing around in red",
  ]
  encoded = [tok.encode(t) for t in texts]
  tokens = np.zeros((1, 40), np.int32)
  ids = np.zeros((1, 40), np.int32)
  at = 0
  for k, e in enumerate(encoded):
    tokens[0, at : at + len(e)], ids[0, at : at + len(e)] = e, k + 1
    at += len(e)
  kinds = jnp.asarray(caption_attributes.word_kinds(1024))
  same = captioning.drop_attributes(
    jnp.asarray(tokens), jnp.asarray(ids), jax.random.key(0), 0.0, kinds
  )
  np.testing.assert_array_equal(same[0], tokens)
  seen = set()
  for seed in range(40):
    out_tokens, out_ids = captioning.drop_attributes(
      jnp.asarray(tokens), jnp.asarray(ids), jax.random.key(seed), 0.5, kinds
    )
    prompts = captioning.packed_texts(out_tokens, out_ids, 2, 1024)[0]
    assert np.all(np.diff(np.asarray(out_ids[0])[np.asarray(out_ids[0]) > 0]) >= 0)  # contiguous
    for prompt, text in zip(prompts, texts):
      got, full = caption_attributes.parse(prompt), caption_attributes.parse(text)
      assert all(got[k] in (None, full[k]) for k in got)  # never another value
      seen.add(prompt)
    shapes_words, digit_words = prompts[0].split(), prompts[1].split()
    # Phrases go whole or not at all: the background, the motion, the lead-in, "in <colour>".
    assert ("on" in shapes_words) == ("background" in shapes_words) == ("gray" in shapes_words)
    assert ("moving" in shapes_words) == ("up" in shapes_words) == ("left" in shapes_words)
    assert ("video" in shapes_words) == ("of" in shapes_words)
    assert ("in" in digit_words) == ("red" in digit_words)
  assert len(seen) > 20  # many different prompts


def test_parse_reads_captions_and_partial_prompts():
  p = caption_attributes.parse
  assert p("footage of a red circle moving up left quickly on a gray background") == dict(
    colour="red", object="circle", direction="up-left", speed="quickly", background="gray"
  )
  assert p("red circle") == dict(
    colour="red", object="circle", direction=None, speed=None, background=None
  )
  assert p("the digit seven bouncing around in cyan")["object"] == "7"
  assert p("a square on a white background")["colour"] is None  # a background is not a colour


def test_caption_scores_count_each_attribute_where_the_truth_names_it():
  items = [
    (
      "a red circle moving left on a gray background",
      "a red circle moving left on a black background",
      "",
    ),
    ("a blue square moving up slowly", "a blue triangle moving up slowly", ""),
  ]
  s = captions_eval.caption_scores(items, shapes_data=True)
  assert s["colour"] == 1.0 and s["object"] == 0.5 and s["direction"] == 1.0
  assert s["background"] == 0.0 and s["speed"] == 1.0 and s["phrase"] == 0.5 and s["exact"] == 0.0
  e = captions_eval.expansion_scores([("", "a red square moving down", "a red")], shapes_data=True)
  assert e["kept"] == 1.0 and e["filled"] == 1.0 and e["filled_object_square"] == 1.0


def test_wrong_runs_fail_with_a_message(data_dir, tmp_path):
  with pytest.raises(checkpointing.NoCheckpointError, match="holds no run"):
    captioning.load_run_config(str(tmp_path / "nope"), "prompt", "--expand_prompt")
  config = _config(data_dir)
  checkpointing.write_config(str(tmp_path / "video"), config)
  with pytest.raises(ValueError, match="caption.source='video' run; expected source='prompt'"):
    captioning.load_run_config(str(tmp_path / "video"), "prompt", "--expand_prompt")
  config.caption.tokenizer = "words00000000-v1024"
  checkpointing.write_config(str(tmp_path / "old"), config)
  with pytest.raises(ValueError, match="trained with tokenizer 'words00000000-v1024'"):
    captioning.load_run_config(str(tmp_path / "old"), "video", "--captioner")
  with pytest.raises(config_checks.ConfigError, match="tokenizer"):
    tasks.get(config).check_config(config, dict(data=8, fsdp=1, sequence=1, tensor=1))
  config = _config(data_dir, **{"model.patch_context": (3, 2, 3)})
  with pytest.raises(config_checks.ConfigError, match="three odd sizes"):
    tasks.get(config).check_config(config, dict(data=8, fsdp=1, sequence=1, tensor=1))
  config = _config(data_dir, **{"input.vocab_size": 900})
  with pytest.raises(config_checks.ConfigError, match="input.vocab_size=900"):
    tasks.get(config).check_config(config, dict(data=8, fsdp=1, sequence=1, tensor=1))
  config = _config(data_dir, **{"model.position_code": "polar"})
  with pytest.raises(config_checks.ConfigError, match="model.position_code.*'polar'"):
    tasks.get(config).check_config(config, dict(data=8, fsdp=1, sequence=1, tensor=1))


def test_a_captioner_starts_from_a_finished_runs_params(data_dir, tmp_path):
  """`init_from` (every training config): a new run of the same model starts from another run's
  EMA params at step 0, on its own schedule; another model's run is refused by name."""
  assert configs.load("tiny", "configs/caption/video.py").init_from == ""
  first, rows = str(tmp_path / "first"), {"input.rows_per_batch": 8}  # 8 devices
  finished = train.train_and_evaluate(_config(data_dir, total_steps=2, **rows), first)
  config = _config(data_dir, total_steps=4, init_from=first, **rows)
  train.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.sharding_rules)
  builder = train_state.build(config, mesh, rules, tasks.get(config))
  state = builder.create(train.initial_params(config, builder))
  same = jax.tree.map(jnp.array_equal, state.params, finished.ema_params)
  assert all(jax.tree.leaves(same)) and int(state.step) == 0
  fresh = builder.create()  # without init_from: the config's own initialisation
  assert not all(jax.tree.leaves(jax.tree.map(jnp.array_equal, fresh.params, state.params)))
  wider = _config(data_dir, init_from=first, **rows, **{"model.width": 48})
  builder = train_state.build(wider, mesh, rules, tasks.get(wider))
  with pytest.raises(config_checks.ConfigError, match="init_from=.*not this model's"):
    train.initial_params(wider, builder)


def test_sample_refuses_a_missing_expander_before_any_compute(tmp_path):
  out = configs.run_module(
    "vdit.sample",
    f"--workdir={tmp_path}/video",
    f"--expand_prompt={tmp_path}/nope",
    "--prompt=red circle",
    f"--out={tmp_path}/x.gif",
    timeout=300,
  )
  assert out.returncode != 0 and "Traceback" not in out.stderr
  errors = [x for x in out.stderr.splitlines() if x.startswith("error:")]
  assert len(errors) == 1 and f"--expand_prompt='{tmp_path}/nope' holds no run" in errors[0]


@pytest.mark.slow
def test_expand_prompt_through_main_and_sample(data_dir, tmp_path):
  """A tiny expander trained through `vdit.main`, then `vdit.sample --expand_prompt`: the output's
  metadata holds the expanded prompt the video model got and the user's prompt."""
  expander = str(tmp_path / "expander")
  c = _config(data_dir, "prompt", total_steps=2, log_every_steps=1, **{"input.rows_per_batch": 8})
  c.checkpoint_every_steps = 2
  train.train_and_evaluate(c, expander)
  video = str(tmp_path / "video")
  train.train_and_evaluate(configs.small(data_dir, total_steps=1), video)
  npz = str(tmp_path / "x.npz")
  out = configs.run_module(
    "vdit.sample",
    f"--workdir={video}",
    f"--expand_prompt={expander}",
    "--prompt=red circle",
    "--steps=1",
    f"--out={npz}",
  )
  assert out.returncode == 0, out.stderr[-3000:]
  with np.load(npz) as f:
    meta = json.loads(str(f["metadata"]))
  assert meta["user_prompt"] == "red circle" and meta["expand_prompt"] == expander
  assert f"expanded 'red circle' -> {meta['prompt']!r}" in out.stderr
  expand = captioning.Expander(expander).expand
  assert meta["prompt"] == expand(["red circle"], seed=0)[0]  # --seed=0: the same expansion
  assert len(set(expand(["red circle"] * 8, seed=0))) > 1  # sampled: expansions differ
  # The with/without-expansion measurement on these runs: every short prompt of the tiny
  # vocabulary (12 "{colour} {shape}", 12 "a {shape} moving {direction}"), scored on what it names.
  out = expansion_adherence.measure(sampling.load(video), expand, 1, steps=1, size=(2, 8, 8))
  for condition in ("short", "expanded"):
    got = out[condition]
    assert (got["colour_count"], got["shape_count"], got["direction_count"]) == (12, 24, 12)
    assert all(0 <= got[k] <= 1 for k in ("colour", "shape", "direction", "all_named"))
  assert out["examples"][0][0] == "red circle" and 0 <= out["unparsed_expansions"] <= 24


def test_recaption_never_overwrites_captions(tmp_path):
  assert recaption.output_path(str(tmp_path)) == str(tmp_path / "captions.jsonl")
  (tmp_path / "captions.jsonl").write_text("")
  assert recaption.output_path(str(tmp_path)) == str(tmp_path / recaption.RECAPTIONED)
  (tmp_path / recaption.RECAPTIONED).write_text("")
  with pytest.raises(ValueError, match="exists; move it away"):
    recaption.output_path(str(tmp_path))


@pytest.mark.slow
def test_recaption_a_folder_writes_the_captioners_captions(data_dir, tmp_path):
  """A folder of shapes clips with captions of its own: `vdit.tools.recaption` writes one line
  per clip (in the folder's order, split kept) beside them, leaves the original file as it was,
  and refuses to overwrite its own output."""
  run = str(tmp_path / "captioner")
  config = _config(data_dir, total_steps=1, **{"input.rows_per_batch": 8})
  train.train_and_evaluate(config, run)
  clips = tmp_path / "clips"
  clips.mkdir()
  for i in range(2):
    media.write_video(str(clips / f"c{i}.gif"), shapes.generate(SHAPES_TEST, "train", i)["video"])
  (clips / "captions.jsonl").write_text('{"file": "c0.gif", "caption": "mine"}\n')
  out = configs.run_module(
    "vdit.tools.recaption", f"--captioner={run}", f"--dataset_config={clips}", "--beams=1"
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == [str(clips / recaption.RECAPTIONED)]
  lines = [json.loads(x) for x in (clips / recaption.RECAPTIONED).read_text().splitlines()]
  assert [x["file"] for x in lines] == ["c0.gif", "c1.gif"] and all(x["recaptioned"] for x in lines)
  assert (clips / "captions.jsonl").read_text() == '{"file": "c0.gif", "caption": "mine"}\n'
  again = configs.run_module(
    "vdit.tools.recaption", f"--captioner={run}", f"--dataset_config={clips}"
  )
  assert again.returncode != 0 and "exists; move it away" in again.stderr


@pytest.mark.slow
def test_recaptioned_folder_trains_video_dit_on_the_captioners_captions(data_dir, tmp_path):
  """Issue 16: a folder of shapes clips without any caption, re-captioned by a (1-step)
  captioner, becomes trainable: VideoDiT's training batches carry the captioner's captions
  (not the empty caption the folder had) and VideoDiT trains on it."""
  run = str(tmp_path / "captioner")
  train.train_and_evaluate(_config(data_dir, total_steps=1, **{"input.rows_per_batch": 8}), run)
  clips = tmp_path / "clips"
  for i in range(6):  # each clip a folder of PNG frames (lossless), no captions.jsonl
    frames = shapes.generate(SHAPES_TEST, "train", i)["video"]
    (clips / f"c{i}").mkdir(parents=True)
    for t, frame in enumerate(frames):
      iio.imwrite(clips / f"c{i}" / f"{t:02d}.png", frame)
  c = configs.small(data_dir, total_steps=2, **{"input.dataset": "folder"})
  c.input.update(dataset_config=str(clips), read_threads=0, prefetch_batches=0)
  tok = tokenizer.Tokenizer(c.input.vocab_size)

  def trained_on():  # the captions of one training batch, as the tokenizer left them
    batch = next(train.make_data_iterator(c))
    rows = captioning.packed_texts(
      batch["text_tokens"], batch["text_segment_ids"], c.input.max_examples_per_row, tok.vocab_size
    )
    return {text for row in rows for text in row}

  assert trained_on() == {""}  # before: every clip has the empty caption (the null condition)
  out = recaption.recaption(run, str(clips), beams=1)
  assert out == str(clips / "captions.jsonl")
  lines = [json.loads(x) for x in (clips / "captions.jsonl").read_text().splitlines()]
  assert sorted(x["file"] for x in lines) == [f"c{i}" for i in range(6)]
  written = {
    tokenizer.decode_words(tok.encode(x["caption"], c.input.max_caption_tokens), tok.vocab_size)
    for x in lines
    if x["split"] == "train"
  }
  assert "" not in written
  seen = trained_on() - {""}  # "": an empty slot of a row
  assert seen and seen <= written  # the batches carry the re-captioned captions, only those
  state = train.train_and_evaluate(c, str(tmp_path / "video"))
  assert int(state.step) == 2
