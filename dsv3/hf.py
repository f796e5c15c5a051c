"""HF checkpoints in the DeepSeek-V3 format (what DeepSeek, Moonlight and Kimi-K2 ship), both directions.

Layout on disk: config.json + model.safetensors, or model-0000x-of-0000y.safetensors with
model.safetensors.index.json. Torch Linear weights are [out, in]; flax kernels are [in, out], so every
projection is transposed. Routed experts are stored one tensor per expert; we stack them [E, ...]. Layers
of one kind are stacked [L, ...] (nn.scan). The MTP module k is stored as layer num_hidden_layers + k
(enorm, hnorm, eh_proj, shared_head.norm, shared_head.head, embed_tokens, and a full decoder block); its
embed_tokens / shared_head.head are copies of the main ones and are written on save, checked on load.

FP8 checkpoints (DeepSeek's official weights) store float8_e4m3fn weights plus `weight_scale_inv`, one
float32 per 128x128 block (edge blocks partial); those are dequantised on load (w * scale per block), and
`save_checkpoint(..., dtype="fp8")` writes that format (the decoder blocks' Linear weights and eh_proj).

Loading streams tensor by tensor: one leaf at a time onto the device, or with `shardings` straight into
each process's own shards (dsv3.interop.hf_sharded), so a large checkpoint is never held twice. Saving writes one
tensor at a time.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from dsv3 import layout
from dsv3 import model as model_lib
from dsv3.config import ModelConfig, require_model_config
from dsv3.interop import hf_config, hf_sharded
from dsv3.interop import safetensors_io as sio
from dsv3.training import workdir as workdir_lib


CheckpointError = sio.CheckpointError  # missing tensor, wrong shape, damaged file, unexpected format


# Per-layer tensor names: (HF suffix, our path inside a Block, transpose?).
_ATTN = [("self_attn.q_proj.weight", "self_attn/q_proj/kernel", True),
         ("self_attn.q_a_proj.weight", "self_attn/q_a_proj/kernel", True),
         ("self_attn.q_a_layernorm.weight", "self_attn/q_a_layernorm/weight", False),
         ("self_attn.q_b_proj.weight", "self_attn/q_b_proj/kernel", True),
         ("self_attn.kv_a_proj_with_mqa.weight", "self_attn/kv_a_proj_with_mqa/kernel", True),
         ("self_attn.kv_a_layernorm.weight", "self_attn/kv_a_layernorm/weight", False),
         ("self_attn.kv_b_proj.weight", "self_attn/kv_b_proj/kernel", True),
         ("self_attn.o_proj.weight", "self_attn/o_proj/kernel", True),
         ("input_layernorm.weight", "input_layernorm/weight", False),
         ("post_attention_layernorm.weight", "post_attention_layernorm/weight", False)]
_DENSE = [(f"mlp.{p}.weight", f"mlp/{p}/kernel", True) for p in ("gate_proj", "up_proj", "down_proj")]
_MOE = ([("mlp.gate.weight", "mlp/gate", True)]
        + [(f"mlp.shared_experts.{p}.weight", f"mlp/shared_experts/{p}/kernel", True)
           for p in ("gate_proj", "up_proj", "down_proj")])
_EXPERT = [(f"mlp.experts.{{e}}.{p}.weight", f"mlp/experts_{p}", True) for p in ("gate_proj", "up_proj", "down_proj")]
_BIAS = ("mlp.gate.e_score_correction_bias", "/".join(layout.BIAS))
_MTP = [("enorm.weight", "enorm/weight", False), ("hnorm.weight", "hnorm/weight", False),
        ("eh_proj.weight", "eh_proj/kernel", True), ("shared_head.norm.weight", "shared_head_norm/weight", False)]


def tensor_map(cfg: ModelConfig) -> dict:
  """HF name -> (collection, path tuple, index tuple (stack/expert position), transpose)."""
  m = {"model.embed_tokens.weight": ("params", ("embed_tokens", "embedding"), (), False),
       "model.norm.weight": ("params", ("norm", "weight"), (), False)}
  if not cfg.tie_word_embeddings:
    m["lm_head.weight"] = ("params", ("lm_head",), (), True)

  def block(prefix, root, idx, moe):
    for hf, ours, t in _ATTN + (_MOE if moe else _DENSE):
      if ("q_proj" in hf and cfg.q_lora_rank is not None) or ("q_a" in hf or "q_b" in hf) and cfg.q_lora_rank is None:
        continue
      m[f"{prefix}.{hf}"] = ("params", root + tuple(ours.split("/")), idx, t)
    if moe:
      m[f"{prefix}.{_BIAS[0]}"] = ("routing", root + tuple(_BIAS[1].split("/")), idx, False)
      for e in range(cfg.n_routed_experts):
        for hf, ours, t in _EXPERT:
          m[f"{prefix}.{hf.format(e=e)}"] = ("params", root + tuple(ours.split("/")), idx + (e,), t)

  for i in range(cfg.num_hidden_layers):
    moe = layout.is_moe(cfg, i)
    stack, j = layout.stack_and_index(cfg, i)
    block(f"model.layers.{i}", (stack,), (j,), moe)
  for k in range(cfg.num_nextn_predict_layers):
    prefix, root = f"model.layers.{cfg.num_hidden_layers + k}", (layout.mtp_key(k),)
    for hf, ours, t in _MTP:
      m[f"{prefix}.{hf}"] = ("params", root + tuple(ours.split("/")), (), t)
    block(prefix, root + (layout.MTP_BLOCK,), (), cfg.num_moe_layers > 0)
  return m


def _mtp_copies(cfg: ModelConfig) -> dict:
  """MTP layers' stored copies of the shared embedding and head: HF name -> main HF name."""
  out = {}
  for k in range(cfg.num_nextn_predict_layers):
    p = f"model.layers.{cfg.num_hidden_layers + k}"
    out[f"{p}.embed_tokens.weight"] = "model.embed_tokens.weight"
    out[f"{p}.shared_head.head.weight"] = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
  return out


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _files(path: str) -> tuple[list[str], dict]:
  """The safetensors files of an HF dir, and the index's weight map (tensor -> file name; {} unsharded)."""
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint path {path!r} is not a directory; pass an HF checkpoint dir "
                          f"(config.json + *.safetensors)")
  index = os.path.join(path, "model.safetensors.index.json")
  weight_map = {}
  if os.path.exists(index):
    weight_map = _load_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index} has no 'weight_map' object; re-download or re-export the checkpoint")
    names = sorted(set(weight_map.values()))
  else:
    names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
  if not names:
    raise CheckpointError(f"{path}: no *.safetensors files found")
  for n in names:
    if not os.path.exists(os.path.join(path, n)):
      raise CheckpointError(f"{path}: shard {n} listed in the index is missing")
  return [os.path.join(path, n) for n in names], weight_map


