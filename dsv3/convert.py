"""Converts checkpoints between the HF DeepSeek-V3 format and dsv3's orbax format, both directions.

  python -m dsv3.convert --to=orbax --src=/path/to/hf_dir --dst=/tmp/dsv3_orbax
  python -m dsv3.convert --to=hf --src=/tmp/workdir/checkpoints --dst=/tmp/hf_out [--step=N]

--src for --to=hf may be a training workdir's checkpoints/ (the latest or --step is used; the model
config comes from the checkpoint's saved training config) or a dir written by --to=orbax.
"""
from __future__ import annotations

import json
import os

from absl import app, flags


def save_orbax_variables(config, variables, path: str) -> None:
  """variables + config.json into an orbax dir (written atomically by orbax)."""
  import orbax.checkpoint as ocp
  from dsv3.config import ModelConfig
  cfg = ModelConfig.from_any(config)
  path = os.path.abspath(path)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, "variables"), variables)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg.to_hf_dict(), f, indent=1)


def load_orbax_variables(path: str, step=None):
  """Variables from a --to=orbax dir, or from a training checkpoints/ dir (latest or `step`)."""
  import orbax.checkpoint as ocp
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "variables")):
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(os.path.join(path, "variables"))
  from dsv3 import checkpoint as ckpt_lib
  ckpts = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
  checkpointer = ckpt_lib.Checkpointer(ckpts, async_save=False)
  restored = checkpointer.restore(step)
  checkpointer.close()
  if restored is None:
    raise FileNotFoundError(f"{path}: neither a dsv3 orbax export (variables/) nor a training checkpoints dir")
  train = restored.state["train"]
  return {"params": train["params"], "routing": train["routing"]}


def config_of(path: str, step=None):
  from dsv3 import hf
  from dsv3.config import ModelConfig
  if os.path.exists(os.path.join(path, "config.json")):
    return hf.read_config(path)
  from dsv3 import checkpoint as ckpt_lib
  ckpts = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
  flat = ckpt_lib.Checkpointer(ckpts, async_save=False).read_extras(step)["config"]
  model = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}
  rope = {k[len("rope_scaling."):]: v for k, v in model.items() if k.startswith("rope_scaling.")}
  model = {k: v for k, v in model.items() if not k.startswith("rope_scaling")}
  model["rope_scaling"] = rope or None
  return ModelConfig.from_config_dict({"model": model, "precision": flat.get("precision")})


def main(argv):
  del argv
  F = flags.FLAGS
  from dsv3 import hf
  if not os.path.exists(F.src):
    raise app.UsageError(f"--src {F.src!r} does not exist")
  if F.to == "orbax":
    cfg, variables = hf.load_checkpoint(F.src)
    save_orbax_variables(cfg, variables, F.dst)
  else:
    cfg = config_of(F.src, F.step)
    hf.save_checkpoint(cfg, load_orbax_variables(F.src, F.step), F.dst)
  print(f"wrote {F.dst}")


if __name__ == "__main__":
  flags.DEFINE_enum("to", None, ["hf", "orbax"], "Target format.")
  flags.DEFINE_string("src", None, "Source checkpoint dir.")
  flags.DEFINE_string("dst", None, "Destination dir.")
  flags.DEFINE_integer("step", None, "Training checkpoint step (default: latest).")
  flags.mark_flags_as_required(["to", "src", "dst"])
  app.run(main)
