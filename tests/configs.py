"""Configs the tests run: the real config files, shrunk where a test needs speed."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import ml_collections

from vdit import checkpointing, config_lib, models, sharding, tasks, train, train_state
from vdit.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(arg: str = "tiny", path: str = "configs/vdit/shapes.py") -> ml_collections.ConfigDict:
  return config_lib.load(f"{os.path.join(REPO, path)}:{arg}")


def small(data_dir: str, **overrides) -> ml_collections.ConfigDict:
  """The tiny shapes config with a smaller model and rows, for fast tests."""
  c = load()
  c.input.data_dir = data_dir
  c.input.tokens_per_row = 256
  c.input.max_tokens_per_example = 192
  c.input.rows_per_batch = 8
  c.input.text_tokens_per_row = 64
  c.model.width = 32
  c.model.depth = 2
  c.model.num_heads = 2
  c.model.text_width = 32
  c.model.text_depth = 1
  c.model.text_heads = 2
  c.total_steps = 4
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.optimizer.warmup_steps = 1
  c.sample.prompts = ()
  c.evals = {}
  return override(c, **overrides)


def input_config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
  """The tests' small input pipeline: one fixed size (256 tokens, 16 frames) of the bundled
  datasets' `test` configs in `data_dir`, read in the caller's thread (no workers, no prefetch);
  not yet resolved (`pipeline.resolve_input_config`), so tests can check what resolving does."""
  c = pipeline.default_input_config()
  c.update(dataset_config="test", data_dir=data_dir, read_threads=0, prefetch_batches=0)
  # Small rows (L, B, K, M) and packer pool; every example the same size.
  c.update(tokens_per_row=512, rows_per_batch=3, max_examples_per_row=4, text_tokens_per_row=40)
  c.num_packing_bins = 4
  c.update(max_tokens_per_example=256, min_tokens_per_example=256, max_frames=16, min_frames=16)
  c.update(overrides)
  return c


def override(c: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
  """Sets dotted keys (`"input.size": (1, 32, 32)`) in `c`; returns `c`."""
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


# `python -m vdit.main` flags for the tiny shapes config shrunk like `small()` (CLI tests).
TINY_CLI_FLAGS = [
  "--config=configs/vdit/shapes.py:tiny",
  "--config.input.tokens_per_row=256",
  "--config.input.max_tokens_per_example=192",
  "--config.input.text_tokens_per_row=64",
  "--config.model.width=32",
  "--config.model.depth=2",
  "--config.model.num_heads=2",
  "--config.model.text_width=32",
  "--config.model.text_depth=1",
  "--config.model.text_heads=2",
  "--config.log_every_steps=1",
  "--config.checkpoint_every_steps=2",
  "--config.evals.modes.num_videos=2",  # every mode on 2 clips, 2 steps (24 × 16 by default)
  "--config.evals.modes.steps=2",
]


def fit_one_batch(
  config: ml_collections.ConfigDict, steps: int, batch: dict | None = None, devices=None
):
  """`steps` jitted train steps of `config`'s task on `batch` (default: the task's first batch;
  the real sharded step over the config's mesh of `devices`, default all) → (the losses, the
  last step's metrics, the final train state)."""
  task = tasks.get(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules_from_config(config.sharding_rules)
  builder = train_state.build(config, mesh, rules, task)
  state = builder.create()
  step_fn = train.jit_train_step(config, builder.model, builder.tx, mesh, rules, builder.shardings)
  batch = next(task.make_iterator(config)) if batch is None else batch
  losses, metrics = [], {}
  with sharding.activate(mesh, rules):
    batch = train.to_global(batch, config, mesh, rules)
    for _ in range(steps):
      state, metrics = step_fn(state, batch)
      # Waiting for each step: many queued steps' collectives can starve the 8 simulated
      # devices of 2 cores (an XLA CPU rendezvous timeout).
      losses.append(float(metrics["loss"]))
  return losses, metrics, state


def config_file(tmp_path, config: ml_collections.ConfigDict) -> str:
  """A config file for `--config=` that returns exactly `config` (via its resolved JSON)."""
  folder = tmp_path / "config"
  checkpointing.write_config(str(folder), config)
  path = folder / "cfg.py"
  path.write_text(
    "from vdit import checkpointing\n\n\n"
    f"def get_config(arg=None):\n  return checkpointing.read_config({str(folder)!r})\n"
  )
  return str(path)


def restored(workdir: str, config: ml_collections.ConfigDict, data_iterator=None):
  """(step, state) of the latest checkpoint in `workdir`, restored as `config`'s train state on
  its mesh (and `data_iterator`'s position, if given), the state gathered to this host."""
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.sharding_rules)
  abstract = train_state.build(config, mesh, rules, tasks.get(config)).abstract
  mngr = checkpointing.manager(workdir)
  step, state = checkpointing.restore(mngr, abstract, data_iterator)
  mngr.close()
  return step, jax.device_get(state)


def run_module(module: str, *args: str, timeout: float = 900, **env: str):
  """`python -m module *args` in the repo, output captured as text, with this process's
  environment plus `env`."""
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=timeout,
    env={**os.environ, **env},
  )


def off_zero_init(params, seed: int = 2, scale: float = 0.05):
  """`params` + `scale`·N(0, 1) noise: off an adaLN-Zero init, whose output is the same
  whatever the conditioning (label or caption)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten(
    [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
  )


def untrained_narrow():
  """(config, model, params) of the pixel-space `:tiny` narrowed to one 32-wide block, with
  random params off the adaLN-Zero init: a cheap sampler whose output follows its inputs."""
  c = load("tiny")
  narrow = dict(width=32, depth=1, num_heads=2, text_width=32, text_heads=2)
  override(c, **{f"model.{k}": v for k, v in narrow.items()})
  model = models.build(c)
  params = nn.unbox(jax.jit(lambda r: model.init(r, *models.dummy_inputs(c)))(jax.random.key(0)))
  return c, model, off_zero_init(params["params"])