def _load_json(file: str):
  """json.load, with errors that name the file."""
  try:
    with open(file) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{file} is not valid JSON ({e}); re-download or re-export the checkpoint") from e


def read_config(path: str) -> ModelConfig:
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise CheckpointError(f"{path}: config.json not found; an HF checkpoint dir holds config.json + safetensors")
  hf_dict = _load_json(cfg_path)
  if not isinstance(hf_dict, dict):
    raise CheckpointError(f"{cfg_path} holds a JSON {type(hf_dict).__name__}, not an object; re-download or "
                          f"re-export the checkpoint")
  return hf_config.from_hf_dict(hf_dict)


def load_checkpoint(path: str, dtype=None, config_overrides: Optional[dict] = None, *, shardings=None):
  """HF DeepSeek-V3-format dir -> (ModelConfig, variables {'params', 'routing'}).

  dtype=None keeps each tensor's stored float dtype (fp8 blocks dequantised to float32); else casts all.
  shardings: None loads every leaf whole onto the default device. Else a tree of jax.sharding.Sharding
  shaped like the variables (or a function of their abstract tree, e.g. `lambda a:
  sharding.param_shardings(mesh, a)`): each process reads only the slices of its own devices' shards.
  """
  cfg, source = open_checkpoint(path, dtype, config_overrides)
  if shardings is not None:
    return cfg, hf_sharded.load(source, shardings)
  variables: dict = {}
  for key, leaf in source.leaves.items():
    _set(variables, key, jnp.asarray(source.read(key)))
  return cfg, variables


def open_checkpoint(path: str, dtype=None, config_overrides: Optional[dict] = None):
  """(ModelConfig, hf_sharded.Source): an HF dir's variables, checked against its config.json (every tensor's
  name and shape; the MTP's stored copies of the embedding and head, each process a share of their rows),
  read later by slices (dsv3.interop.slices.place puts them into any target, e.g. a pipelined run's ranks)."""
  cfg = read_config(path)
  if config_overrides:
    cfg = cfg.replace(**config_overrides).validate()
  if dtype is not None:
    cfg = cfg.replace(param_dtype="bfloat16" if jnp.dtype(dtype) == jnp.bfloat16 else "float32")
  files, weight_map = _files(path)
  reader = sio.Reader(files)
  leaves = _plan(cfg, reader, files, weight_map, path, dtype)
  read = lambda name, index=None: _read(reader, name, index)
  _check_copies(cfg, reader, read, dtype, share=(jax.process_index(), jax.process_count()))
  return cfg, hf_sharded.Source(leaves, read, reader)


