"""HF checkpoints in the DeepSeek-V3 format (what DeepSeek, Moonlight and Kimi-K2 ship), both directions.

Layout on disk: config.json + model.safetensors, or model-0000x-of-0000y.safetensors with
model.safetensors.index.json. Torch Linear weights are [out, in]; flax kernels are [in, out], so every
projection is transposed. Routed experts are stored one tensor per expert; we stack them [E, ...]. Layers
of one kind are stacked [L, ...] (nn.scan). The MTP module k is stored as layer num_hidden_layers + k
(enorm, hnorm, eh_proj, shared_head.norm, shared_head.head, embed_tokens, and a full decoder block); its
embed_tokens / shared_head.head are copies of the main ones and are written on save, checked on load.

FP8 checkpoints (DeepSeek's official weights) store float8_e4m3fn weights plus `weight_scale_inv`, one
float32 per 128x128 block (edge blocks partial); those are dequantised on load (w * scale per block).

Loading streams tensor by tensor into preallocated host arrays, so a large checkpoint is never held twice.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from dsv3 import model as model_lib
from dsv3 import workdir as workdir_lib
from dsv3.config import ModelConfig


class CheckpointError(ValueError):
  """The checkpoint is missing a tensor, has a wrong shape, or is not in the expected format."""


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
_BIAS = ("mlp.gate.e_score_correction_bias", "mlp/e_score_correction_bias")
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
    moe = i >= cfg.first_k_dense_replace
    stack, j = ("moe_layers", i - cfg.first_k_dense_replace) if moe else ("dense_layers", i)
    block(f"model.layers.{i}", (stack,), (j,), moe)
  for k in range(cfg.num_nextn_predict_layers):
    prefix, root = f"model.layers.{cfg.num_hidden_layers + k}", (f"mtp_{k}",)
    for hf, ours, t in _MTP:
      m[f"{prefix}.{hf}"] = ("params", root + tuple(ours.split("/")), (), t)
    block(prefix, root + ("block",), (), cfg.num_moe_layers > 0)
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


def _dequantize_fp8(w: np.ndarray, scale_inv: np.ndarray, name: str) -> np.ndarray:
  """w [out, in] float8 with scale_inv [ceil(out/128), ceil(in/128)] -> float32."""
  out_dim, in_dim = w.shape
  expected = (-(-out_dim // 128), -(-in_dim // 128))
  if scale_inv.shape != expected:
    raise CheckpointError(f"{name}_scale_inv: shape {scale_inv.shape}, expected {expected} for 128x128 blocks "
                          f"of a {w.shape} weight")
  scale = np.repeat(np.repeat(scale_inv.astype(np.float32), 128, 0), 128, 1)[:out_dim, :in_dim]
  return w.astype(np.float32) * scale


def read_config(path: str) -> ModelConfig:
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise CheckpointError(f"{path}: config.json not found; an HF checkpoint dir holds config.json + safetensors")
  hf_dict = _load_json(cfg_path)
  if not isinstance(hf_dict, dict):
    raise CheckpointError(f"{cfg_path} holds a JSON {type(hf_dict).__name__}, not an object; re-download or "
                          f"re-export the checkpoint")
  return ModelConfig.from_hf_dict(hf_dict)


def load_checkpoint(path: str, dtype=None, config_overrides: Optional[dict] = None):
  """HF DeepSeek-V3-format dir -> (ModelConfig, variables {'params', 'routing'}).

  dtype=None keeps each tensor's stored float dtype (fp8 blocks dequantised to float32); else casts all.
  """
  cfg = read_config(path)
  if config_overrides:
    cfg = cfg.replace(**config_overrides).validate()
  if dtype is not None:
    cfg = cfg.replace(param_dtype="bfloat16" if jnp.dtype(dtype) == jnp.bfloat16 else "float32")
  shapes = jax.eval_shape(lambda: model_lib.init(cfg, jax.random.key(0)))
  names = tensor_map(cfg)
  copies = _mtp_copies(cfg)
  buffers: dict = {}                            # (collection, path) -> np array, allocated on first use
  filled: set = set()
  copy_values: dict = {}

  files, weight_map = _files(path)
  for file in files:
    header = _header(file)
    keys = sorted(header[0])
    scales = {k[: -len("_scale_inv")] for k in keys if k.endswith("_scale_inv")}
    for key in keys:
      if key.endswith("_scale_inv"):
        continue
      if key not in names and key not in copies:
        if re.match(r"model\.layers\.\d+\.", key) or key.startswith(("model.", "lm_head")):
          raise CheckpointError(f"{file}: unexpected tensor {key!r} for this config "
                                f"(num_hidden_layers={cfg.num_hidden_layers}, "
                                f"num_nextn_predict_layers={cfg.num_nextn_predict_layers}); is config.json right?")
        continue
      try:
        value = _read(file, key, header, key in scales)
      except CheckpointError:
        raise
      except Exception as e:  # noqa: BLE001 - safetensors/numpy errors on a damaged file
        raise CheckpointError(f"{file}: tensor {key!r} cannot be read ({type(e).__name__}: {e}); the file is "
                              f"damaged or truncated: re-download or re-export the checkpoint") from e
      if key in copies:
        copy_values[key] = value
        continue
      coll, ours, idx, transpose = names[key]
      if transpose:
        value = value.T
      target = _get(shapes[coll], ours)
      expected = target.shape[len(idx):]
      if tuple(value.shape) != tuple(expected):
        raise CheckpointError(f"{key}: shape {tuple(value.T.shape if transpose else value.shape)} does not match "
                              f"the config (expected {tuple(expected[::-1]) if transpose else tuple(expected)})")
      buf_key = (coll, ours)
      if buf_key not in buffers:
        store = np.dtype(dtype) if dtype is not None else value.dtype
        buffers[buf_key] = np.zeros(target.shape, store)
      buffers[buf_key][idx] = value.astype(buffers[buf_key].dtype)
      filled.add(key)

  missing = sorted(set(names) - filled)
  if missing:
    where = (f"{os.path.join(path, weight_map[missing[0]])} (where model.safetensors.index.json puts it)"
             if missing[0] in weight_map else ", ".join(files))
    raise CheckpointError(f"missing tensor {missing[0]!r}" +
                          (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") +
                          f": not in {where}; re-download or re-export the checkpoint, or check that "
                          f"config.json matches it")
  variables: dict = {}
  for (coll, ours), buf in buffers.items():
    _set(variables.setdefault(coll, {}), ours, jnp.asarray(buf))
  buffers.clear()
  for key, main in copies.items():           # the MTP's stored embedding/head must be the shared ones
    if key in copy_values:
      coll, ours, _, t = names[main] if main in names else ("params", ("embed_tokens", "embedding"), (), False)
      shared = np.asarray(_get(variables[coll], ours))
      stored = copy_values[key].astype(shared.dtype).astype(np.float32)   # compare at the loaded precision
      if not np.allclose(stored, (shared.T if t else shared).astype(np.float32), atol=1e-6):
        raise CheckpointError(f"{key}: differs from {main}; dsv3's MTP shares the main embedding and head")
  return cfg, variables


def _header(file: str) -> tuple[dict, int]:
  """The safetensors header (name -> dtype, shape, data_offsets) and where the data starts."""
  def bad(why):
    return CheckpointError(f"{file} is not a valid safetensors file ({why}); it is damaged or truncated: "
                           f"re-download or re-export the checkpoint")
  size = os.path.getsize(file)
  with open(file, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    if size < 8 or 8 + n > size:
      raise bad(f"header of {n} bytes, file of {size} bytes")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise bad(f"header is not JSON: {e}") from e
  if not isinstance(header, dict):
    raise bad("header is not a JSON object")
  header.pop("__metadata__", None)
  for key, entry in header.items():
    try:
      begin, end = entry["data_offsets"]
    except (TypeError, KeyError, ValueError):
      raise bad(f"tensor {key!r} has no data_offsets") from None
    if not (isinstance(end, int) and isinstance(begin, int)) or 8 + n + end > size:
      raise bad(f"tensor {key!r} extends past the end of the file")
  return header, 8 + n


def _read(file: str, key: str, header: tuple, fp8_scaled: bool) -> np.ndarray:
  entries, data_start = header
  if not entries[key]["dtype"].startswith("F8"):
    with safe_open(file, framework="numpy") as f:
      return f.get_tensor(key)
  # numpy has no float8; safetensors' readers go through numpy, so read the bytes with ml_dtypes' dtype.
  w = _read_raw(file, entries[key], data_start)
  if not fp8_scaled:
    return w.astype(np.float32)
  return _dequantize_fp8(w, _read_raw(file, entries[key + "_scale_inv"], data_start), key)


def _read_raw(file: str, entry: dict, data_start: int) -> np.ndarray:
  import ml_dtypes
  kinds = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "F32": np.float32,
           "BF16": ml_dtypes.bfloat16, "F16": np.float16}
  if entry["dtype"] not in kinds:
    raise CheckpointError(f"{file}: unsupported dtype {entry['dtype']}")
  begin, end = entry["data_offsets"]
  with open(file, "rb") as f:
    f.seek(data_start + begin)
    return np.frombuffer(f.read(end - begin), kinds[entry["dtype"]]).reshape(entry["shape"])


def save_checkpoint(config, params, out_dir: str, max_shard_bytes: int = 4 << 30, dtype=None,
                    overwrite: bool = False) -> None:
  """Writes config.json + safetensors that transformers' AutoModelForCausalLM loads.

  `out_dir` must be new or empty; with `overwrite`, it may also be a previous HF export, which is
  replaced. A training workdir, an orbax checkpoint or any other file there is never touched (a
  `workdir.WorkdirError` names it). Written to a temporary sibling directory first and swapped in, so a
  crash never leaves a half checkpoint behind.
  """
  out_dir = workdir_lib.check_destination(out_dir, overwrite, flag="out_dir (--dst)")
  cfg = ModelConfig.from_any(config)
  variables = model_lib._variables(cfg, params)
  names = tensor_map(cfg)
  tmp = workdir_lib.staging_dir(out_dir)
  try:
    _write_hf(cfg, variables, names, tmp, max_shard_bytes, dtype)
  except BaseException:
    for name in os.listdir(tmp):  # only what _write_hf wrote into the directory it created
      os.remove(os.path.join(tmp, name))
    os.rmdir(tmp)
    raise
  workdir_lib.install(tmp, out_dir)


def _write_hf(cfg, variables, names, tmp: str, max_shard_bytes: int, dtype) -> None:
  """The files of `save_checkpoint`, written into the (new, empty) directory `tmp`."""
  from safetensors.numpy import save_file
  hf_cfg = cfg.to_hf_dict()
  store = np.dtype(dtype) if dtype is not None else None
  shard, shard_bytes, shards = {}, 0, []

  def emit(name, arr):
    nonlocal shard, shard_bytes
    arr = np.ascontiguousarray(arr if store is None else arr.astype(store))
    if shard and shard_bytes + arr.nbytes > max_shard_bytes:
      shards.append(shard)
      shard, shard_bytes = {}, 0
    shard[name] = arr
    shard_bytes += arr.nbytes

  for name, (coll, ours, idx, transpose) in names.items():
    value = np.asarray(_get(variables[coll], ours)[idx] if idx else _get(variables[coll], ours))
    emit(name, value.T if transpose else value)
  for key, main in _mtp_copies(cfg).items():
    coll, ours, _, t = names.get(main, ("params", ("embed_tokens", "embedding"), (), False))
    value = np.asarray(_get(variables[coll], ours))
    emit(key, value.T if t else value)
  shards.append(shard)
  hf_cfg["torch_dtype"] = str(next(iter(shards[0].values())).dtype)
  if len(shards) == 1:
    save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
  else:
    weight_map = {}
    for i, s in enumerate(shards):
      fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(s, os.path.join(tmp, fname), metadata={"format": "pt"})
      weight_map.update({k: fname for k in s})
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": sum(a.nbytes for s in shards for a in s.values())},
                 "weight_map": weight_map}, f, indent=1)
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(hf_cfg, f, indent=1)
