"""Test setup: 8 simulated CPU devices (set before JAX is imported), one XLA compilation cache
for the whole run, and a shared data dir."""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# JAX's persistent compilation cache, one directory for the run: the pytest process makes it
# before xdist starts its workers, and they and every subprocess a test starts (`vdit.main`,
# the notebooks, the hosts of the multi-host tests) inherit the environment. Many tests train,
# resume and sample the same tiny configs, so a program compiled once is loaded, not compiled,
# the next time. Results are the same: the cache key is the program and the compile options.
# A directory the user set is used as it is and kept.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vdit-tests-xla-cache-")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
  """Modules with a `slow` test run first, each module's tests kept together and in order (its
  module fixtures are built once per worker): under `-n 2` the long tests start early and the
  short ones fill the end, rather than one long test running alone after the rest."""
  slow = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow)  # stable: order kept


def pytest_sessionfinish(session):
  # The process that made the cache removes it (xdist workers inherit it and leave it).
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  """Where the tests build the bundled TFDS datasets: $VDIT_DATA_DIR if set (CI sets a fresh
  one), else a per-session temporary dir."""
  return os.environ.get("VDIT_DATA_DIR") or str(tmp_path_factory.mktemp("tfds"))
