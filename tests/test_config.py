"""Configs: argument parsing, locking, validation and the CLI's one-line errors."""

import os
import re
import subprocess
import sys

import ml_collections
import pytest

from tests.configs import REPO
from tests.configs import load as load_config
from vdit import (
  config_checks,
  config_lib,
  models,
  sampling,
  section_spec,
  sharding,
  train,
  train_state,
)
from vdit.data import pipeline
from vdit.diffusion import distillation, objectives


def test_parse_arg_types_and_unknown():
  arg = config_lib.parse_arg("tiny,variant=B,steps=3", tiny=False, variant="S", steps=1)
  assert (arg.tiny, arg.variant, arg.steps) == (True, "B", 3)
  with pytest.raises(ValueError, match="unknown config argument 'nope'.*expected one of"):
    config_lib.parse_arg("nope=1", tiny=False)
  with pytest.raises(ValueError, match="needs a value"):
    config_lib.parse_arg("steps", steps=1)


def test_tiny_config_is_valid():
  config = load_config("tiny")
  train.validate(config)
  assert config.total_steps > 0


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("input.patch_size", (2, 4), "input.patch_size=.*three positive ints"),
    ("input.max_tokens_per_example", 10_000, "exceeds input.tokens_per_row"),
    ("model.num_heads", 3, "model.width=128 is not divisible by model.num_heads=3"),
    ("model.attention_backend", "flash", "attention_backend='flash' is not supported"),
    ("sample.height", 0, r"sample.height=0 must be an integer ≥ 1"),
    ("input.rows_per_batch", 6, r"rows_per_batch=6 is not divisible by data×fsdp=8"),
    ("diffusion.time_sampling", "beta", "time_sampling='beta' is not supported"),
    ("diffusion.self_condition", 1.5, r"self_condition=1.5 must be a rate in \[0, 1\]"),
    ("diffusion.input_perturbation", -0.1, r"input_perturbation=-0.1 must be >= 0"),
    ("diffusion.input_blur", -1.0, r"input_blur=-1.0 must be >= 0 \(cells\)"),
    ("diffusion.input_blur_rate", 1.5, r"input_blur_rate=1.5 a rate in \[0, 1\]"),
    ("model.patch_context", (3, 2, 3), r"patch_context=\(3, 2, 3\) must be \(\) or three odd"),
    ("model.output_context", (3, 3), r"output_context=\(3, 3\) must be \(\) or three odd"),
    ("model.locality", -1.0, r"model.locality=-1.0 must be ≥ 0"),
    ("model.locality", float("nan"), r"model.locality=nan must be ≥ 0"),
    ("model.patch_skip", -2, r"model.patch_skip=-2 must be an integer ≥ 0"),
    ("optimizer.lr", float("nan"), r"optimizer.lr=nan must be a finite number > 0"),
    ("optimizer.lr", -1.0, r"optimizer.lr=-1.0 must be a finite number > 0"),
    ("optimizer.name", "lion", r"optimizer.name='lion' is not supported; expected one of"),
    ("optimizer.grad_clip", 0.0, r"optimizer.grad_clip=0.0 must be a finite number > 0"),
    ("optimizer.b2", 1.0, r"optimizer.b2=1.0 must be in \[0, 1\)"),
    ("input.max_frames", 1, r"input.min_frames=4 must be in \[1, max_frames=1\]"),
    ("input.dataset_config", "huge", r"dataset='shapes' dataset_config='huge' is unknown"),
    ("diffusion.cond_probs.forcing", 0.1, r"forcing=0.1 .* needs model.shared_conditioning=False"),
    # Typed sections (vdit.section_spec): a key the section does not have is named.
    ("diffusion.flow_predction", "x0", r"diffusion has no key\(s\) \['flow_predction'\]"),
    ("optimizer.lr_warmup", 10, r"optimizer has no key\(s\) \['lr_warmup'\]"),
    ("distill.stepz", 4, r"distill has no key\(s\) \['stepz'\]"),
    ("sample.mesh", "sequence:3", r"sample.mesh='sequence:3': .*needs 3 devices, but 8 are"),
    ("model.cell_heads", 2, r"model keys \['cell_heads'\] are not settable fields of VideoDiT"),
    ("sample.num_frame", 8, r"sample has no key\(s\) \['num_frame'\]"),
    ("sample.steps", 0, r"sample.steps=0 must be an integer ≥ 1"),
    # An eval's options are its evaluator's keywords: a misspelt one fails before training.
    (
      "evals.adherence.num_promts",
      4,
      r"evals.adherence \(type='adherence'\): unknown option\(s\) \['num_promts'\]",
    ),
  ],
)
def test_validate_names_the_bad_value(key, value, message):
  config = load_config("tiny")
  node = config
  *path, last = key.split(".")
  for p in path:
    node = node[p]
  node[last] = value
  with pytest.raises(config_checks.ConfigError, match=message):
    train.validate(config)


