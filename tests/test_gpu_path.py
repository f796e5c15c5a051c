"""The GPU path compiled for 8 x H100 without a GPU (docs/compile_only.md): configs/small.py's train step with EP8,
BF16 and FP8 (batch 8 x 1024), read from the scheduled HLO (dsv3.bench.hlo_gemms).

BF16: the expert GEMMs (forward and both gradients) are tokamax's grouped kernels, not XLA's ragged_dot (a
dense dot over every local expert), multiplying with BF16 wgmma. FP8: every GEMM of every FP8 linear and
expert is one of dsv3.kernels.fp8_triton's kernels, reading E4M3 operands and multiplying with E4M3 wgmma.
Needs the compile-only toolchain (pip install -e ".[aot]"); skipped elsewhere.
"""
import collections
import re

import pytest

import hlo

from configs import small
from dsv3.analysis import compile_only
from dsv3.bench import hlo_gemms

pytestmark = pytest.mark.skipif(not hlo.gpu_toolchain(),
                                reason="needs the compile-only GPU toolchain (requirements-aot.txt)")


def _small_ep8(precision):
  c = small.get_config()
  c.precision = precision
  c.mesh.data, c.mesh.expert = 1, 8
  c.batch_size, c.seq_len = 8, 1024      # the same programs as batch 32; smaller buffers
  return c


def _train_step(precision, tmp_path_factory) -> str:
  workdir = tmp_path_factory.mktemp(precision)
  compile_only.run(_small_ep8(precision), str(workdir), "h100")
  with open(workdir / "compiled" / "train_step.hlo.txt") as f:
    return f.read()


def _gemms(precision, tmp_path_factory):
  return hlo_gemms.gemms(_train_step(precision, tmp_path_factory))


@pytest.fixture(scope="module")
def bf16_step(tmp_path_factory):
  return _train_step("bf16", tmp_path_factory)


@pytest.fixture(scope="module")
def bf16_gemms(bf16_step):
  return hlo_gemms.gemms(bf16_step)


def test_attention_is_a_flash_kernel_without_a_device(bf16_step):
  """attention='auto' compiled deviceless (cuDNN cannot be): MLA's attention forward and backward are tokamax's
  Triton flash-attention kernels, and no blockwise loop is left in the step."""
  kernels = set(re.findall(r"pallas_flash_attention_(\w+?)\)?/pallas_call", bf16_step))
  assert any(k.startswith("fwd") for k in kernels) and "vjp" in kernels, kernels
  assert "blockwise" not in bf16_step


@pytest.fixture(scope="module")
def fp8_gemms(tmp_path_factory):
  return _gemms("fp8", tmp_path_factory)


def _kernel(row):
  return row["kind"] in ("mosaic_kernel", "triton_kernel") or row["target"].startswith("triton_kernel")


def test_bf16_expert_gemms_are_tokamax_kernels(bf16_gemms):
  rows = bf16_gemms
  experts = [r for r in rows if "ragged" in r["op_name"]]
  kinds = collections.Counter(re.search(r"(ragged_\w+?)_sm90|$", r["op_name"]).group(1) for r in experts)
  # Forward and input gradient (ragged_dot) and weight gradient (ragged contraction), all in kernels.
  assert kinds["ragged_dot"] >= 6 and kinds["ragged_contracting_dim_dot"] >= 3, kinds
  assert all(_kernel(r) for r in experts), [r for r in experts if not _kernel(r)][:2]
  # Their code multiplies on Hopper's tensor cores (wgmma, BF16 in, FP32 accumulate).
  assert all(any(m.endswith(".f32.bf16.bf16") for m in r["mma"]) for r in experts), experts[0]["mma"]
  assert not [r for r in rows if r["kind"] in ("ragged-dot", "dot") and "ragged" in r["op_name"]]


# What DeepSeek-V3 keeps out of FP8 (report section 3.3): attention's core (the flash kernel, or the blockwise
# loops), the output head and the router.
_WIDE_BY_DESIGN = re.compile(r"self_attn/.*(while/body/|pallas_flash_attention)|head/|/mlp/(dot_general|transpose)$")


def test_fp8_gemms_run_on_fp8_tensor_cores(fp8_gemms):
  rows = fp8_gemms
  fp8_rows = [r for r in rows if hlo_gemms.is_fp8(r)]
  wide = [r for r in rows if not hlo_gemms.is_fp8(r)]
  assert all(_kernel(r) for r in fp8_rows)
  # E4M3 x E4M3 wgmma with FP32 accumulation in every one of them (their PTX, targeted at sm_90a).
  assert all(hlo_gemms.fp8_tensor_cores(r) for r in fp8_rows), [r["mma"] for r in fp8_rows][:2]
  assert not [r for r in wide if not _WIDE_BY_DESIGN.search(r["op_name"])], \
      [r["op_name"] for r in wide if not _WIDE_BY_DESIGN.search(r["op_name"])][:3]
  # Every linear and the experts: forward, input and weight gradient, each one FP8 kernel launch.
  for name in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
               "down_proj", "eh_proj", "mlp/shard_map"):
    assert sum(name in r["op_name"] for r in fp8_rows) >= 3, name
  assert len(fp8_rows) >= 90
