"""Converts checkpoints between the HF DeepSeek-V3 format and dsv3's orbax format, both directions.

  python -m dsv3.convert --to=orbax --src=/path/to/hf_dir --dst=/tmp/dsv3_orbax
  python -m dsv3.convert --to=hf --src=/tmp/workdir --dst=/tmp/hf_out [--step=N | --best] [--fp8] [--overwrite]

--src for --to=hf may be a training workdir (or its checkpoints/: the latest, --step, or with --best the one
with the lowest saved val_loss, as a run with --config.keep_best_by=val_loss records; the model config comes
from the checkpoint's saved training config) or a dir written by --to=orbax. The source is
only read (a training checkpoint is opened read-only, so a running trainer's save is left alone).

--dst must be new or empty; --overwrite also lets it replace a previous HF export (config.json +
*.safetensors only). A training workdir, an orbax checkpoint, or a dir with any other file is always
refused: the converter never deletes what it did not write.
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import flags

from dsv3 import cli, hf, layout
from dsv3.config import ModelConfig, require_model_config
from dsv3.interop import hf_config
from dsv3.training import checkpoint as ckpt_lib
from dsv3.training import workdir as workdir_lib


def save_orbax_variables(config: ModelConfig, variables, path: str, overwrite: bool = False) -> None:
  """variables/ + config.json into `path`: new or empty, or with `overwrite` a previous HF export.

  Written into a temporary sibling and swapped in; a workdir or orbax checkpoint at `path` is refused
  (`workdir.WorkdirError`).
  """
  cfg = require_model_config(config, "convert.save_orbax_variables")
  path = workdir_lib.check_destination(path, overwrite)
  tmp = workdir_lib.staging_dir(path)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, "variables"), variables)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config.to_hf_dict(cfg), f, indent=1)
  except BaseException:
    shutil.rmtree(tmp)  # the staging directory this call created, and only that
    raise
  workdir_lib.install(tmp, path)


# What every reader says when a folder holds no checkpoint it can read.
READABLE = ("an HF checkpoint dir (config.json + safetensors), a training --workdir (or its checkpoints/) or a "
            "--to=orbax export (variables/ + config.json)")


def is_orbax_export(path: str) -> bool:
  """Whether `path` is a --to=orbax export (variables/ + config.json)."""
  return os.path.isdir(os.path.join(path, "variables"))


def checkpoints_dir(path: str) -> str:
  """The training checkpoints/ dir of a workdir (or `path` itself); FileNotFoundError naming `path` if neither
  holds a checkpoint step."""
  path = os.path.abspath(path)
  ckpts = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
  if os.path.isdir(ckpts):
    with ckpt_lib.Checkpointer(ckpts, read_only=True) as checkpointer:
      if checkpointer.latest_step() is not None:
        return ckpts
  raise FileNotFoundError(f"{path} holds no checkpoint (no config.json, variables/ or checkpoint step); give "
                          f"{READABLE}")


def load_orbax_variables(path: str, step=None):
  """Variables from a --to=orbax dir, or from a training checkpoints/ dir (latest or `step`), in the
  model's stacked layout whatever the run's (a pipelined run saves each layer apart, dsv3.layout)."""
  return load_orbax_step(path, step)[1]


def load_orbax_step(path: str, step=None):
  """(step, variables) as `load_orbax_variables` reads them: the training step read (the latest that restores,
  when `step` is None), or None for a --to=orbax export."""
  path = os.path.abspath(path)
  if is_orbax_export(path):
    with ocp.StandardCheckpointer() as ckptr:
      return None, ckptr.restore(os.path.join(path, "variables"))
  with ckpt_lib.Checkpointer(checkpoints_dir(path), read_only=True) as checkpointer:
    restored = checkpointer.restore(step)
  train = restored.state["train"]
  variables = {"params": train["params"], "routing": train["routing"]}
  if layout.is_per_layer(variables["params"]):     # a pipelined run's checkpoint: each layer on its own
    cfg = config_of(path, restored.step)
    variables = {k: layout.stack(cfg, jax.tree.map(np.asarray, v)) for k, v in variables.items()}
  return restored.step, variables


def config_of(path: str, step=None):
  """The ModelConfig of an HF or --to=orbax dir (config.json) or of a training checkpoint's saved config."""
  if os.path.exists(os.path.join(path, "config.json")):
    return hf.read_config(path)
  with ckpt_lib.Checkpointer(checkpoints_dir(path), read_only=True) as checkpointer:
    flat = checkpointer.read_extras(step)["config"]
  model = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}
  rope = {k[len("rope_scaling."):]: v for k, v in model.items() if k.startswith("rope_scaling.")}
  model = {k: v for k, v in model.items() if not k.startswith("rope_scaling")}
  model["rope_scaling"] = rope or None
  return ModelConfig.from_config_dict({"model": model, "precision": flat.get("precision")})