def _plan(cfg, reader, files, weight_map, path, dtype) -> dict:
  """Every variable leaf and the HF tensors it is made of, checked against the headers (nothing read yet)."""
  shapes = jax.eval_shape(lambda: model_lib.init(cfg, jax.random.key(0)))
  names, copies = tensor_map(cfg), _mtp_copies(cfg)
  for key in reader.names():
    if key.endswith("_scale_inv") or key in names or key in copies:
      continue
    if re.match(r"model\.layers\.\d+\.", key) or key.startswith(("model.", "lm_head")):
      raise CheckpointError(f"{reader.file(key)}: unexpected tensor {key!r} for this config "
                            f"(num_hidden_layers={cfg.num_hidden_layers}, "
                            f"num_nextn_predict_layers={cfg.num_nextn_predict_layers}); is config.json right?")
  missing = sorted(k for k in list(names) + list(copies) if k not in reader)
  if missing:
    where = (f"{os.path.join(path, weight_map[missing[0]])} (where model.safetensors.index.json puts it)"
             if missing[0] in weight_map else ", ".join(files))
    raise CheckpointError(f"missing tensor {missing[0]!r}" +
                          (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") +
                          f": not in {where}; re-download or re-export the checkpoint, or check that "
                          f"config.json matches it")
  leaves: dict = {}
  for key, (coll, ours, idx, transpose) in names.items():
    target = _get(shapes[coll], ours)
    expected = tuple(target.shape[len(idx):])
    stored = reader.shape(key)
    if (stored[::-1] if transpose else stored) != expected:
      raise CheckpointError(f"{reader.file(key)}: {key}: shape {stored} does not match the config (expected "
                            f"{expected[::-1] if transpose else expected}); is config.json right?")
    if (coll, ours) not in leaves:
      store = np.dtype(dtype) if dtype is not None else reader.dtype(key)
      leaves[(coll, ours)] = hf_sharded.Leaf(tuple(target.shape), store, {})
    leaves[(coll, ours)].parts[idx] = (key, transpose)
  return leaves


def _read(reader, name: str, index=None) -> np.ndarray:
  try:
    return reader.read(name, index)
  except CheckpointError:
    raise
  except Exception as e:  # noqa: BLE001 - numpy/OS errors on a damaged file
    raise CheckpointError(f"{reader.file(name)}: tensor {name!r} cannot be read ({type(e).__name__}: {e}); the "
                          f"file is damaged or truncated: re-download or re-export the checkpoint") from e


def _check_copies(cfg, reader, read, dtype, chunk_bytes: int = 64 << 20, share=(0, 1)) -> None:
  """The MTP's stored embedding/head must equal the shared ones (compared at the loaded precision, by rows);
  share=(i, n): only the i-th of n equal parts of the rows (each process its own part)."""
  for key, main in _mtp_copies(cfg).items():
    if reader.shape(key) != reader.shape(main):
      raise CheckpointError(f"{reader.file(key)}: {key} has shape {reader.shape(key)}, {main} "
                            f"{reader.shape(main)}; dsv3's MTP shares the main embedding and head")
    rows = reader.shape(key)[0]
    first, last = rows * share[0] // share[1], rows * (share[0] + 1) // share[1]
    step = max(1, chunk_bytes // max(1, 4 * int(np.prod(reader.shape(key)[1:]))))
    for r in range(first, last, step):
      a, b = (read(k, (slice(r, min(r + step, last)),)) for k in (key, main))
      if dtype is not None:
        a, b = a.astype(dtype), b.astype(dtype)
      if not np.allclose(a.astype(np.float32), b.astype(np.float32), atol=1e-6):
        raise CheckpointError(f"{key}: differs from {main}; dsv3's MTP shares the main embedding and head")


def save_checkpoint(config: ModelConfig, params, out_dir: str, max_shard_bytes: int = 4 << 30, dtype=None,
                    overwrite: bool = False) -> None:
  """Writes config.json + safetensors that transformers' AutoModelForCausalLM loads.

  dtype: None keeps each leaf's dtype; a float dtype casts all; "fp8" writes DeepSeek's serving format
  (float8_e4m3fn Linear weights of the decoder blocks and eh_proj, a float32 `weight_scale_inv` per
  128x128 block, `quantization_config` in config.json; embedding, head, norms, router keep their dtype).
  `out_dir` must be new or empty; with `overwrite`, it may also be a previous HF export, which is
  replaced. A training workdir, an orbax checkpoint or any other file there is never touched (a
  `workdir.WorkdirError` names it). Written to a temporary sibling directory first and swapped in, so a
  crash never leaves a half checkpoint behind. Tensors are produced and written one at a time.
  """
  fp8 = isinstance(dtype, str) and dtype.lower() == "fp8"
  if not fp8 and dtype is not None:
    try:
      dtype = np.dtype(dtype)
    except TypeError as e:
      raise ValueError(f"save_checkpoint: dtype={dtype!r} is neither a numpy/jax float dtype nor 'fp8'") from e
  out_dir = workdir_lib.check_destination(out_dir, overwrite, flag="out_dir (--dst)")
  cfg = require_model_config(config, "hf.save_checkpoint")
  variables = model_lib.as_variables(cfg, params)
  tmp = workdir_lib.staging_dir(out_dir)
  try:
    _write_hf(cfg, variables, tmp, max_shard_bytes, "fp8" if fp8 else dtype)
  except BaseException:
    for name in os.listdir(tmp):  # only what _write_hf wrote into the directory it created
      os.remove(os.path.join(tmp, name))
    os.rmdir(tmp)
    raise
  workdir_lib.install(tmp, out_dir)


def fp8_quantized(name: str) -> bool:
  """Whether DeepSeek's FP8 release stores HF tensor `name` as e4m3 + weight_scale_inv: the decoder blocks'
  Linear weights (attention, dense MLP, shared and routed experts) and the MTP's eh_proj; not the router."""
  return (name.startswith("model.layers.") and name.endswith(".weight")
          and re.search(r"_proj(_with_mqa)?\.weight$", name) is not None)


FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                           "weight_block_size": [128, 128]}


def _write_hf(cfg, variables, tmp: str, max_shard_bytes: int, dtype) -> None:
  """The files of `save_checkpoint`, written into the (new, empty) directory `tmp`."""
  names = tensor_map(cfg)
  sources = dict(names)
  for key, main in _mtp_copies(cfg).items():
    sources[key] = names[main]

  def value(name):
    coll, ours, idx, transpose = sources[name]
    leaf = _get(variables[coll], ours)
    v = np.asarray(leaf[idx] if idx else leaf)
    return v.T if transpose else v

  plan = []   # (name, dtype, shape, produce)
  for name, (coll, ours, idx, transpose) in sources.items():
    leaf = _get(variables[coll], ours)
    shape = tuple(leaf.shape[len(idx):])
    shape = shape[::-1] if transpose else shape
    if dtype == "fp8" and fp8_quantized(name):
      quant = {}            # one quantisation serves the weight and its scale, which are written back to back
      def q(name=name, quant=quant):
        quant["w"], quant["s"] = sio.quantize_fp8(value(name))
        return quant.pop("w")
      plan.append((name, np.dtype(sio.DTYPES["F8_E4M3"]), shape, q))
      plan.append((name + "_scale_inv", np.dtype(np.float32), (-(-shape[0] // 128), -(-shape[1] // 128)),
                   lambda quant=quant: quant.pop("s")))
    else:
      store = np.dtype(leaf.dtype) if dtype in (None, "fp8") else dtype
      plan.append((name, store, shape, lambda name=name, store=store: value(name).astype(store)))
  shards, size = [[]], 0
  for entry in plan:
    n = int(np.prod(entry[2])) * entry[1].itemsize
    pair = entry[0].endswith("_scale_inv")    # keep a scale in its weight's file
    if shards[-1] and size + n > max_shard_bytes and not pair:
      shards.append([])
      size = 0
    shards[-1].append(entry)
    size += n
  files = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  total = sum(sio.write_file(os.path.join(tmp, f), s, metadata={"format": "pt"}) for f, s in zip(files, shards))
  if len(shards) > 1:
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total},
                 "weight_map": {e[0]: fn for fn, s in zip(files, shards) for e in s}}, f, indent=1)
  hf_cfg = hf_config.to_hf_dict(cfg)
  hf_cfg["torch_dtype"] = str(plan[0][1])         # the embedding's: never quantised
  if dtype == "fp8":
    hf_cfg["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(hf_cfg, f, indent=1)