def test_a_typed_section_fills_defaults_and_names_a_bad_type():
  """`section_spec.read`: absent keys take the spec's default, numbers take the field's type,
  and a value of the wrong type is a ValueError naming the key and the type expected."""
  opt = section_spec.read(train_state.Optimizer, {"lr": 1, "warmup_steps": 50.0}, "optimizer")
  assert opt == train_state.Optimizer(lr=1.0, warmup_steps=50)
  assert type(opt.lr) is float and type(opt.warmup_steps) is int
  bad = [
    (
      train_state.Optimizer,
      {"warmup_steps": 2.5},
      r"optimizer.warmup_steps=2.5 must be an integer",
    ),
    (train_state.Optimizer, {"name": 3}, r"optimizer.name=3 must be a string"),
    (train_state.Optimizer, {"b1": True}, r"optimizer.b1=True must be a number"),
    (objectives.Spec, {"learn_sigma": 1}, r"diffusion.learn_sigma=1 must be True or False"),
    (objectives.Spec, {"guidance_interval": (0.3,)}, r"guidance_interval=\(0.3,\) must have 2"),
    (objectives.Spec, {"cond_probs": "none"}, r"diffusion.cond_probs='none' must be a tuple"),
  ]
  for spec, section, message in bad:
    with pytest.raises(ValueError, match=message):
      section_spec.read(
        spec, section, "optimizer" if spec is train_state.Optimizer else "diffusion"
      )
  # The input section is a typed ConfigDict (`pipeline.default_input_config`): the same errors.
  with pytest.raises(ValueError, match=r"input.tokens_per_row='many' must be of type int"):
    pipeline.resolve_input_config({"tokens_per_row": "many"})


def test_a_config_from_before_a_key_existed_reads_with_its_defaults():
  """An older run's config (saved before the typed sections' newer keys existed) validates,
  and reads as the same settings: every key it lacks is the spec's default."""
  config = load_config("tiny")
  full = objectives.Spec.from_config(config.diffusion), train_state.optimizer_spec(config.optimizer)
  old = config.to_dict()
  for key in ("input_blur", "input_blur_rate", "repa_encoder", "repa_weight", "flow_eta"):
    del old["diffusion"][key]
  for key in ("name", "schedule_steps", "grad_accum_steps", "final_lr_fraction"):
    del old["optimizer"][key]
  del old["distill"], old["model"]["cell_head"], old["model"]["position_code"]
  del old["sample"]["mesh"]
  old = ml_collections.ConfigDict(old)
  train.validate(old)
  assert sampling.settings(old) == sampling.settings(config)
  assert (
    objectives.Spec.from_config(old.diffusion),
    train_state.optimizer_spec(old.optimizer),
  ) == full
  assert distillation.settings(old.get("distill")) == distillation.Settings()


def test_mesh_shape_resolution_and_errors():
  assert sharding.mesh_shape({"data": -1}, 8) == (8, 1, 1, 1)
  assert sharding.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 1, 2)
  with pytest.raises(ValueError, match="needs 4 devices, but 8"):
    sharding.mesh_shape({"data": 2, "fsdp": 2}, 8)
  with pytest.raises(ValueError, match="unknown mesh axes"):
    sharding.mesh_shape({"model": 2}, 8)
  with pytest.raises(ValueError, match="more than one axis"):
    sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)


def _run_main(*args):
  return subprocess.run(
    [sys.executable, "-m", "vdit.main", *args],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=300,
  )


def test_cli_unknown_config_key_is_one_clear_error(tmp_path):
  out = _run_main(
    "--config=configs/vdit/shapes.py:tiny", f"--workdir={tmp_path}", "--config.total_stepz=3"
  )
  assert out.returncode != 0
  assert "unknown config key" in out.stderr and "total_stepz" in out.stderr
  assert "Traceback" not in out.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


def test_cli_invalid_value_fails_before_compute(tmp_path):
  out = _run_main(
    "--config=configs/vdit/shapes.py:tiny", f"--workdir={tmp_path}", "--config.sample.width=-4"
  )
  assert out.returncode != 0
  assert "sample.width=-4 must be an integer ≥ 1" in out.stderr
  assert "Traceback" not in out.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


def test_still_clips_below_the_temporal_patch_are_refused():
  config = load_config("tiny")
  config.input.min_frames = config.input.max_frames = 1
  with pytest.raises(config_checks.ConfigError, match=r"max_frames=1 is below the temporal patch"):
    train.validate(config)


def test_folder_dataset_config_must_be_a_directory(tmp_path):
  config = load_config("tiny")
  config.input.dataset, config.input.dataset_config = "folder", str(tmp_path / "missing")
  with pytest.raises(config_checks.ConfigError, match=r"dataset_config=.*missing' is not a dir"):
    train.validate(config)


