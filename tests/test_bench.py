"""dsv3.bench: simulated CPU devices come from one helper, and the caller's own device count wins."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = ("from dsv3.bench import common; common.use_cpu_devices(8); import jax; "
         "print(jax.default_backend(), jax.device_count())")


@pytest.mark.parametrize("xla_flags, expected", [("", "cpu 8"),
                                                 ("--xla_force_host_platform_device_count=2", "cpu 2")])
def test_use_cpu_devices(xla_flags, expected):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_NUM_CPU_DEVICES")}
  env["XLA_FLAGS"] = xla_flags
  out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
  assert out.stdout.split("\n")[-2] == expected
