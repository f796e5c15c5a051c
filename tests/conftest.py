"""Test set-up: 8 simulated CPU devices, float32 matmuls, and small shared fixtures.

XLA_FLAGS must be set before JAX initialises its backends, so this runs at import time.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

import tiny_model  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long end-to-end run, left out by default (pytest.ini); run with -m slow")
  config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped on CPU-only machines")


def pytest_collection_modifyitems(config, items):
  import pytest
  has_gpu = any(d.platform == "gpu" for d in jax.devices()) if os.environ.get("JAX_PLATFORMS") != "cpu" else False
  skip_gpu = pytest.mark.skip(reason="needs a GPU")
  for item in items:
    if "gpu" in item.keywords and not has_gpu:
      item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_cfg():
  """The shared tiny model (tests/tiny_model.py); tests needing other sizes call tiny_cfg.replace(...)."""
  return tiny_model.config()


@pytest.fixture(scope="session")
def make_mesh():
  """make_mesh(data=1, expert=1, pipeline=1): dsv3's ('pipeline', 'data', 'expert') mesh on the 8 devices."""
  return tiny_model.mesh


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Frees each module's compiled executables and cached buffers when it ends: the suite compiles
  hundreds of programs in one process, and keeping them all grows memory until XLA aborts."""
  yield
  import gc
  jax.clear_caches()
  gc.collect()
