"""dsv3.analysis.step_time: a compiled program's time on a target from its scheduled HLO, and a step's.

Hand-written scheduled modules check the cost model's arithmetic (a GEMM at the peak, a collective on its
link, an asynchronous one hidden by what its window holds, a loop's trip count); the dry run's estimate.json
is checked in test_compile_only (every layout it compiles) and here on a real compiled step.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from dsv3 import plan
from dsv3.analysis import chip_figures, hlo_cost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIG = chip_figures.Figures(target="test", flops={"bf16": 1e12, "fp8": 2e12, "fp32": 0.5e12}, hbm=1e12, nvlink=1e11,
                        ib=1e10, launch=1e-6, nvlink_latency=2e-6, ib_latency=5e-6, gpus_per_node=8, sources="test")

# A [4096, 4096] x [4096, 4096] bf16 GEMM: 137 GFLOP, 137 ms at 1 TFLOP/s; a 16 MiB all-to-all over 8 devices.
GEMM = """
%fused_dot (p0: bf16[4096,4096], p1: bf16[4096,4096]) -> bf16[4096,4096] {
  %p0 = bf16[4096,4096]{1,0} parameter(0)
  %p1 = bf16[4096,4096]{1,0} parameter(1)
  ROOT %dot.1 = bf16[4096,4096]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""
ENTRY_HEAD = """
ENTRY %main (a: bf16[4096,4096], x: bf16[8192,1024]) -> bf16[4096,4096] {
  %a = bf16[4096,4096]{1,0} parameter(0)
  %x = bf16[8192,1024]{1,0} parameter(1)
"""
GEMM_SECONDS = 2 * 4096 ** 3 / 1e12 + 1e-6
A2A_BYTES = 8192 * 1024 * 2


def _module(body: str, groups: str = "{{0,1,2,3,4,5,6,7}}", extra: str = "") -> str:
  return ("HloModule m, is_scheduled=true, num_partitions=8\n" + GEMM + extra + ENTRY_HEAD
          + body.replace("GROUPS", groups) + "}\n")


SYNC = _module("""
  %all-to-all.1 = bf16[8192,1024]{1,0} all-to-all(%x), channel_id=1, replica_groups=GROUPS, dimensions={0}
  ROOT %fusion.1 = bf16[4096,4096]{1,0} fusion(%a, %a), kind=kCustom, calls=%fused_dot
""")
ASYNC = _module("""
  %all-to-all-start.1 = ((bf16[8192,1024]{1,0}), bf16[8192,1024]{1,0}) all-to-all-start(%x), channel_id=1, replica_groups=GROUPS, dimensions={0}
  %fusion.1 = bf16[4096,4096]{1,0} fusion(%a, %a), kind=kCustom, calls=%fused_dot
  %all-to-all-done.1 = bf16[8192,1024]{1,0} all-to-all-done(%all-to-all-start.1)
  ROOT %copy.1 = bf16[4096,4096]{1,0} copy(%fusion.1)
""")


def test_a_gemm_costs_its_flops_at_the_peak_and_a_copy_its_bytes_at_hbm():
  t = hlo_cost.program_time(SYNC.replace("%all-to-all.1 = bf16[8192,1024]{1,0} all-to-all(%x), channel_id=1, "
                                          "replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}\n", ""), FIG)
  assert t.flops == 2 * 4096 ** 3 and t.collectives == 0
  assert t.seconds == pytest.approx(GEMM_SECONDS)
  copy_seconds = hlo_cost.program_time(ASYNC, FIG).compute - GEMM_SECONDS
  assert copy_seconds == pytest.approx(2 * 4096 * 4096 * 2 / 1e12 + 1e-6)   # read + write at HBM


def test_an_all_to_all_inside_a_node_runs_at_nvlink_and_across_nodes_at_infiniband():
  inside = hlo_cost.program_time(SYNC, FIG)
  assert inside.communication == pytest.approx(A2A_BYTES * 7 / 8 / 1e11 + 2e-6)
  assert inside.exposed == pytest.approx(inside.communication)          # synchronous: nothing hides it
  assert inside.seconds == pytest.approx(GEMM_SECONDS + inside.communication)
  # The same 8 devices as 4 nodes of 2: 1 of 8 peers on NVLink, 6 over InfiniBand.
  spread = hlo_cost.program_time(SYNC, dataclass_replace(FIG, gpus_per_node=2))
  assert spread.communication == pytest.approx(A2A_BYTES * 6 / 8 / 1e10 + 5e-6)


def dataclass_replace(fig, **kw):
  import dataclasses
  return dataclasses.replace(fig, **kw)


def test_an_asynchronous_collective_is_hidden_by_the_gemm_in_its_window():
  t = hlo_cost.program_time(ASYNC, FIG)
  assert t.communication < GEMM_SECONDS
  assert t.exposed == 0.0 and t.seconds == pytest.approx(t.compute)
  # Slow enough links: the done waits, and only the excess shows.
  slow = hlo_cost.program_time(ASYNC, dataclass_replace(FIG, nvlink=1e8))
  assert slow.exposed == pytest.approx(slow.communication - GEMM_SECONDS, rel=1e-6)
  assert slow.seconds == pytest.approx(slow.communication + 2 * 4096 * 4096 * 2 / 1e12 + 1e-6, rel=1e-6)


def test_iota_replica_groups():
  assert hlo_cost.replica_groups("replica_groups=[2,4]<=[8]", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert hlo_cost.replica_groups("replica_groups=[2,4]<=[4,2]T(1,0)", 8) == [[0, 2, 4, 6], [1, 3, 5, 7]]
  assert hlo_cost.replica_groups("replica_groups={{0,4},{1,5}}", 8) == [[0, 4], [1, 5]]
  assert hlo_cost.replica_groups("replica_groups={}", 8) == [list(range(8))]


def test_a_loop_costs_its_trip_count_times_its_body():
  body = _module("""
  %t = (s32[], bf16[4096,4096]) tuple(%x, %a)
  ROOT %while.1 = (s32[], bf16[4096,4096]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
""", extra="""
%body (p: (s32[], bf16[4096,4096])) -> (s32[], bf16[4096,4096]) {
  %p = (s32[], bf16[4096,4096]) parameter(0)
  %w = bf16[4096,4096]{1,0} get-tuple-element(%p), index=1
  %fusion.9 = bf16[4096,4096]{1,0} fusion(%w, %w), kind=kCustom, calls=%fused_dot
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %r = (s32[], bf16[4096,4096]) tuple(%i, %fusion.9)
}

%cond (p: (s32[], bf16[4096,4096])) -> pred[] {
  %p = (s32[], bf16[4096,4096]) parameter(0)
  ROOT %c = pred[] constant(true)
}
""")
  t = hlo_cost.program_time(body, FIG)
  assert t.flops == 5 * 2 * 4096 ** 3 and t.kernels == 5
  assert t.seconds == pytest.approx(5 * GEMM_SECONDS)


def test_a_target_without_figures_is_refused_naming_it_and_the_file():
  for target in ("a100", "cpu"):
    with pytest.raises(chip_figures.UnknownTargetError, match=f"'{target}'.*chip_figures.py.*metrics.py"):
      chip_figures.figures(target)
  assert chip_figures.figures("h800").nvlink < chip_figures.figures("h100").nvlink     # H800: the cut-down NVLink


def test_cli_refuses_an_unknown_target_in_one_line(tmp_path):
  compiled = tmp_path / "compiled"
  compiled.mkdir()
  (compiled / "memory.json").write_text(json.dumps({"target": "h100"}))
  proc = subprocess.run([sys.executable, "-m", "dsv3.analysis.step_time", str(tmp_path), "--target=b300"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and "'b300'" in proc.stderr and "chip_figures.py" in proc.stderr, proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
  assert sorted(os.listdir(compiled)) == ["memory.json"]      # nothing written


def test_the_cost_model_counts_the_models_flops():
  """The FLOPs the estimator reads off the tiny config's compiled step agree with dsv3.flops' count (the
  compiled step also runs the tiled grouped GEMM's padding rows and the router)."""
  from dsv3 import cli
  from dsv3.bench import common
  from dsv3.config import ModelConfig
  config = cli.load_config("tiny")
  config.batch_size, config.seq_len = 4, 64
  cfg = ModelConfig.from_config_dict(config)
  trainer = common.one_device_steps(config, cfg)
  args = common.train_args(config, trainer, jax.ShapeDtypeStruct((4, 65), jnp.int32))
  text = jax.jit(trainer.train).lower(*args).compile().as_text()
  counted = hlo_cost.program_time(text, FIG).flops
  expected = plan.plan(config)["flops_per_step"]
  assert 0.9 < counted / expected < 1.5, (counted, expected)


def test_a_ragged_all_to_all_moves_its_fill_of_the_buffer():
  """Expert buffers hold ep_buffer_factor x the balanced load: at fill 1/f the ragged exchange moves 1/f."""
  ragged = _module("""
  %ragged-all-to-all.1 = bf16[8192,1024]{1,0} ragged-all-to-all(%x, %x, %x, %x, %x, %x), channel_id=1, replica_groups=GROUPS
  ROOT %fusion.1 = bf16[4096,4096]{1,0} fusion(%a, %a), kind=kCustom, calls=%fused_dot
""")
  full, quarter = (hlo_cost.program_time(ragged, FIG, ragged_fill=f).communication for f in (1.0, 0.25))
  assert full == pytest.approx(A2A_BYTES * 7 / 8 / 1e11 + 2e-6)
  assert quarter == pytest.approx(A2A_BYTES / 4 * 7 / 8 / 1e11 + 2e-6)
  # the dense all-to-all moves its whole buffer whatever the fill
  assert hlo_cost.program_time(SYNC, FIG, ragged_fill=0.25).communication == pytest.approx(
      A2A_BYTES * 7 / 8 / 1e11 + 2e-6)


def test_the_latency_profile_names_every_kernel_and_collective_with_its_modelled_time():
  import re
  text = hlo_cost.latency_profile(ASYNC, FIG)
  costs = dict((n, float(c)) for n, c in re.findall(r'costs \{ name: "([^"]+)" cost_us: ([0-9.]+) \}', text))
  assert set(costs) == {"all-to-all-start.1", "fusion.1", "copy.1"}     # no parameter, no -done
  assert costs["fusion.1"] == pytest.approx(GEMM_SECONDS * 1e6, abs=1e-3)     # printed to 1 ns
  assert costs["all-to-all-start.1"] == pytest.approx((A2A_BYTES * 7 / 8 / 1e11 + 2e-6) * 1e6, abs=1e-3)


def test_a_layer_slice_of_a_stacked_buffer_moves_only_the_slice():
  """A scanned layer's fusion (or its asynchronous start) reading one layer of a stacked [L, ...] operand
  through a dynamic slice moves that layer, not the stack."""
  module = """HloModule m, is_scheduled=true
%fused_slice (p0: bf16[16,1024,1024], p1: s32[]) -> bf16[1,1024,1024] {
  %p0 = bf16[16,1024,1024]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %ds = bf16[1,1024,1024]{2,1,0} dynamic-slice(%p0, %p1, %z, %z), dynamic_slice_sizes={1,1024,1024}
}

ENTRY %main (w: bf16[16,1024,1024], i: s32[]) -> bf16[1,1024,1024] {
  %w = bf16[16,1024,1024]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %fusion-start.1 = ((bf16[16,1024,1024]{2,1,0}, s32[]), bf16[1,1024,1024]{2,1,0}, u32[]) fusion-start(%w, %i), kind=kLoop, calls=%fused_slice
  ROOT %fusion-done.1 = bf16[1,1024,1024]{2,1,0} fusion-done(%fusion-start.1)
}
"""
  layer = 1024 * 1024 * 2
  program = hlo_cost.Costed(module)
  assert program.moved(program.by_name["fusion-start.1"]) == (layer + 4, layer)      # + the s32 index
  assert hlo_cost.program_time(module, FIG).bytes == 2 * layer + 4


def test_cli_costs_a_dry_run_for_another_chip(tmp_path):
  """`python -m dsv3.analysis.step_time DIR --target=h800` as the README shows it: a dry run's programs
  (memory.json and the scheduled HLO) costed with another chip's figures, estimate.json written."""
  from configs import tiny
  settings = tiny.get_config()
  settings.mesh.expert = 8
  compiled = tmp_path / "compiled"
  compiled.mkdir()
  (compiled / "train_step.hlo.txt").write_text(SYNC)
  memory = dict(target="h100", devices=8, ranks=None, settings=settings.to_dict(),
                programs=[dict(program="train_step", kind="train", position="all 8 devices (SPMD)",
                               devices=list(range(8)), hlo="train_step.hlo.txt")])
  (compiled / "memory.json").write_text(json.dumps(memory))
  proc = subprocess.run([sys.executable, "-m", "dsv3.analysis.step_time", str(tmp_path), "--target=h800"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  est = json.loads((compiled / "estimate.json").read_text())
  h800 = chip_figures.figures("h800")
  assert est["target"] == "h800" and est["assumptions"]["figures"]["nvlink"] == h800.nvlink
  assert est["step_seconds"] == pytest.approx(hlo_cost.program_time(SYNC, h800).seconds)
  assert "step" in proc.stdout and "MFU" in proc.stdout
