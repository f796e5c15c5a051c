"""The train-step sections of `python -m dsv3.bench` (train, moe, seq, compile, memory; what each prints: the
docstring of dsv3/bench/__main__.py). Every section but moe times or compiles the trainer's own step,
dsv3.training.steps.make(config, cfg, mesh).train, on one device."""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3 import cli, plan
from dsv3.analysis import chip_figures, hlo_cost, memory
from dsv3.bench import common, hf
from dsv3.config import ModelConfig
from dsv3.nn import moe
from dsv3.training import metrics


def train_throughput(config, batch: int, seq_len: int, steps: int, figures=None) -> dict:
  """tokens/s and MFU of the trainer's step of `config` at (batch, seq_len), median of `steps` timed steps;
  with `figures` (dsv3.analysis.chip_figures.Figures), also `estimate_s`: the estimated step of the same program."""
  cfg = ModelConfig.from_config_dict(config).replace(max_position_embeddings=max(seq_len, 1))
  trainer = common.one_device_steps(config, cfg)
  step = jax.jit(trainer.train, donate_argnums=0)
  state, *args = common.train_args(config, trainer, common.tokens(cfg, batch, seq_len))
  box = {"state": state}
  t0 = time.perf_counter()
  compiled = step.lower(state, *args).compile()

  def run():
    box["state"], out = compiled(box["state"], *args)
    out["loss"].block_until_ready()

  run()                                    # compile + first step
  first = time.perf_counter() - t0
  sec = common.timeit(run, steps, warmup=0)
  tok_s = batch * seq_len / sec
  flops = plan.flops_per_token(cfg, seq_len, include_mtp=True)
  peak = metrics.device_peak_flops(dtype={"fp8": "fp8", "bf16": "bf16"}.get(config.precision, "fp32"))
  out = dict(batch=batch, seq_len=seq_len, step_s=sec, tokens_per_s=tok_s, flops_per_token=flops,
             peak=peak, mfu=metrics.mfu(tok_s, flops, peak), first_step_s=first)
  if figures is not None:                  # dsv3.analysis.step_time's estimate of this very program
    out["estimate_s"] = hlo_cost.program_time(compiled.as_text(), figures).seconds
  return out


# ---------------------------------------------------------------------------------------------------
# Sections.
# ---------------------------------------------------------------------------------------------------
def bench_train(args):
  cases = [("tiny", cli.load_config("tiny"), args.batch or 16, args.seq or 128)]
  if args.small:
    on_cpu = jax.default_backend() == "cpu"
    # The small config's own batch (32 x 1024) takes minutes per step on a CPU; there a short one says enough.
    cases.append(("small", cli.load_config("small"), args.batch or (1 if on_cpu else 8),
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
  grouped GEMM path (dsv3.nn.moe.routed_experts_local), no sorting, no ragged shapes.
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
  base = ModelConfig.from_config_dict(cli.load_config("tiny"))
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
  config = cli.load_config("tiny")
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
  """(jitted train step, abstract args) for lowering without allocating anything."""
  trainer = common.one_device_steps(config, cfg)
  tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)
  return jax.jit(trainer.train, donate_argnums=0), common.train_args(config, trainer, tokens)


def bench_compile(args):
  config = cli.load_config("tiny")
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
  cases = [("tiny", cli.load_config("tiny"), 16, 128)]
  if args.small:
    cases.append(("small", cli.load_config("small"), 1, 1024))
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


def compiled_step(config, cfg: ModelConfig, batch: int, seq_len: int):
  """The trainer's one-device step of `config` / `cfg` at (batch, seq_len), compiled: (its HLO text, `run`,
  which runs one step and blocks)."""
  cfg = cfg.replace(max_position_embeddings=max(seq_len, cfg.max_position_embeddings))
  trainer = common.one_device_steps(config, cfg)
  state, *args = common.train_args(config, trainer, common.tokens(cfg, batch, seq_len))
  compiled = jax.jit(trainer.train, donate_argnums=0).lower(state, *args).compile()
  box = {"state": state}

  def run():
    box["state"], out = compiled(box["state"], *args)
    out["loss"].block_until_ready()
  run()                                    # the first call maps the buffers
  return compiled.as_text(), run


def bench_estimate(args):
  """The step-time estimator (dsv3.analysis.step_time) calibrated on this CPU, for the tiny and 16M configs'
  compiled steps. Each of `args.rounds` rounds measures the CPU's figures again and then times each step
  (median of `args.steps`), so an estimate and the step it predicts are measured side by side; the table
  gives the median over rounds and the range of the per-round errors."""
  m16, batch16, seq16 = hf.hf_comparison_configs()["16m"]
  cases = [("tiny", cli.load_config("tiny"), None, args.batch or 16, args.seq or 128),
           ("16m", cli.load_config("tiny"), m16.replace(num_nextn_predict_layers=1), batch16, seq16)]
  steps = [(name, batch, seq, *compiled_step(config, cfg or ModelConfig.from_config_dict(config), batch, seq))
           for name, config, cfg, batch, seq in cases]
  figs, measured, estimated = [], {}, {}
  for _ in range(args.rounds):
    figs.append(chip_figures.measure_cpu())
    for name, _, _, text, run in steps:
      measured.setdefault(name, []).append(common.timeit(run, args.steps, warmup=1))
      estimated.setdefault(name, []).append(hlo_cost.program_time(text, figs[-1]))
  rows = []
  for name, batch, seq, _, _ in steps:
    errors = [e.seconds / m - 1 for e, m in zip(estimated[name], measured[name])]
    est, meas = estimated[name][0], statistics.median(measured[name])
    median_est = statistics.median(e.seconds for e in estimated[name])
    rows.append([name, f"{batch}x{seq}", f"{est.flops / 1e9:.2f}", f"{est.bytes / 1e9:.2f}", str(est.kernels),
                 f"{meas * 1e3:.0f}", f"{median_est * 1e3:.0f}", f"{median_est / meas - 1:+.0%}",
                 f"{min(errors):+.0%} .. {max(errors):+.0%}"])
  span = lambda values, scale: f"{min(values) / scale:.3g}-{max(values) / scale:.3g}"
  print(f"== step-time estimate vs measured ({common.device_line()}; {args.rounds} rounds, figures measured in "
        f"each: GEMM {span([f.flops['fp32'] for f in figs], 1e9)} GFLOP/s, memory "
        f"{span([f.hbm for f in figs], 1e9)} GB/s, {span([f.launch for f in figs], 1e-6)} us per kernel)")
  print(common.fmt_table(["config", "batch", "GFLOPs", "GB moved", "kernels", "measured ms", "estimate ms",
                          "error", "error per round"], rows))
