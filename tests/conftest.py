"""Test set-up: 8 simulated CPU devices, float32 matmuls, and small shared fixtures.

XLA_FLAGS and JAX_PLATFORMS must be set before JAX initialises its backends, so this runs at import time.

Two modes:
- the default run is CPU-only and deterministic (JAX_PLATFORMS=cpu, even on a machine with a GPU); the tests
  marked `gpu` are skipped, saying how to run them;
- the GPU run, `DSV3_TEST_GPU=1 python -m pytest -m gpu` (or any run whose `-m` selects gpu tests, e.g.
  `python -m pytest -m gpu`), leaves JAX_PLATFORMS alone so JAX finds the GPU (the CPU stays available for
  references), runs the `gpu` tests, and skips the CPU tests (they want the 8 simulated CPU devices).
"""
import os
import sys

GPU_ENV = "DSV3_TEST_GPU"


def _selects_gpu(argv) -> bool:
  """Whether the command line's last `-m EXPR` names gpu and selects a test marked only `gpu` ('-m gpu')."""
  expr, args = None, iter(argv)
  for a in args:
    if a.startswith("-m"):
      expr = a[2:] or next(args, "")
  if not expr or "gpu" not in expr:
    return False
  try:
    from _pytest.mark.expression import Expression
    return bool(Expression.compile(expr).evaluate(lambda name, **_: name == "gpu"))
  except Exception:  # pylint: disable=broad-except  (an old pytest, or a bad expression pytest will report)
    return False


if _selects_gpu(sys.argv[1:]):
  os.environ[GPU_ENV] = "1"             # also tells pytest-xdist's workers, which inherit the environment
GPU_RUN = os.environ.get(GPU_ENV) == "1"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
if not GPU_RUN:
  os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import pytest  # noqa: E402

import tiny_model  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long end-to-end run, left out by default (pytest.ini); run with -m slow")
  config.addinivalue_line("markers", "gpu: needs a CUDA GPU; run with `python -m pytest -m gpu` (or "
                                     "DSV3_TEST_GPU=1), skipped otherwise")


def pytest_collection_modifyitems(config, items):
  if GPU_RUN:
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    skip_gpu = None if gpus else pytest.mark.skip(
        reason=f"{GPU_ENV}=1 but JAX finds no GPU (platforms: {sorted({d.platform for d in jax.devices()})}, "
               f"JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')!r}): it needs a CUDA jaxlib, "
               f"pip install 'jax[cuda12]'")
    skip_cpu = pytest.mark.skip(reason=f"a CPU test, left out of the GPU run ({GPU_ENV}=1): run it without")
  else:
    skip_gpu = pytest.mark.skip(reason=f"needs a GPU: `{GPU_ENV}=1 python -m pytest -m gpu` on a machine with one "
                                       f"(the default run is CPU-only: JAX_PLATFORMS=cpu)")
    skip_cpu = None
  for item in items:
    skip = skip_gpu if "gpu" in item.keywords else skip_cpu
    if skip is not None:
      item.add_marker(skip)


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
