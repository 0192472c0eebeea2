"""Damaged or shared state: a damaged latest checkpoint, two trainers on one workdir, an empty
`--workdir` and a resume with a changed config. Each gives a clear message, or falls back with a
warning that names what was wrong; none is fatal by traceback or silent. The checkpoints are the
real trainer's (trained once per module, copied per case) and really damaged on disk; the lock
is held by a real second process."""

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp  # (only to forge a damaged checkpoint)
import pytest

from tests import configs
from vdit import checkpointing, sharding, tasks, train, train_state, workdir_guard

TOTAL = 4  # the module's run saves checkpoints 2 and 4


def _config(data_dir, **overrides):
  kw = {"total_steps": TOTAL, "optimizer.schedule_steps": TOTAL, "checkpoint_every_steps": 2}
  return configs.small(data_dir, **{**kw, **overrides})


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """A workdir of the real trainer with checkpoints 2 and 4 (never modified by the tests)."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  train.train_and_evaluate(_config(data_dir), str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  return workdir


@pytest.fixture
def workdir(trained, tmp_path):
  """A copy of the trained workdir, for one test to damage."""
  return shutil.copytree(trained, tmp_path / "run")


def _abstract(config, mesh_config=None):
  mesh = sharding.make_mesh(mesh_config or config.mesh)
  rules = sharding.rules_from_config(config.sharding_rules)
  return train_state.build(config, mesh, rules, tasks.get(config)).abstract


def _restore(workdir, config, data_iterator=None, **kw):
  mngr = checkpointing.manager(str(workdir))
  try:
    return checkpointing.restore(mngr, _abstract(config), data_iterator, **kw)
  finally:
    mngr.close()


def _snapshot(workdir) -> dict[str, str]:
  """Every file of `workdir` (but the lock file) → its content hash."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      if name != workdir_guard.LOCK_FILE:
        with open(path, "rb") as f:
          out[os.path.relpath(path, workdir)] = hashlib.sha1(f.read()).hexdigest()
  return out


def _warnings(caplog) -> str:
  return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def _assert_error(pattern: str, out) -> None:
  """The CLI failed with exactly one `error:` line matching `pattern`."""
  assert out.returncode != 0
  assert re.fullmatch(pattern, _error_line(out.stderr)), out.stderr[-3000:]


def _error_line(stderr: str) -> str:
  assert "Traceback" not in stderr, stderr[-3000:]
  return stderr.strip().splitlines()[-1]


def _cli(config_path, workdir, cwd=configs.REPO, timeout=600):
  return subprocess.run(
    [sys.executable, "-m", "vdit.main", f"--config={config_path}", f"--workdir={workdir}"],
    capture_output=True,
    text=True,
    cwd=cwd,
    env={**os.environ, "PYTHONPATH": configs.REPO},
    timeout=timeout,
  )


# ---------------------------------------------------------------------------------------------
# A damaged latest checkpoint: fall back to the newest intact one, with a warning.
# ---------------------------------------------------------------------------------------------
def _state_files(step_dir):
  return sorted(p for p in (step_dir / "state").rglob("*") if p.is_file())


def _zero(step_dir):
  for p in _state_files(step_dir):
    p.write_bytes(bytes(p.stat().st_size))


