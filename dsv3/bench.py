"""Benchmarks that print tables (not timed tests): throughput and MFU, dsv3 vs HF transformers, MoE cost growth,
sequence length, compile time vs depth, and memory vs the planner.

  python -m dsv3.bench                                   # every section, sized for a 2-core CPU (~2 min each)
  python -m dsv3.bench --what=train,hf --small           # also the small config (GPU; slow on CPU)
  python -m dsv3.bench --what=moe --fast                 # smaller sizes, for smoke runs
  python -m dsv3.bench gpu [--smoke]                     # one lent GPU: kernel checks, GEMM TFLOP/s, train step

Sections (--what, comma-separated):
  train    tokens/s and MFU of the full training step (forward + backward with MTP and the balance loss, the
           trainer's AdamW) for configs/tiny.py (and configs/small.py with --small) on the current backend.
           MFU = tokens/s x dsv3.plan.flops_per_token(include_mtp) / peak; the peak is the GPU's datasheet
           figure or, on CPU, a measured float32 matmul (dsv3.metrics.device_peak_flops).
  hf       (dsv3/bench_hf.py) the same configs and weights in HF transformers (PyTorch, CPU): dsv3.hf.save_checkpoint, then
           AutoModelForCausalLM.from_pretrained. Both run forward + backward + AdamW (lr 1e-4, betas 0.9/0.95,
           weight decay 0.1 on every parameter) of the main model's next-token loss at the same batch, sequence
           length and float32, torch at its default thread count, for the tiny config and a 16M-parameter MoE
           (hf_comparison_configs; --hf_configs picks): per-phase ms (forward, backward, optimizer), tokens/s,
           the ratio, and one MoE block's forward + backward on both sides.
  profile  (dsv3/bench_hf.py) where the step's time goes (dsv3.step_profile): the hf configs' dsv3 step traced with jax.profiler,
           exclusive op time by op class (GEMM, gather, scatter, layout copy, ...) and by phase and model part,
           with the GEMMs' achieved GFLOP/s.
  moe      one MoE layer (forward + backward) at fixed active parameters (hidden 128, 4 active experts of
           intermediate 64) with 8, 16, 64, 256 routed experts: the dropless grouped GEMM (jax.lax.ragged_dot)
           against a dense one-hot dispatch baseline that runs every expert on every token and masks by the
           routing weights. The grouped path's cost should stay nearly flat; the baseline grows with E.
  seq      tokens/s of the tiny training step for sequence lengths 128 .. 4096 (--fast: .. 1024) at a fixed
           number of tokens per step (2048, or --tokens).
  compile  lowering and compile time of the tiny training step with 2, 4, 8, 16 layers, scanned (nn.scan keeps it
           flat) and unrolled (model.scan_layers=False).
  memory   peak bytes per device of the compiled training step (compiled.memory_analysis(): arguments +
           outputs - donated aliases + temporaries) next to the planner's params + grads + optimizer estimate.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3 import bench_common as common
from dsv3 import bench_hf, memory, metrics, model, moe, plan
from dsv3 import optimizer as opt_lib
from dsv3.config import ModelConfig
from dsv3.studies.common import load_config

SECTIONS = ("train", "hf", "profile", "moe", "seq", "compile", "memory")


# ---------------------------------------------------------------------------------------------------
# Shared pieces.
# ---------------------------------------------------------------------------------------------------
def short_run_config(name: str, steps: int, batch_size: int, seq_len: int, vocab: int, max_files: int,
                     eval_batches: int, log_every: int = 1):
  """configs/<name>.py shrunk for a quick run (the colabs' recipe): `steps` steps with 10% warm-up, one
  evaluation and one checkpoint at the end, no EMA, data parallel over every local device. max_files
  caps the default corpus (0: all of it); vocab sets both the model's and the tokenizer's vocabulary."""
  c = load_config(name)
  c.num_train_steps, c.warmup_steps = steps, max(1, steps // 10)
  c.batch_size, c.seq_len = batch_size, seq_len
  c.model.vocab_size = c.data.vocab_size = vocab
  c.data.max_files, c.eval_batches = max_files, eval_batches
  c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = log_every, steps, steps
  c.ema_decay = 0.0
  c.mesh.data = jax.device_count()
  return c


def train_throughput(config, batch: int, seq_len: int, steps: int) -> dict:
  """tokens/s and MFU of the full training step of `config` at (batch, seq_len)."""
  cfg = ModelConfig.from_config_dict(config).replace(max_position_embeddings=max(seq_len, 1))
  tx, _ = opt_lib.make_optimizer(config)
  variables = model.init(cfg, jax.random.key(0))
  params, routing = variables["params"], variables["routing"]
  opt_state = tx.init(params)
  step = common.make_train_step(cfg, tx)
  tokens = common.tokens(cfg, batch, seq_len)
  state = {"p": params, "o": opt_state}

  def run():
    state["p"], state["o"], loss = step(state["p"], routing, state["o"], tokens)
    loss.block_until_ready()

  t0 = time.perf_counter()
  run()                                    # compile + first step
  first = time.perf_counter() - t0
  sec = common.timeit(run, steps, warmup=0)
  tok_s = batch * seq_len / sec
  flops = plan.flops_per_token(cfg, seq_len, include_mtp=True)
  peak = metrics.device_peak_flops(dtype={"fp8": "fp8", "bf16": "bf16"}.get(config.precision, "fp32"))
  return dict(batch=batch, seq_len=seq_len, step_s=sec, tokens_per_s=tok_s, flops_per_token=flops,
              peak=peak, mfu=metrics.mfu(tok_s, flops, peak), first_step_s=first)


# ---------------------------------------------------------------------------------------------------
# Sections.
# ---------------------------------------------------------------------------------------------------
def bench_train(args):
  cases = [("tiny", load_config("tiny"), args.batch or 16, args.seq or 128)]
  if args.small:
    on_cpu = jax.default_backend() == "cpu"
    # The small config's own batch (32 x 1024) takes minutes per step on a CPU; there a short one says enough.
    cases.append(("small", load_config("small"), args.batch or (1 if on_cpu else 8),
                  args.seq or (256 if on_cpu else 1024)))
  rows = []
  for name, config, batch, seq in cases:
    r = train_throughput(config, batch, seq, args.steps)
    rows.append([name, config.precision, f"{batch}x{seq}", f"{r['first_step_s']:.1f}", f"{r['step_s'] * 1e3:.0f}",
                 f"{r['tokens_per_s']:,.0f}", f"{r['flops_per_token'] / 1e6:.1f}", f"{r['peak'] / 1e9:,.0f}",
                 f"{r['mfu']:.1%}"])
  peak_note = ("peak = measured float32 1024x1024 matmul" if jax.default_backend() == "cpu"
               else "peak = datasheet dense figure")
  print(f"== train step: tokens/s and MFU ({common.device_line()}; {peak_note})")
  print(common.fmt_table(["config", "precision", "batch", "compile+1st s", "step ms", "tokens/s", "MFLOPs/token",
                    "peak GFLOP/s", "MFU"], rows))


def dense_dispatch(x, topk_idx, topk_weight, w_gate, w_up, w_down):
  """The baseline: every expert on every token (E x the FLOPs), combined by one-hot routing weights.

  x [N, H], topk_idx/topk_weight [N, k], w_* [E, H, I] / [E, I, H] -> [N, H]. Same result as the dropless
  grouped GEMM path (dsv3.moe.routed_experts_local), no sorting, no ragged shapes.
  """
  E = w_gate.shape[0]
  combine = jnp.einsum("nk,nke->ne", topk_weight, jax.nn.one_hot(topk_idx, E, dtype=jnp.float32))
  gate = jnp.einsum("nh,ehi->eni", x, w_gate)
  up = jnp.einsum("nh,ehi->eni", x, w_up)
  out = jnp.einsum("eni,eih->enh", jax.nn.silu(gate) * up, w_down)
  return jnp.einsum("ne,enh->nh", combine, out)


def _moe_step(cfg, dispatch):
  """Forward + backward of routing and routed experts for one layer (loss = sum of squares of the output)."""
  def loss(x, router, w_gate, w_up, w_down):
    idx, weight, _ = moe.route(cfg, x, router, jnp.zeros((cfg.n_routed_experts,), jnp.float32))
    if dispatch == "grouped":
      y, _ = moe.routed_experts_local(cfg, x, idx, weight, w_gate, w_up, w_down)
    else:
      y = dense_dispatch(x, idx, weight, w_gate, w_up, w_down)
    return jnp.mean(jnp.square(y)), y
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))


def bench_moe(args):
  base = ModelConfig.from_config_dict(load_config("tiny"))
  H, I, k = base.hidden_size, base.moe_intermediate_size, 4
  n_tokens = args.tokens or (1024 if args.fast else 2048)
  experts = (8, 16, 64) if args.fast else (8, 16, 64, 256)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(n_tokens, H)), jnp.float32)
  rows, check = [], []
  for E in experts:
    cfg = base.replace(n_routed_experts=E, n_group=1, topk_group=1, num_experts_per_tok=k, n_shared_experts=0)
    w = [jnp.asarray(rng.normal(size=s) * 0.05, jnp.float32) for s in ((H, E), (E, H, I), (E, H, I), (E, I, H))]
    result = {}
    for dispatch in ("grouped", "dense"):
      fn = _moe_step(cfg, dispatch)
      out = {}

      def run():
        out["v"] = fn(x, *w)
        jax.block_until_ready(out["v"])
      result[dispatch] = (common.timeit(run, args.steps, warmup=1), out["v"][0][1])
    check.append(float(jnp.max(jnp.abs(result["grouped"][1] - result["dense"][1]))))
    g, d = result["grouped"][0], result["dense"][0]
    rows.append([E, k, f"{3 * H * I * k:,}", f"{3 * H * I * E:,}", f"{g * 1e3:.1f}", f"{n_tokens / g:,.0f}",
                 f"{d * 1e3:.1f}", f"{n_tokens / d:,.0f}", f"{d / g:.1f}x"])
  g0 = float(rows[0][5].replace(",", ""))
  print(f"== MoE layer cost vs number of experts ({common.device_line()}): {n_tokens} tokens, hidden {H}, "
        f"{k} active experts of intermediate {I}, forward + backward")
  print(common.fmt_table(["experts", "active", "active expert params", "total expert params", "grouped ms",
                    "grouped tok/s", "dense one-hot ms", "dense tok/s", "dense/grouped"], rows))
  last = float(rows[-1][5].replace(",", ""))
  print(f"grouped GEMM tokens/s at {experts[-1]} experts = {last / g0:.2f} x that at {experts[0]}; "
        f"max |grouped - dense| output difference {max(check):.2e}")


def bench_seq(args):
  config = load_config("tiny")
  lengths = (128, 256, 512, 1024) if args.fast else (128, 256, 512, 1024, 2048, 4096)
  per_step = args.tokens or 2048                      # at 4096 the batch is one sequence of 4096
  rows = []
  for T in lengths:
    r = train_throughput(config, max(1, per_step // T), T, min(args.steps, 3))
    rows.append([T, r["batch"], f"{r['step_s'] * 1e3:.0f}", f"{r['tokens_per_s']:,.0f}",
                 f"{r['flops_per_token'] / 1e6:.1f}", f"{r['mfu']:.1%}"])
  print(f"== tiny training step vs sequence length ({common.device_line()}), {per_step} tokens per step "
        f"(one sequence when seq_len > {per_step})")
  print(common.fmt_table(["seq_len", "batch", "step ms", "tokens/s", "MFLOPs/token", "MFU"], rows))


def _abstract_step(config, cfg, batch, seq_len):
  """(jitted step, abstract args) for lowering without allocating anything."""
  tx, _ = opt_lib.make_optimizer(config)
  variables = jax.eval_shape(functools.partial(model.init, cfg), jax.random.key(0))
  opt_state = jax.eval_shape(tx.init, variables["params"])
  tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)
  return common.make_train_step(cfg, tx), (variables["params"], variables["routing"], opt_state, tokens)


def bench_compile(args):
  config = load_config("tiny")
  base = ModelConfig.from_config_dict(config)
  rows = []
  for depth in (2, 4, 8) if args.fast else (2, 4, 8, 16):
    row = [depth, f"{plan.param_counts(base.replace(num_hidden_layers=depth))['total_params']:,}"]
    for scan in (True, False):
      cfg = base.replace(num_hidden_layers=depth, scan_layers=scan)
      step, abstract = _abstract_step(config, cfg, 16, 128)
      t0 = time.perf_counter()
      lowered = step.lower(*abstract)
      t1 = time.perf_counter()
      lowered.compile()
      row += [f"{t1 - t0:.2f}", f"{time.perf_counter() - t1:.2f}"]
    rows.append(row)
  print(f"== compile time of the tiny training step vs depth ({common.device_line()}; first layer dense): the "
        f"layer stacks scanned (model.scan_layers=True) and unrolled (False)")
  print(common.fmt_table(["layers", "params (main)", "scan: lower s", "compile s", "unrolled: lower s", "compile s"],
                   rows))


def bench_memory(args):
  cases = [("tiny", load_config("tiny"), 16, 128)]
  if args.small:
    cases.append(("small", load_config("small"), 1, 1024))
  rows = []
  for name, config, batch, seq in cases:
    cfg = ModelConfig.from_config_dict(config)
    step, abstract = _abstract_step(config, cfg, batch, seq)
    mem = step.lower(*abstract).compile().memory_analysis()
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)
    p = memory.memory_plan(cfg, 1, 1, 1, "none", config.adam_moments_dtype)
    mib = lambda b: f"{b / 2**20:,.1f}"
    planned = p["total_bytes"]
    rows.append([name, f"{batch}x{seq}", mib(mem.argument_size_in_bytes), mib(mem.output_size_in_bytes),
                 mib(mem.alias_size_in_bytes), mib(mem.temp_size_in_bytes), mib(peak),
                 mib(sum(p["params"].values())), mib(sum(p["grads"].values())), mib(sum(p["optimizer"].values())),
                 mib(planned), f"{peak / planned:.2f}"])
  print(f"== memory per device, MiB ({common.device_line()}): compiled.memory_analysis() of the training step "
        f"(donated state) vs the planner (params + grads + optimizer; activations are in 'temp')")
  print(common.fmt_table(["config", "batch", "args", "outputs", "aliased", "temp", "peak", "plan params", "plan grads",
                    "plan opt", "plan total", "peak/plan"], rows))


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["gpu"]:        # python -m dsv3.bench gpu [...]: the lent-GPU check, dsv3/bench_gpu.py
    from dsv3 import bench_gpu  # here, not at the top: bench_gpu imports this module
    return bench_gpu.main(argv[1:])
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--what", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
  parser.add_argument("--small", action="store_true", help="also configs/small.py (train, memory)")
  parser.add_argument("--fast", action="store_true", help="smaller sizes for smoke runs")
  parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 5, --fast 2)")
  parser.add_argument("--batch", type=int, default=None, help="train/hf batch (default 16 / each hf config's own)")
  parser.add_argument("--seq", type=int, default=None, help="train/hf sequence length (default 128 / each hf config's)")
  parser.add_argument("--tokens", type=int, default=None, help="moe: tokens per layer call; seq: tokens per step")
  parser.add_argument("--top", type=int, default=15, help="profile: how many of the slowest ops to list")
  parser.add_argument("--hf_configs", default=None, help="hf: comma-separated subset of tiny,16m (default both)")
  args = parser.parse_args(argv)
  args.steps = args.steps or (2 if args.fast else 5)
  what = [w.strip() for w in args.what.split(",") if w.strip()]
  unknown = sorted(set(what) - set(SECTIONS))
  if unknown:
    parser.error(f"--what: unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
  for w in what:
    t0 = time.perf_counter()
    (getattr(bench_hf, w) if w in ("hf", "profile") else globals()[f"bench_{w}"])(args)
    print(f"({w}: {time.perf_counter() - t0:.0f} s)\n", flush=True)


if __name__ == "__main__":
  main()