@pytest.mark.parametrize(
  "text,arg,message",
  [
    (None, "tiny", r"config file '.*nope.py' does not exist"),
    ("def get_config(:\n  pass\n", "", r"config file '.*bad.py' line 1: invalid syntax"),
    ("def get_config():\n  raise RuntimeError('boom')\n", "", r"raised RuntimeError: boom"),
    ("x = 1\n", "", r"has no get_config\(\) function"),
  ],
)
def test_config_file_problems_are_one_line(tmp_path, text, arg, message):
  path = tmp_path / ("nope.py" if text is None else "bad.py")
  if text is not None:
    path.write_text(text)
  spec = f"{path}:{arg}" if arg else str(path)
  assert re.search(message, config_lib.check_config_file(spec))


@pytest.mark.parametrize(
  "arg,message",
  [
    ("tinny", r"unknown config argument 'tinny'.*expected one of \['caption_dim'"),
    ("variant=XL", r"variant='XL' is not one of \['B', 'L', 'S'\]"),
    ("tiny,small", r"choose one of tiny and small"),
    ("tiny,captions=/x", r"captions='/x',caption_dim=0: .* need both"),
    ("tiny,latent=/x", r"latent space needs both"),
  ],
)
def test_config_arguments_are_checked(arg, message):
  assert re.search(message, config_lib.check_config_file(f"{REPO}/configs/vdit/shapes.py:{arg}"))
  for good in ("tiny", "small"):
    assert config_lib.check_config_file(f"{REPO}/configs/vdit/shapes.py:{good}") == ""


def test_config_files_read_no_files(tmp_path, monkeypatch):
  """A config names other runs' files; the run reads and checks them, the config file does not
  (it builds the same with the files absent and the process in an empty directory)."""
  monkeypatch.chdir(tmp_path)
  missing = str(tmp_path / "absent")
  c = config_lib.load(
    f"{REPO}/configs/vdit/shapes.py:tiny,latent={missing},latents={missing},"
    f"captions={missing},caption_dim=64"
  )
  assert c.autoencoder == missing and c.latent_compression == (1, 4) and c.input.channels == 8
  assert c.input.text_embeddings == missing and c.model.text_embed_dim == 64
  # `vae=` names the autoencoder's config variant: the causal 3-D VAE compresses time by 2.
  c = config_lib.load(
    f"{REPO}/configs/vdit/shapes.py:tiny,latent={missing},latents={missing},vae=tiny"
  )
  assert c.latent_compression == (2, 4) and c.input.patch_size == (1, 2, 2)
  with pytest.raises(config_checks.ConfigError, match=f"{missing}' is not a directory"):
    train.validate(c)  # the run reads them, before any compute


def test_cli_missing_config_file_is_one_line(tmp_path):
  out = _run_main("--config=configs/vdit/nope.py:tiny", f"--workdir={tmp_path}")
  assert out.returncode != 0
  assert out.stderr.strip().splitlines()[-1] == (
    "error: config file 'configs/vdit/nope.py' does not exist (--config=configs/vdit/nope.py:tiny)"
  )
  assert "Traceback" not in out.stderr


def test_video_dit_is_built_from_its_own_fields():
  """`models.build`: VideoDiT takes `config.model`'s keys as its dataclass fields (absent ones
  keep the module's defaults); a misspelt key or one the data decides is one clear error."""
  config = load_config("tiny")
  model = models.build(config)
  assert (model.width, model.depth, model.rope) == (config.model.width, config.model.depth, True)
  assert model.patch_context == tuple(config.model.patch_context)
  assert model.shared_conditioning == config.input.max_examples_per_row
  assert model.patch_dim == models.patch_dim(config) and model.qk_norm is False  # a default
  for key in ("widht", "patch_dim"):
    bad = load_config("tiny")
    with bad.unlocked():
      bad.model[key] = 3
    with pytest.raises(ValueError, match=f"model keys \\['{key}'\\] are not settable fields"):
      models.build(bad)


def test_every_module_imports_in_one_process_and_defines_no_flag():
  """Entry points (`vdit.main`, `vdit.evaluate`, `vdit.sample`, the tools) define their flags
  only when run as a program: every vdit module can be imported into one process (a test, a
  notebook, a user's script) without a duplicate flag, and importing defines none."""
  import importlib  # noqa: PLC0415
  import pkgutil  # noqa: PLC0415

  from absl import flags  # noqa: PLC0415

  import vdit  # noqa: PLC0415

  names = [m.name for m in pkgutil.walk_packages(vdit.__path__, "vdit.")]
  assert {"vdit.main", "vdit.evaluate", "vdit.sample", "vdit.tools.recaption"} <= set(names)
  for name in names:
    importlib.import_module(name)
  defined = {m for m in flags.FLAGS.flags_by_module_dict() if m.startswith("vdit")}
  assert not defined, f"modules that define flags on import: {sorted(defined)}"
