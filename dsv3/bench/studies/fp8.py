"""FP8 against BF16 over a long run (report §3.3.1, Figure 10: relative loss error below 0.25%).

  python -m dsv3.bench.studies.fp8 --steps=1000 --out=/tmp/dsv3_studies

The same tiny model, data, seed and schedule trained twice: `precision='bf16'` (BF16 activations, FP32
master weights) and `precision='fp8'` (the same, with every linear's three GEMMs in DeepSeek's fine-grained
FP8: 1x128 activation tiles, 128x128 weight blocks, E4M3, FP32 promotion every 128 of K; on CPU an exact
emulation). Logged every `--log_every` steps; the relative error at step s is
|L_fp8(s) - L_bf16(s)| / L_bf16(s) of the training loss averaged over a trailing window of `--window` logs
(a single step's loss is noisier than the effect being measured), and the same for the validation loss
at every evaluation.
"""
from __future__ import annotations

import numpy as np
from absl import flags
from matplotlib.figure import Figure   # no pyplot: any backend, notebook or headless

from dsv3.bench.studies import common

PAPER_BOUND = 0.0025


def run(steps: int, out: str, log_every: int = 5, window: int = 4, overrides: dict | None = None) -> dict:
  """Trains the BF16 and FP8 runs under out/runs/; returns their curves and the relative errors."""
  runs = {}
  for precision in ("bf16", "fp8"):
    config = common.study_config(steps, evaluations=10, log_every=log_every,
                                 overrides={"precision": precision, **(overrides or {})})
    r = common.train_run(config, out)
    runs[precision] = dict(steps=[t["step"] for t in r["train"]], loss=[t["ce"] for t in r["train"]],
                           eval_steps=[e["step"] for e in r["evals"]], val_loss=[e["val_loss"] for e in r["evals"]])
  b, f = runs["bf16"], runs["fp8"]
  assert b["steps"] == f["steps"] and b["eval_steps"] == f["eval_steps"], "the two runs logged different steps"
  smooth_b, smooth_f = common.smooth(b["loss"], window), common.smooth(f["loss"], window)
  rel = np.abs(smooth_f - smooth_b) / smooth_b
  val_rel = np.abs(np.subtract(f["val_loss"], b["val_loss"])) / np.asarray(b["val_loss"])
  tail = len(rel) // 2                      # the second half of the run, after the loss has come down
  return {"steps": steps, "log_every": log_every, "window": window, "runs": runs,
          "rel_error": rel.tolist(), "val_rel_error": val_rel.tolist(),
          "summary": dict(final_train_rel=float(rel[-1]), max_train_rel_second_half=float(rel[tail:].max()),
                          mean_train_rel_second_half=float(rel[tail:].mean()), final_val_rel=float(val_rel[-1]),
                          max_val_rel=float(val_rel.max()), final_val_bf16=b["val_loss"][-1],
                          final_val_fp8=f["val_loss"][-1])}


def table(results: dict) -> str:
  s = results["summary"]
  within = lambda x: "within" if x < PAPER_BOUND else "OUTSIDE"
  return "\n".join([
      f"tiny (configs/tiny.py), {results['steps']} steps, FP8 vs BF16, relative loss error "
      f"(training loss: mean of a trailing window of {results['window']} logs, every {results['log_every']} steps)",
      "",
      "| measure | relative error | paper bound 0.25% |",
      "|---|---|---|",
      f"| training loss, final | {s['final_train_rel']:.3%} | {within(s['final_train_rel'])} |",
      f"| training loss, mean over the second half | {s['mean_train_rel_second_half']:.3%} | "
      f"{within(s['mean_train_rel_second_half'])} |",
      f"| training loss, max over the second half | {s['max_train_rel_second_half']:.3%} | "
      f"{within(s['max_train_rel_second_half'])} |",
      f"| validation loss, final ({s['final_val_fp8']:.4f} vs {s['final_val_bf16']:.4f}) | {s['final_val_rel']:.3%} | "
      f"{within(s['final_val_rel'])} |",
      f"| validation loss, max over the evaluations | {s['max_val_rel']:.3%} | {within(s['max_val_rel'])} |"])


def figure(results: dict):
  fig = Figure(figsize=(12, 4.2))
  axes = fig.subplots(1, 2)
  for precision, r in results["runs"].items():
    axes[0].plot(r["steps"], common.smooth(r["loss"], results["window"]), label=f"{precision}: training CE")
    axes[0].plot(r["eval_steps"], r["val_loss"], "o--", ms=3, label=f"{precision}: validation CE")
  axes[0].set(xlabel="step", ylabel="cross-entropy", title="BF16 vs FP8 loss")
  axes[0].set_ylim(top=min(axes[0].get_ylim()[1], 6.0))
  steps = results["runs"]["bf16"]["steps"]
  axes[1].plot(steps, 100 * np.asarray(results["rel_error"]), label="training loss")
  axes[1].plot(results["runs"]["bf16"]["eval_steps"], 100 * np.asarray(results["val_rel_error"]), "o--", ms=3,
               label="validation loss")
  axes[1].axhline(100 * PAPER_BOUND, color="k", ls=":", label="paper bound (0.25%)")
  axes[1].set(xlabel="step", ylabel="|FP8 - BF16| / BF16 (%)", title="relative loss error", yscale="log")
  for ax in axes:
    ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def _study(f, overrides):
  results = run(f.steps, f.out, f.log_every, f.window, overrides)
  return results, table(results), figure(results)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The study's flags, defined only by `python -m dsv3.bench.studies.fp8`."""
  common.define_flags("fp8", flag_values)
  flags.DEFINE_integer("log_every", 5, "Log the training loss every this many steps.", flag_values=flag_values)
  flags.DEFINE_integer("window", 4, "Trailing logs averaged before comparing training losses.",
                       flag_values=flag_values)


if __name__ == "__main__":
  define_flags()
  common.main("fp8", _study)
