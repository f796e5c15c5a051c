"""Installing dsv3: pyproject.toml is the one list of dependencies (requirements*.txt are aliases of it), its
package carries every subpackage and the GPU target specs, and the compile-only GPU toolchain check names
what a venv lacks and the one command that installs it (the extra that lists it)."""
import glob
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from dsv3.analysis import compile_only

tomllib = pytest.importorskip("tomllib")   # Python >= 3.11

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLCHAIN = {"jaxlib": "0.12.0.1", "jax-cuda12-pjrt": "0.12.0.1", "jax-cuda12-plugin": "0.12.0.1",
             "nvidia-cuda-nvcc": "13.4.92"}


def pyproject():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def requirement_names(requirements):
  return {re.match(r"[A-Za-z0-9_.\-]+", r).group(0).lower().replace("_", "-") for r in requirements}


def test_requirement_files_only_point_at_pyproject():
  lines = {}
  for path in glob.glob(os.path.join(ROOT, "requirements*.txt")) + glob.glob(os.path.join(ROOT, "*", "requirements*.txt")):
    with open(path) as f:
      lines[os.path.relpath(path, ROOT)] = [l.strip() for l in f if l.strip() and not l.startswith("#")]
  assert lines == {"requirements.txt": ["-e ."], "requirements-aot.txt": ["-e .[aot]"]}


def test_extras_are_the_test_gpu_and_aot_lists():
  extras = pyproject()["project"]["optional-dependencies"]
  assert {"torch", "transformers", "pytest", "pytest-xdist", "nbclient", "jupytext", "ruff"} <= requirement_names(
      extras["test"])
  assert requirement_names(extras["gpu"]) == {"tokamax"}
  assert "dsv3[gpu]" in extras["aot"]          # the toolchain compiles tokamax's kernels too


def test_wheel_carries_every_subpackage_and_the_gpu_specs(tmp_path):
  """A non-editable build (what `pip install .` installs): every folder of dsv3 that holds modules, and every
  GpuTargetConfigProto text, wherever it lies under dsv3/."""
  pytest.importorskip("setuptools")
  src = tmp_path / "src"
  shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".*", "__pycache__", "*.egg-info", "tests", "colabs",
                                                           "build"))
  build = "import sys; from setuptools import build_meta; build_meta.build_wheel(sys.argv[1])"
  proc = subprocess.run([sys.executable, "-c", build, str(tmp_path / "dist")], cwd=src, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  [wheel] = glob.glob(str(tmp_path / "dist" / "dsv3-*.whl"))
  shipped = set(zipfile.ZipFile(wheel).namelist())
  modules = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "dsv3", "**", "*.py"), recursive=True)}
  specs = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "dsv3", "**", "*.txtpb"), recursive=True)}
  assert specs and not (modules | specs) - shipped


def fake_installed(monkeypatch, versions):
  def version(dist):
    if dist in versions:
      return versions[dist]
    raise importlib.metadata.PackageNotFoundError(dist)
  monkeypatch.setattr(importlib.metadata, "version", version)


def toolchain_error(target="h100"):
  with pytest.raises(compile_only.CompileOnlyError) as e:
    compile_only.check_toolchain(target)
  message = str(e.value)
  assert "\n" not in message and 'pip install -e ".[aot]"' in message
  return message.split(": ")[0]           # what it lacks, before the install hint


def test_toolchain_without_the_cuda_plugin_names_it(monkeypatch):
  # The bad input: jax 0.12 and XLA's CUDA compiler (jax-cuda12-pjrt) without jax-cuda12-plugin, whose kernel
  # lowerings the compile needs (else: "Failed to lookup host symbol: ragged_dot_sm90_mosaic_gpu" deep in XLA).
  fake_installed(monkeypatch, {k: v for k, v in TOOLCHAIN.items() if k != "jax-cuda12-plugin"})
  lacks = toolchain_error()
  assert "jax-cuda12-plugin" in lacks and "pjrt" not in lacks and "nvcc" not in lacks


def test_toolchain_names_a_plugin_of_another_jax_version(monkeypatch):
  fake_installed(monkeypatch, dict(TOOLCHAIN, **{"jax-cuda12-plugin": "0.11.2"}))
  assert "jax-cuda12-plugin==0.12.0.1" in toolchain_error("h200")


def test_toolchain_on_an_older_jax_asks_for_jax_0_12(monkeypatch):
  fake_installed(monkeypatch, {"jaxlib": "0.10.2"})
  assert "jax 0.12" in toolchain_error("h800")


def test_whole_toolchain_passes_and_cpu_needs_none(monkeypatch):
  fake_installed(monkeypatch, TOOLCHAIN)
  compile_only.check_toolchain("h100")
  fake_installed(monkeypatch, {})
  compile_only.check_toolchain("cpu")


def test_the_named_command_installs_every_piece_the_check_asks_for():
  aot = pyproject()["project"]["optional-dependencies"]["aot"]
  assert {"jax", "jaxlib"} | {dist for dist, _ in compile_only.GPU_TOOLCHAIN} <= requirement_names(aot)
  # Plain names and pins only: no extra of jax-cuda12-plugin (its [with-cuda] brings the CUDA runtime wheels)
  # and no marker that would skip a piece.
  assert not [r for r in aot if "[" in r and not r.startswith("dsv3[") or ";" in r]
