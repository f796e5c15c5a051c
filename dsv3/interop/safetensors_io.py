"""safetensors files read by slice and written tensor by tensor, and DeepSeek's FP8 block format.

Reading goes through the raw header (name -> dtype, shape, data_offsets) and `os.pread` of just the rows a
slice covers, so a process reads only the bytes of its own shards and never maps a whole file. numpy has no
float8/bfloat16, so those go through ml_dtypes.

FP8 (DeepSeek-V3's release): a float8_e4m3fn weight [out, in] plus `<name>_scale_inv`, float32
[ceil(out/128), ceil(in/128)], one per 128x128 block (edge blocks partial); w ≈ q * scale_inv.
"""
from __future__ import annotations

import collections
import json
import math
import os
from typing import Callable, Iterable, Optional

import ml_dtypes
import numpy as np

BLOCK = 128
E4M3_MAX = 448.0
DTYPES = {"F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
          "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
          "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
          "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_)}
_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
  """The checkpoint is missing a tensor, has a wrong shape, or is not in the expected format."""


def read_header(file: str) -> tuple[dict, int]:
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
      shape, dtype = tuple(entry["shape"]), entry["dtype"]
    except (TypeError, KeyError, ValueError):
      raise bad(f"tensor {key!r} has no dtype/shape/data_offsets") from None
    if not (isinstance(end, int) and isinstance(begin, int)) or 8 + n + end > size:
      raise bad(f"tensor {key!r} extends past the end of the file")
    if dtype in DTYPES and end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
      raise bad(f"tensor {key!r}: {end - begin} bytes for a {dtype} {list(shape)}")
  return header, 8 + n


def _slices(index, shape) -> tuple:
  index = tuple(index or ()) + (slice(None),) * (len(shape) - len(tuple(index or ())))
  out = []
  for s, n in zip(index, shape):
    start, stop, step = s.indices(n)
    if step != 1:
      raise ValueError(f"strided slice {s} is not supported")
    out.append(slice(start, max(start, stop)))
  return tuple(out)


class Reader:
  """The tensors of some safetensors files, read by slice: only the rows (first axis) a slice covers.

  `bytes_read` and `tensors_read` (name -> count) say what was read, for tests and memory budgets.
  FP8 weights with a `_scale_inv` sibling are dequantised to float32 per slice, reading only the
  scale blocks the slice touches; FP8 without scales is widened to float32.
  """

  def __init__(self, files: Iterable[str]):
    self.where: dict = {}
    for file in files:
      header, start = read_header(file)
      for key, entry in header.items():
        self.where[key] = (file, entry, start)
    self.bytes_read = 0
    self.tensors_read: collections.Counter = collections.Counter()

  def __contains__(self, name) -> bool:
    return name in self.where

  def names(self) -> list[str]:
    return sorted(self.where)

  def file(self, name: str) -> str:
    return self.where[name][0]

  def shape(self, name: str) -> tuple:
    return tuple(self.where[name][1]["shape"])

  def stored_dtype(self, name: str) -> str:
    return self.where[name][1]["dtype"]

  def dtype(self, name: str) -> np.dtype:
    """The dtype `read` returns: the stored one, float32 for FP8."""
    kind = self.stored_dtype(name)
    if kind not in DTYPES:
      raise CheckpointError(f"{self.file(name)}: tensor {name!r} has unsupported dtype {kind}")
    return np.dtype(np.float32) if kind.startswith("F8") else DTYPES[kind]

  def raw(self, name: str, index=None) -> np.ndarray:
    """The stored values of `name`[index] (index: slices with step 1, one per axis or fewer)."""
    file, entry, start = self.where[name]
    shape, dtype = tuple(entry["shape"]), DTYPES.get(entry["dtype"])
    if dtype is None:
      raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {entry['dtype']}")
    idx = _slices(index, shape)
    if not shape:
      rows, row_bytes, first = 1, dtype.itemsize, 0
    else:
      row_bytes = math.prod(shape[1:]) * dtype.itemsize
      first, rows = idx[0].start, idx[0].stop - idx[0].start
    n = rows * row_bytes
    with open(file, "rb") as f:
      data = os.pread(f.fileno(), n, start + entry["data_offsets"][0] + first * row_bytes) if n else b""
    if len(data) != n:
      raise CheckpointError(f"{file}: tensor {name!r} is truncated; re-download or re-export the checkpoint")
    self.bytes_read += n
    self.tensors_read[name] += 1
    arr = np.frombuffer(data, dtype).reshape((rows,) + shape[1:] if shape else ())
    return arr[(slice(None),) + idx[1:]] if shape else arr

  def read(self, name: str, index=None) -> np.ndarray:
    """`name`[index] as `dtype(name)`: FP8 blocks dequantised (w * scale_inv) for just this slice."""
    w = self.raw(name, index)
    if not self.stored_dtype(name).startswith("F8"):
      return w
    if name + "_scale_inv" not in self.where:
      return w.astype(np.float32)
    shape = self.shape(name)
    scale_name = name + "_scale_inv"
    expected = (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK)) if len(shape) == 2 else None
    if self.shape(scale_name) != expected:
      raise CheckpointError(f"{self.file(scale_name)}: {scale_name} has shape {self.shape(scale_name)}, "
                             f"expected {expected} (one per 128x128 block of the {shape} weight)")
    rows, cols = _slices(index, shape)
    b = (slice(rows.start // BLOCK, -(-rows.stop // BLOCK)), slice(cols.start // BLOCK, -(-cols.stop // BLOCK)))
    scale = self.raw(scale_name, b).astype(np.float32)
    scale = np.repeat(np.repeat(scale, BLOCK, 0), BLOCK, 1)
    r0, c0 = b[0].start * BLOCK, b[1].start * BLOCK
    return w.astype(np.float32) * scale[rows.start - r0: rows.stop - r0, cols.start - c0: cols.stop - c0]


def quantize_fp8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """w [out, in] -> (float8_e4m3fn q, float32 scale_inv [ceil(out/128), ceil(in/128)]), w ≈ q * scale_inv.

  scale_inv = amax/448 per 128x128 block (DeepSeek's rule; an all-zero block gets 1).
  """
  w = np.asarray(w, np.float32)
  out_dim, in_dim = w.shape
  rows, cols = -(-out_dim // BLOCK), -(-in_dim // BLOCK)
  pad = np.zeros((rows * BLOCK, cols * BLOCK), np.float32)
  pad[:out_dim, :in_dim] = np.abs(w)
  amax = pad.reshape(rows, BLOCK, cols, BLOCK).max((1, 3))
  del pad
  scale = np.where(amax > 0, amax / E4M3_MAX, 1.0).astype(np.float32)
  full = np.repeat(np.repeat(scale, BLOCK, 0), BLOCK, 1)[:out_dim, :in_dim]
  q = np.clip(w / full, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
  return q, scale


def write_file(path: str, tensors: list[tuple[str, np.dtype, tuple, Callable[[], np.ndarray]]],
               metadata: Optional[dict] = None) -> int:
  """Writes a safetensors file from (name, dtype, shape, produce) entries, producing one tensor at a time.

  Returns the bytes of tensor data written. `produce()` must return an array of exactly that dtype/shape.
  """
  header, offset = {}, 0
  if metadata:
    header["__metadata__"] = metadata
  for name, dtype, shape, _ in tensors:
    n = math.prod(shape) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + n]}
    offset += n
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for name, dtype, shape, produce in tensors:
      arr = np.ascontiguousarray(produce())
      if arr.dtype != np.dtype(dtype) or tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{path}: tensor {name!r} is {arr.dtype} {arr.shape}, planned {np.dtype(dtype)} {shape}")
      f.write(arr.reshape(-1).view(np.uint8).data)
      del arr
  return offset
