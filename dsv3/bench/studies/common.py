"""What the studies share: the study-sized run of a config, one run through the trainer, and
the files a study writes."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Iterable, Mapping

import jax
import numpy as np
from absl import app, flags

from dsv3 import cli, train
from dsv3.bench import common as bench_common


def set_field(config, key: str, value) -> None:
  """config['a.b.c'] = value ('__' works as '.', so keyword arguments can name nested fields); an unknown
  field is a KeyError naming it."""
  *parents, leaf = key.replace("__", ".").split(".")
  node = config
  for p in parents:
    node = node[p]
  if leaf not in node:
    raise KeyError(f"config.{key.replace('__', '.')}: no such field")
  node[leaf] = value


def study_config(steps: int, name: str = "tiny", evaluations: int = 8, log_every: int | None = None,
                 overrides: Mapping | None = None):
  """configs/<name>.py for a study run: `steps` steps (warm-up at most 10% of them), `evaluations`
  evaluations spread over the run, one checkpoint at the end, no EMA (the studies compare raw parameters),
  data parallel over every device. `overrides` ({'a.b': value}) are applied last."""
  c = cli.load_config(name)
  c.num_train_steps = int(steps)
  c.warmup_steps = max(1, min(c.warmup_steps, steps // 10))
  c.eval_every_steps = max(1, steps // max(1, evaluations))
  c.log_every_steps = log_every or max(1, min(c.log_every_steps, steps // 20))
  c.checkpoint_every_steps = int(steps)
  c.ema_decay = 0.0
  c.mesh.data = jax.device_count()
  for key, value in (overrides or {}).items():
    set_field(c, key, value)
  return c


def parse_sets(items: Iterable[str]) -> dict:
  """['data.max_files=30', 'data.source=/d/*.txt'] -> {'data.max_files': 30, 'data.source': '/d/*.txt'}."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise app.UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. --set data.max_files=30")
    try:
      out[key] = json.loads(value)
    except json.JSONDecodeError:
      out[key] = value
  return out


def read_metrics(workdir: str) -> list:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


class StudyStopped(RuntimeError):
  """A study's training run ended before its last step (SIGTERM/SIGINT); rerunning resumes it."""


def run_dir(out: str, config) -> str:
  """out/runs/<hash of the whole config>: a changed setting never resumes another setting's run, and two
  studies that train the same config share one run."""
  key = hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:12]
  return os.path.join(out, "runs", key)


def train_run(config, out: str) -> dict:
  """Trains `config` in run_dir(out, config), or reads that run back if it finished before (a killed
  study resumes where its run stopped: the trainer resumes from its workdir). Returns {'last': the final
  evaluation with the last logged training metrics, 'evals': one row per evaluation, 'train': one row per
  logged step, 'workdir'}."""
  workdir = run_dir(out, config)
  if not _finished(workdir, config.num_train_steps):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "study_config.json"), "w") as f:
      f.write(config.to_json(sort_keys=True, indent=1))
    train.train_and_evaluate(config, workdir)
    if not _finished(workdir, config.num_train_steps):    # stopped early (a signal): nothing to report yet
      raise StudyStopped(f"the run in {workdir} stopped before step {config.num_train_steps}; run the same "
                         f"command again to resume it")
  rows = read_metrics(workdir)
  evals, logged = [r for r in rows if "val_loss" in r], [r for r in rows if "loss" in r]
  return {"last": {**logged[-1], **evals[-1]}, "evals": evals, "train": logged, "workdir": workdir}


def _finished(workdir: str, steps: int) -> bool:
  return (os.path.exists(os.path.join(workdir, "metrics.jsonl"))
          and any(r.get("step") == steps and "val_loss" in r for r in read_metrics(workdir)))


def smooth(values, window: int) -> np.ndarray:
  """Trailing moving average (the first window-1 points average what there is)."""
  v = np.asarray(values, np.float64)
  c = np.cumsum(np.insert(v, 0, 0.0))
  n = np.minimum(np.arange(1, len(v) + 1), window)
  return (c[1:] - c[np.arange(1, len(v) + 1) - n]) / n


def write_outputs(out_dir: str, name: str, table: str, results: dict, figure) -> dict:
  """Writes <name>.md (the table), <name>.json (the numbers) and <name>.png (the figure) to out_dir."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {ext: os.path.join(out_dir, f"{name}.{ext}") for ext in ("md", "json", "png")}
  with open(paths["md"], "w") as f:
    f.write(table.rstrip() + "\n")
  with open(paths["json"], "w") as f:
    json.dump(results, f, indent=1, default=float)
  figure.savefig(paths["png"], dpi=110, bbox_inches="tight")
  return paths


def define_flags(name: str, flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The flags every study's command line has (--steps, --out, --set); a study's own define_flags calls this."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_integer("steps", 1000, "Training steps per run.", **fv)
  flags.DEFINE_string("out", "/tmp/dsv3_studies", f"Where the runs (out/runs/) and {name}.{{md,json,png}} go.", **fv)
  flags.DEFINE_multi_string("set", [], "Config override for every run, KEY=VALUE (e.g. data.max_files=30).", **fv)


def main(name: str, study: Callable) -> None:
  """A study's command line, once its define_flags ran: `study(flags, overrides) -> (results, text, figure)`,
  whose outputs go to --out/<name>.{md,json,png}. Library INFO logs stay off unless -v / --verbosity is
  given, as in the trainer."""
  def run(argv):
    del argv
    results, text, fig = study(flags.FLAGS, parse_sets(flags.FLAGS.set))
    paths = write_outputs(flags.FLAGS.out, name, text, results, fig)
    print(text)
    print(f"wrote {paths['md']}, {paths['json']}, {paths['png']}")
  bench_common.run(run, user_errors=(StudyStopped,))