def _truncate(step_dir):
  for p in _state_files(step_dir):
    os.truncate(p, p.stat().st_size // 2)


def _delete_state_files(step_dir):
  for p in _state_files(step_dir):
    p.unlink()


def _delete_data(step_dir):
  for p in (step_dir / "data").glob("*.json"):
    p.unlink()


def _garbage_data(step_dir):
  for p in (step_dir / "data").glob("*.json"):
    p.write_text("garbage {")


def _empty(step_dir):
  for p in step_dir.iterdir():
    shutil.rmtree(p) if p.is_dir() else p.unlink()


def _bit_rot(step_dir):
  """64 KiB of random bytes written over the start of the largest state file."""
  largest = max(_state_files(step_dir), key=lambda p: p.stat().st_size)
  with open(largest, "r+b") as f:
    f.write(np.random.default_rng(0).bytes(64 * 1024))


def _state_of_step_2(step_dir):
  """Step 2's (intact, finite) state files under step 4's name: restores without an error."""
  shutil.rmtree(step_dir / "state")
  shutil.copytree(step_dir.parent / "2" / "state", step_dir / "state")


def _nan_values(step_dir):
  """A readable state with NaNs in one array (what bit rot restored before, and what older
  vdit versions saved after `optimizer.lr=nan`), written by orbax itself."""
  abstract = _abstract(_config(None))
  checkpointer = ocp.StandardCheckpointer()
  state = checkpointer.restore(step_dir / "state", abstract)
  name = "kernel"
  params = jax.tree_util.tree_map_with_path(
    lambda path, x: x * jnp.nan if name in jax.tree_util.keystr(path) else x, state.params
  )
  scratch = step_dir.parent.parent / "scratch_state"
  checkpointer.save(scratch, state.replace(params=params))
  checkpointer.wait_until_finished()
  checkpointer.close()
  shutil.rmtree(step_dir / "state")
  shutil.move(scratch, step_dir / "state")


RESTORE_FAILED = r"the (state|data position) does not restore \(\w+: [^\n]+\)"
DAMAGES = {  # how → what the warning gives as the reason
  "zeroed state files": (_zero, RESTORE_FAILED),
  "truncated state files": (_truncate, RESTORE_FAILED),
  "deleted state files": (_delete_state_files, RESTORE_FAILED),
  "deleted data/*.json": (_delete_data, r"it has no data iterator position \(no data/\S+\)"),
  "garbage data/*.json": (_garbage_data, RESTORE_FAILED),
  "emptied step dir": (_empty, r"it has no data iterator position \(no data/\S+\)"),
  "64 KiB of random bytes": (_bit_rot, RESTORE_FAILED),
  "another step's state": (
    _state_of_step_2,
    r"\d+ of \d+ state arrays differ from their save-time checksum \(\.\S+, \.\S+, \.\S+ and "
    r"\d+ more\)",
  ),
  "NaN values": (_nan_values, r"non-finite values in \.params\[\S+\]\['kernel'\], [^\n]+"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_latest_checkpoint_falls_back_with_a_warning(damage, workdir, data_dir, caplog):
  """Checkpoint 4 damaged: the restore (state and data position) skips it for checkpoint 2,
  warns naming step 4 and why, and (as the trainer asks) moves it to damaged_checkpoints/."""
  how, reason = DAMAGES[damage]
  how(workdir / "checkpoints" / "4")
  config = _config(data_dir)
  data_iterator = train.make_data_iterator(config)
  with caplog.at_level(logging.WARNING):
    step, state = _restore(workdir, config, data_iterator, move_damaged=True)
  assert step == 2 and int(state.step) == 2
  warnings = _warnings(caplog)
  assert re.search(rf"checkpoint 4 in \S+ is damaged: ({reason})", warnings), warnings
  assert re.search(
    rf"resuming from checkpoint 2, the newest intact one in \S+; skipped damaged checkpoint 4 "
    rf"\(({reason})\) \(moved to \S+damaged_checkpoints\)$",
    warnings,
    re.M,
  ), warnings
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
  assert os.listdir(workdir / checkpointing.DAMAGED_DIR) == ["4"]
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(jax.device_get(state)))


def test_nan_state_resumes_from_the_intact_checkpoint_and_saves_only_good_states(
  workdir, trained, data_dir, caplog, capsys
):
  """NaNs in checkpoint 4 (what 64 KiB of random bytes once restored silently, then saved on):
  the trainer resumes from 2, trains to 4 again and saves it; with max_checkpoints=1 rotation
  then deletes 2, and the one checkpoint left is verified and equal to the undamaged run's 4."""
  _nan_values(workdir / "checkpoints" / "4")
  config = _config(data_dir, max_checkpoints=1)  # a change a resume may make
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(config, str(workdir))
  assert "resumed from checkpoint at step 2" in capsys.readouterr().out
  assert re.search(
    r"skipped damaged checkpoint 4 \(non-finite values in \.params\S+, .+\) \(moved to ",
    _warnings(caplog),
  ), _warnings(caplog)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4"]
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    step, state = _restore(workdir, config)  # verified: raises if anything is off
  assert step == 4 and "damaged" not in _warnings(caplog)
  _, expected = _restore(trained, config)
  for a, b in zip(
    jax.tree_util.tree_leaves(jax.device_get(state)),
    jax.tree_util.tree_leaves(jax.device_get(expected)),
    strict=True,
  ):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_no_intact_checkpoint_is_one_error_and_writes_nothing(workdir, data_dir, tmp_path):
  """Both checkpoints damaged: the CLI exits ≠ 0 with one line naming the steps tried and why,
  and the workdir is left exactly as it was (no config, events, checkpoint or move)."""
  _zero(workdir / "checkpoints" / "4")
  _garbage_data(workdir / "checkpoints" / "2")
  before = _snapshot(workdir)
  out = _cli(configs.config_file(tmp_path, _config(data_dir)), workdir)
  _assert_error(
    rf"error: no intact checkpoint in {re.escape(str(workdir))}/checkpoints: tried steps 4, 2 — "
    rf"4: {RESTORE_FAILED}; 2: {RESTORE_FAILED}\. Nothing was written; restore the checkpoints "
    r"from a backup or train in a new --workdir",
    out,
  )
  assert _snapshot(workdir) == before


def test_an_explicit_step_that_is_damaged_is_an_error(workdir, data_dir):
  """Asking for one step (as sampling and evaluation may) never falls back to another."""
  _truncate(workdir / "checkpoints" / "4")
  with pytest.raises(checkpointing.DamagedCheckpointError, match=r"checkpoint 4 in .+ is damaged"):
    _restore(workdir, _config(data_dir), step=4)


def test_a_nonfinite_state_is_never_saved(workdir, data_dir):
  """A state with NaNs is refused at save time; the checkpoints already there stay."""
  config = _config(data_dir)
  mngr = checkpointing.manager(str(workdir), max_to_keep=1)
  try:
    _, state = checkpointing.restore(mngr, _abstract(config), None)
    bad = state.replace(params=jax.tree_util.tree_map(lambda x: x * jnp.nan, state.params))
    with pytest.raises(FloatingPointError, match=r"not saving checkpoint 6: non-finite values in"):
      checkpointing.save(mngr, 6, bad, None, config, force=True)
  finally:
    mngr.wait_until_finished()
    mngr.close()
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]


def test_checksum_is_the_same_on_another_mesh(trained, data_dir):
  """Saved on (data 8), verified when restored resharded on (fsdp 2, sequence 2, tensor 2)."""
  config = _config(data_dir)
  mngr = checkpointing.manager(str(trained))
  try:
    mesh = dict(data=1, fsdp=2, sequence=2, tensor=2)
    step, state = checkpointing.restore(mngr, _abstract(config, mesh), None)
  finally:
    mngr.close()
  assert step == 4
  specs = {str(x.sharding.spec) for x in jax.tree_util.tree_leaves(state.params)}
  assert any("fsdp" in s or "tensor" in s for s in specs), specs


def test_a_checkpoint_without_checksum_restores_with_a_warning(workdir, data_dir, caplog):
  """Checkpoints written before checksums existed still restore (checked for finiteness)."""
  shutil.rmtree(workdir / "checkpoints" / "4" / checkpointing.CHECKSUM)
  with caplog.at_level(logging.WARNING):
    step, _ = _restore(workdir, _config(data_dir))
  assert step == 4
  assert "checkpoint 4 has no checksum item" in _warnings(caplog)


# ---------------------------------------------------------------------------------------------
# Two trainers on one workdir; an empty --workdir.
# ---------------------------------------------------------------------------------------------
HOLD_LOCK = """
import sys, time
from vdit import workdir_guard
with workdir_guard.workdir_lock(sys.argv[1]):
  print("locked", flush=True)
  time.sleep(600)
"""


def test_second_trainer_on_a_workdir_is_refused(workdir, data_dir, tmp_path):
  """While another process holds the workdir, `python -m vdit.main` there exits ≠ 0 naming the
  workdir and the holder, and writes nothing; once the holder is killed (-9) the lock is free."""
  holder = subprocess.Popen(
    [sys.executable, "-c", HOLD_LOCK, str(workdir)],
    cwd=configs.REPO,
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    before = _snapshot(workdir)
    out = _cli(configs.config_file(tmp_path, _config(data_dir)), workdir)
  finally:
    holder.kill()  # SIGKILL: no cleanup runs in the holder
    holder.wait()
  _assert_error(
    rf"error: workdir '{re.escape(str(workdir))}' is in use by another training run \(pid "
    rf"{holder.pid} on host {re.escape(socket.gethostname())}, since [\d: -]+\); wait for it to "
    r"finish or use another --workdir \(the lock \S+vdit.lock is released when that process "
    r"exits\)",
    out,
  )
  assert _snapshot(workdir) == before
  with workdir_guard.workdir_lock(str(workdir)):  # released by the killed process's exit
    with pytest.raises(workdir_guard.WorkdirLockedError, match=rf"pid {os.getpid()} on host"):
      with workdir_guard.workdir_lock(str(workdir)):  # a second holder in this process
        pass


def test_empty_workdir_is_refused_before_any_compute(tmp_path, data_dir):
  """`--workdir=` is one error line, and nothing is written to the current directory."""
  config = os.path.join(configs.REPO, "configs/vdit/shapes.py") + ":tiny"
  out = _cli(config, "", cwd=tmp_path)
  assert out.returncode != 0
  assert _error_line(out.stderr) == (
    "error: --workdir is empty (''): pass the directory for checkpoints, logs and samples, "
    "e.g. --workdir=runs/shapes"
  )
  assert os.listdir(tmp_path) == []
  with pytest.raises(checkpointing.WorkdirError, match=r"--workdir is empty \(' '\)"):
    train.train_and_evaluate(_config(data_dir), " ")


# ---------------------------------------------------------------------------------------------
# Resuming with a changed config.
# ---------------------------------------------------------------------------------------------
def test_resume_with_a_changed_config_names_every_key(workdir, data_dir):
  """Keys that must match the checkpoint are all named (saved → now) before anything is
  restored or written; keys that are safe to change are not; `allow` lets a change through."""
  changed = {
    "model.width": 64,
    "seed": 1,
    "input.rows_per_batch": 4,
    "diffusion.objective": "gaussian",
    "optimizer.lr": 0.01,
  }
  safe = {
    "total_steps": 8,
    "log_every_steps": 5,
    "checkpoint_every_steps": 4,
    "max_checkpoints": 1,
    "sample.steps": 3,
    "input.data_dir": data_dir + "/",
    "input.read_threads": 1,
    "input.prefetch_batches": 0,
    "mesh": dict(data=1, fsdp=2, sequence=2, tensor=2),
  }
  config = _config(data_dir, **changed, **safe)
  before = _snapshot(workdir)
  with pytest.raises(workdir_guard.ConfigChangedError) as e:
    train.train_and_evaluate(config, str(workdir))
  message = str(e.value)
  assert message == (
    f"workdir '{workdir}' holds checkpoints of another config; these keys differ (saved → now): "
    'diffusion.objective: "rectified_flow" → "gaussian", input.rows_per_batch: 8 → 4, '
    "model.width: 32 → 64, optimizer.lr: 0.002 → 0.01, seed: 0 → 1. Resume with the saved "
    "values, train in a new --workdir, or pass --allow_config_change=diffusion.objective,"
    "input.rows_per_batch,model.width,optimizer.lr,seed if the change is intended"
  )
  assert _snapshot(workdir) == before
  # Without config.json, the newest checkpoint's own config is compared.
  (workdir / checkpointing.CONFIG_FILE).unlink()
  with pytest.raises(workdir_guard.ConfigChangedError, match="model.width: 32 → 64"):
    workdir_guard.check_config_unchanged(str(workdir), config)
  workdir_guard.check_config_unchanged(str(workdir), config, allow=[*changed])
  workdir_guard.check_config_unchanged(str(workdir), _config(data_dir, **safe))
  # A key the saved config lacks (added to vdit since) is reported, not refused; a key that was
  # there and is now gone is refused.
  saved_config = checkpointing.config_to_dict(_config(data_dir))
  del saved_config["model"]["locality"]
  saved_config["model"]["retired_option"] = 1
  (workdir / checkpointing.CONFIG_FILE).write_text(json.dumps(saved_config))
  with pytest.raises(workdir_guard.ConfigChangedError) as e:
    workdir_guard.check_config_unchanged(str(workdir), _config(data_dir))
  assert "model.retired_option: 1 → (absent)" in str(e.value) and "locality" not in str(e.value)
  # A key vdit removed (`workdir_guard.REMOVED_KEYS`) resumes when saved with the value that meant
  # what vdit does now, and is refused with any other.
  for packer, refused in (("best_fit", False), ("first_fit", True)):
    saved_config = checkpointing.config_to_dict(_config(data_dir))
    saved_config["input"]["packing"] = packer
    (workdir / checkpointing.CONFIG_FILE).write_text(json.dumps(saved_config))
    if refused:
      with pytest.raises(workdir_guard.ConfigChangedError, match='input.packing: "first_fit" → '):
        workdir_guard.check_config_unchanged(str(workdir), _config(data_dir))
    else:
      workdir_guard.check_config_unchanged(str(workdir), _config(data_dir))
