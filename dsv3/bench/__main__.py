"""Benchmarks that print tables (not timed tests): throughput and MFU, dsv3 vs HF transformers, MoE cost growth,
sequence length, compile time vs depth, and memory vs the planner.

  python -m dsv3.bench                                   # every section, sized for a 2-core CPU (~2 min each)
  python -m dsv3.bench --what=train,hf --small           # also the small config (GPU; slow on CPU)
  python -m dsv3.bench --what=moe --fast                 # smaller sizes, for smoke runs
  python -m dsv3.bench gpu [--smoke]                     # one lent GPU: kernel checks, GEMM TFLOP/s, train step

Sections (--what, comma-separated; dsv3/bench/step.py unless named):
  train    tokens/s and MFU of the trainer's step (dsv3.training.steps: forward + backward with MTP and the balance
           loss, AdamW, the routing-bias update and the divergence guard) for configs/tiny.py (and
           configs/small.py with --small) on the current backend. MFU = tokens/s x
           dsv3.plan.flops_per_token(include_mtp) / peak; the peak is the GPU's datasheet figure or, on CPU, a
           measured float32 matmul (dsv3.training.metrics.device_peak_flops).
  hf       (dsv3/bench/hf.py) the same configs and weights in HF transformers (PyTorch, CPU): dsv3.hf.save_checkpoint,
           then AutoModelForCausalLM.from_pretrained. Both run forward + backward + AdamW (lr 1e-4, betas
           0.9/0.95, weight decay 0.1, no clipping) of the main model's next-token loss at the same batch,
           sequence length and float32, torch at its default thread count, for the tiny config and a
           16M-parameter MoE (hf_comparison_configs; --hf_configs picks): per-phase ms (forward, backward,
           optimizer), tokens/s, the ratio, and one MoE block's forward + backward on both sides.
  profile  (dsv3/bench/hf.py) where the step's time goes (dsv3.bench.step_profile): the hf configs' dsv3 step traced
           with jax.profiler, exclusive op time by op class (GEMM, gather, scatter, layout copy, ...) and by
           phase and model part, with the GEMMs' achieved GFLOP/s.
  moe      one MoE layer (forward + backward) at fixed active parameters (hidden 128, 4 active experts of
           intermediate 64) with 8, 16, 64, 256 routed experts: the dropless grouped GEMM (jax.lax.ragged_dot)
           against a dense one-hot dispatch baseline that runs every expert on every token and masks by the
           routing weights. The grouped path's cost should stay nearly flat; the baseline grows with E.
  seq      tokens/s of the tiny training step for sequence lengths 128 .. 4096 (--fast: .. 1024) at a fixed
           number of tokens per step (2048, or --tokens).
  compile  lowering and compile time of the tiny training step with 2, 4, 8, 16 layers, scanned (nn.scan keeps
           it flat) and unrolled (model.scan_layers=False).
  estimate the step-time estimator (dsv3.analysis.step_time) given this CPU's measured GEMM FLOP/s, memory
           bandwidth and per-kernel cost, beside the measured step of the tiny and 16M configs (its calibration):
           --rounds times the figures are measured again and each step timed, side by side.
  memory   peak bytes per device of the compiled training step (compiled.memory_analysis(): arguments +
           outputs - donated aliases + temporaries) next to the planner's params + grads + optimizer estimate.
"""
from __future__ import annotations

import sys
import time

from absl import flags

from dsv3 import cli
from dsv3.bench import common, gpu, hf, step

SECTIONS = {"train": step.bench_train, "hf": hf.hf, "profile": hf.profile, "moe": step.bench_moe,
            "seq": step.bench_seq, "compile": step.bench_compile, "memory": step.bench_memory, "estimate": step.bench_estimate}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """`python -m dsv3.bench`'s flags (`python -m dsv3.bench gpu` has dsv3.bench.gpu's instead)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_list("what", list(SECTIONS), f"Comma-separated subset of {','.join(SECTIONS)}.", **fv)
  flags.DEFINE_bool("small", False, "Also configs/small.py (train, memory).", **fv)
  flags.DEFINE_bool("fast", False, "Smaller sizes for smoke runs.", **fv)
  flags.DEFINE_integer("steps", None, "Timed steps per measurement (default 5, --fast 2).", **fv)
  flags.DEFINE_integer("batch", None, "train/hf batch (default 16 / each hf config's own).", **fv)
  flags.DEFINE_integer("seq", None, "train/hf sequence length (default 128 / each hf config's).", **fv)
  flags.DEFINE_integer("tokens", None, "moe: tokens per layer call; seq: tokens per step.", **fv)
  flags.DEFINE_integer("rounds", 3, "estimate: rounds of (measure the CPU's figures, time each step).", **fv)
  flags.DEFINE_integer("top", 15, "profile: how many of the slowest ops to list.", **fv)
  flags.DEFINE_list("hf_configs", None, "hf: comma-separated subset of tiny,16m (default both).", **fv)


def main(argv):
  if argv[1:]:
    raise cli.UsageError(f"unexpected argument(s) {argv[1:]}; the only subcommand is `gpu` "
                         f"(python -m dsv3.bench gpu [--smoke])")
  what = [w.strip() for w in flags.FLAGS.what if w.strip()]
  unknown = sorted(set(what) - set(SECTIONS))
  if unknown:
    raise cli.UsageError(f"--what: unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
  args = common.flag_args(define_flags)
  args.steps = args.steps or (2 if args.fast else 5)
  for w in what:
    t0 = time.perf_counter()
    SECTIONS[w](args)
    print(f"({w}: {time.perf_counter() - t0:.0f} s)\n", flush=True)


if __name__ == "__main__":
  if sys.argv[1:2] == ["gpu"]:       # python -m dsv3.bench gpu [...]: the lent-GPU check, dsv3/bench/gpu.py
    gpu.define_flags()
    flags.adopt_module_key_flags(gpu)            # --help lists the main module's flags: gpu's are its own
    common.run(gpu.main, argv=sys.argv[:1] + sys.argv[2:])
  else:
    define_flags()
    common.run(main)
