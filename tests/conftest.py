"""Test setup: 8 simulated CPU devices (set before JAX is imported) and a shared data dir."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  """Where the tests build the bundled TFDS datasets: $VDIT_DATA_DIR if set (CI sets a fresh
  one), else a per-session temporary dir."""
  return os.environ.get("VDIT_DATA_DIR") or str(tmp_path_factory.mktemp("tfds"))