def best_step(path: str) -> int:
  """The step of the training checkpoint under `path` (a workdir or its checkpoints/) with the best saved
  metric: the run's keep_best_by (lower is better), 'val_loss' if it had none. Raises ValueError naming the
  directory when `path` holds no training checkpoints or none carries the metric."""
  path = os.path.abspath(path)
  ckpts = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
  if os.path.isdir(os.path.join(path, "variables")) or not os.path.isdir(ckpts):
    raise ValueError(f"--best: {path} is not a training workdir or checkpoints dir (only those record "
                     f"val_loss); drop --best")
  with ckpt_lib.Checkpointer(ckpts, read_only=True) as checkpointer:
    if checkpointer.latest_step() is None:
      raise ValueError(f"--best: no checkpoint in {ckpts}")
    metric = checkpointer.read_extras()["config"].get("keep_best_by") or "val_loss"
    step = checkpointer.best_step(metric, "min")
  if step is None:
    raise ValueError(f"--best: no checkpoint in {ckpts} carries a {metric} (steps {checkpointer.all_steps()}); "
                     f"a run records it with --config.keep_best_by=val_loss at its evaluation steps. Fix: pass "
                     f"--step=N (or neither flag, for the latest) instead")
  return step


def main(argv):
  del argv
  F = flags.FLAGS
  if not os.path.exists(F.src):
    raise cli.UsageError(f"--src {F.src!r} does not exist")
  if F.fp8 and F.to != "hf":
    raise cli.UsageError("--fp8 applies to --to=hf only (the orbax format keeps the training dtype)")
  try:  # before the (long) load: a refused --dst should fail at once
    workdir_lib.check_destination(F.dst, F.overwrite)
  except workdir_lib.WorkdirError as e:
    raise cli.UsageError(str(e)) from e
  step = F.step
  if F.best:
    if F.to != "hf" or step is not None:
      raise cli.UsageError("--best picks the training checkpoint to export: use it with --to=hf and without --step")
    try:
      step = best_step(F.src)
    except ValueError as e:
      raise cli.UsageError(str(e)) from e
  if F.to == "orbax":
    cfg, variables = hf.load_checkpoint(F.src)
    save_orbax_variables(cfg, variables, F.dst, overwrite=F.overwrite)
    print(f"wrote {F.dst} (orbax variables) from {F.src}")
  else:
    step, variables = load_orbax_step(F.src, step)
    hf.save_checkpoint(config_of(F.src, step), variables, F.dst, overwrite=F.overwrite,
                       dtype="fp8" if F.fp8 else None)
    what = "the export" if step is None else f"step {step}" + (", the best" if F.best else "")
    print(f"wrote {F.dst} ({what}) from {F.src}")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command line's flags, defined only by `python -m dsv3.convert` (importing the module defines none)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_enum("to", None, ["hf", "orbax"], "Target format.", required=True, **fv)
  flags.DEFINE_string("src", None, "Source checkpoint dir.", required=True, **fv)
  flags.DEFINE_string("dst", None, "Destination dir.", required=True, **fv)
  flags.DEFINE_integer("step", None, "Training checkpoint step (default: latest).", **fv)
  flags.DEFINE_bool("best", False, "Export the training checkpoint with the lowest saved val_loss (see "
                    "--config.keep_best_by), not the latest.", **fv)
  flags.DEFINE_bool("overwrite", False, "Replace a previous HF export at --dst (never anything else).", **fv)
  flags.DEFINE_bool("fp8", False, "With --to=hf: DeepSeek's FP8 serving format (e4m3 weights + 128x128 "
                    "weight_scale_inv; embedding, head, norms and gate stay unquantised).", **fv)


if __name__ == "__main__":
  define_flags()
  # A damaged source or an unwritable destination ends with its one-line message, not a traceback.
  cli.run(main, user_errors=(workdir_lib.WorkdirError, FileNotFoundError))
