"""Corpora: which documents a `data.source` names, in which order and split, and their tokenization.

`resolve_corpus(source, format, field, max_files)` expands paths / globs / directories (or 'stdlib', the
running Python's standard-library sources) into a `Corpus`: sorted files, the stable document-name prefixes
that decide each document's split, and a fingerprint that changes when any file does. `iter_documents`
yields (name, text) per non-empty document; a document is held out for validation when the stable hash of
its name is below `validation_fraction` (`is_validation`). `encode_documents` turns documents into the
`<|bos|> text <|eos|>` train / validation streams; `load_tokenizer` resolves `data.tokenizer`.

This module needs neither grain nor jax, so tokenizing worker processes (dsv3.data.prepare) start quickly.
Every bad setting raises DataError (a ValueError) whose message names the config field and the fix.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import itertools
import json
import os
import pathlib
import sys
import sysconfig
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import pyarrow.parquet as pq

from dsv3.config import ConfigError
from dsv3.data import tokenizer as tokenizer_lib

FORMATS = ("auto", "text", "jsonl", "parquet", "bin", "npy")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet",
               ".bin": "bin", ".npy": "npy"}
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_BPE_CHARS = 16_000_000          # caps BPE training text (a few seconds on one core)
_ENCODE_CHARS = 4_000_000        # text tokenized per encode_batch call: bounds memory on big corpora
# The default data.validation_fraction (and `prepare --validation_fraction`): on the stdlib corpus it holds
# out 78 files, ~278K tokens with the 4096-entry BPE (Python 3.11), enough for a stable validation loss.
VALIDATION_FRACTION = 0.1
# The built-in BPE's held-out share, pinned: it is what the cached tokenizers (and every checkpoint trained
# with them) were made with. Documents the larger default split holds out were seen by the BPE's merge
# counts only, never by a model.
_BPE_HELD_OUT = 0.02


class DataError(ConfigError):
  """A data setting is wrong; the message names the config field and the fix."""



def unit_hash(key: str) -> float:
  """A stable (machine- and run-independent) hash of `key` in [0, 1)."""
  return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2.0 ** 64


def digest(obj) -> str:
  """A short, stable content key of a JSON-able object (cache keys and fingerprints)."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]



# ------------------------------------------------------------------------------------------------
# Corpus: which files, in which format, and a fingerprint that changes when any of them does.

@dataclasses.dataclass
class Corpus:
  files: list                    # pathlib.Paths, sorted
  names: list                    # stable document-name prefixes (relative paths) used for the split
  format: str
  field: str
  fingerprint: str


def check_max_files(max_files) -> None:
  """DataError naming data.max_files unless it is an integer >= 0."""
  if not isinstance(max_files, (int, np.integer)) or isinstance(max_files, bool) or max_files < 0:
    raise DataError(f"data.max_files: must be an integer >= 0 (0 = every file), got {max_files!r}; set it to "
                    f"the number of files to use, or 0")


def stdlib_corpus(max_files: int = 0) -> Corpus:
  """The running Python's standard-library sources: real text present on every machine, no download."""
  check_max_files(max_files)
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = []
  for d, dirs, names in os.walk(root):
    # Pruning in place keeps os.walk out of site-packages, which can be far bigger than the stdlib.
    dirs[:] = [x for x in dirs if x not in _STDLIB_SKIP and not x.startswith(".")]
    files += [pathlib.Path(d, f) for f in names if f.endswith(".py")]
  files.sort(key=lambda p: p.relative_to(root).as_posix())
  if max_files:
    files = files[:max_files]
  names = [p.relative_to(root).as_posix() for p in files]
  # Sizes, not mtimes: identical stdlibs on different machines share one cache entry.
  fp = digest(["stdlib", sys.version_info[:3], [(n, p.stat().st_size) for n, p in zip(names, files)]])
  return Corpus(files, names, "text", "text", fp)


def resolve_corpus(source: str, fmt: str = "auto", field: str = "text", max_files: int = 0) -> Corpus:
  """Expands `source` (paths, globs, directories, comma-separated) and settles the format."""
  if fmt not in FORMATS:
    raise DataError(f"data.format: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
  check_max_files(max_files)
  if not isinstance(source, str) or not source.strip():
    raise DataError(f"data.source: must be 'stdlib' or paths / globs / directories, got {source!r}")
  if source == "stdlib":
    if fmt not in ("auto", "text"):
      raise DataError(f"data.format: the stdlib corpus is text, got {fmt!r}; use 'auto' or 'text'")
    return stdlib_corpus(max_files)
  files = []
  for part in [s.strip() for s in str(source).split(",") if s.strip()]:
    part = os.path.expanduser(part)
    if glob.has_magic(part):
      found = sorted(p for p in glob.glob(part, recursive=True) if os.path.isfile(p))
      if not found:
        raise DataError(f"data.source: no files match {part!r}; point it at existing "
                        f"text/jsonl/parquet/bin/npy files")
    elif os.path.isdir(part):
      found = sorted(str(p) for p in pathlib.Path(part).rglob("*") if p.is_file()
                     and not any(x.startswith(".") for x in p.relative_to(part).parts))
      if not found:
        raise DataError(f"data.source: directory {part!r} holds no files; point it at text/jsonl/parquet/"
                        f"bin/npy files")
    elif os.path.isfile(part):
      found = [part]
    else:
      raise DataError(f"data.source: {part!r} does not exist; give existing files, a glob or a directory, "
                      f"or 'stdlib' for the built-in corpus")
    files += [f for f in found if f not in files]
  if not files:
    raise DataError(f"data.source: {source!r} names no files; give paths, globs or 'stdlib'")
  if max_files:
    files = files[:max_files]
  paths = [pathlib.Path(f).resolve() for f in files]
  if fmt == "auto":
    kinds = sorted({_EXTENSIONS.get(p.suffix.lower(), "text") for p in paths})
    if len(kinds) > 1:
      raise DataError(f"data.format: data.source mixes formats {kinds}; narrow data.source to one kind of "
                      f"file or set data.format explicitly")
    fmt = kinds[0]
  # Names relative to the files' common directory keep the split stable if the data moves.
  common = os.path.commonpath([str(p.parent) for p in paths])
  names = [os.path.relpath(p, common) for p in paths]
  fp = digest([fmt, field, [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]])
  return Corpus(paths, names, fmt, field, fp)


def _decoded(path, data: bytes, offset: int = 0) -> str:
  """`data` (the bytes of `path` from `offset`) as UTF-8 text; DataError naming the file when it is not text
  (a binary file, an executable, another encoding), which would otherwise train as replacement characters."""
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"data.source: {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                    f"{offset + e.start}); remove it from data.source (narrow the glob or directory) or convert "
                    f"it to UTF-8; token ids go in .bin/.npy files") from None
  if "\0" in text:
    raise DataError(f"data.source: {path} holds a NUL byte (offset {offset + data.index(0)}), so it is binary, "
                    f"not text; remove it from data.source (narrow the glob or directory); token ids go in "
                    f".bin/.npy files")
  return text


def _lines(path) -> Iterator[str]:
  """The lines of a jsonl file, each checked as `_decoded` checks a whole file."""
  offset = 0
  with open(path, "rb") as f:
    for raw in f:
      yield _decoded(path, raw, offset)
      offset += len(raw)


def iter_documents(corpus: Corpus) -> Iterator[tuple[str, str]]:
  """Yields (stable name, text) for each non-empty document of a text/jsonl/parquet corpus. A text or jsonl
  file that is not UTF-8 text raises DataError naming it (`_decoded`)."""
  field = corpus.field
  for path, name in zip(corpus.files, corpus.names):
    if corpus.format == "text":
      text = _decoded(path, path.read_bytes())
      if text.strip():
        yield name, text
    elif corpus.format == "jsonl":
      for i, line in enumerate(_lines(path)):
        if not line.strip():
          continue
        try:
          obj = json.loads(line)
        except ValueError as e:
          raise DataError(f"data.source: {path}:{i + 1} is not valid JSON ({e}); jsonl files need one JSON "
                          f"object per line (or set data.format='text')") from None
        if not isinstance(obj, dict) or field not in obj:
          keys = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
          raise DataError(f"data.field: {path}:{i + 1} has no field {field!r} (it has {keys}); set "
                          f"data.field to the key that holds the document text")
        if isinstance(obj[field], str) and obj[field].strip():
          yield f"{name}:{i}", obj[field]
    else:
      pf = pq.ParquetFile(path)
      if field not in pf.schema_arrow.names:
        raise DataError(f"data.field: {path} has no column {field!r} (columns: {pf.schema_arrow.names}); set "
                        f"data.field to the column that holds the document text")
      row = 0
      for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for text in batch.column(0).to_pylist():
          if isinstance(text, str) and text.strip():
            yield f"{name}:{row}", text
          row += 1



# ------------------------------------------------------------------------------------------------
# Tokenization.

def is_validation(name: str, fraction: float) -> bool:
  """A document's split: held out when the stable hash of its name is below `fraction`."""
  return fraction > 0 and unit_hash(name) < fraction


def token_dtype(vocab_size: int) -> np.dtype:
  """The narrowest stored token dtype for a vocabulary: uint16 up to 65536 entries, else uint32."""
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def encode_documents(docs: Iterable[tuple[str, str]], tok: tokenizer_lib.Tokenizer,
                     fraction: float) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
  """(name, text) documents -> (train, validation) streams of `<|bos|> doc <|eos|>` in document order, and
  the (train, validation) document counts; a document's split is `is_validation(name, fraction)`."""
  dtype = token_dtype(tok.vocab_size)
  parts, buf, chars, ndocs = ([[], []], [[], []], [0, 0], [0, 0])

  def flush(v):
    if buf[v]:
      ids = tok.encode_batch(buf[v], bos=True, eos=True)
      parts[v].append(np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype))
      buf[v], chars[v] = [], 0

  for name, text in docs:
    v = int(is_validation(name, fraction))
    buf[v].append(text)
    chars[v] += len(text)
    ndocs[v] += 1
    if chars[v] > _ENCODE_CHARS:
      flush(v)
  flush(0)
  flush(1)
  train, val = (np.concatenate(p) if p else np.zeros([0], dtype) for p in parts)
  return train, val, (ndocs[0], ndocs[1])


def tail_split(ndocs: tuple[int, int], fraction: float) -> bool:
  """Whether the split by name failed (one side got no document, e.g. one big file), so that the
  validation split is instead the tail of the whole stream, `tail_cut(len(stream), fraction)` onwards."""
  return fraction > 0 and (ndocs[0] == 0 or ndocs[1] == 0)


def tail_cut(length: int, fraction: float) -> int:
  return length - max(1, int(length * fraction))


def _bpe_texts(corpus: Corpus, fraction: float) -> Callable[[], Iterator[str]]:
  """Training documents in hash order (a deterministic, well-mixed subset) up to _BPE_CHARS characters."""
  def texts():
    chars = 0
    order = sorted(range(len(corpus.files)), key=lambda i: unit_hash(corpus.names[i]))
    sub = dataclasses.replace(corpus, files=[corpus.files[i] for i in order],
                              names=[corpus.names[i] for i in order])
    for name, text in iter_documents(sub):
      if is_validation(name, fraction):
        continue
      yield text
      chars += len(text)
      if chars >= _BPE_CHARS:
        return
  return texts


def load_tokenizer(data_cfg, corpus: Optional[Corpus] = None,
                   vocab_size: Optional[int] = None) -> tokenizer_lib.Tokenizer:
  """The tokenizer `data_cfg.tokenizer` names; '' trains (once) on the stdlib corpus' training split.

  `data_cfg` needs the fields tokenizer, validation_fraction and cache_dir; a trained BPE ('' or 'data') has
  `vocab_size` entries (the model's)."""
  spec, cache = data_cfg.tokenizer, data_cfg.cache_dir
  if spec in ("", "bpe", "data") and vocab_size is None:
    raise DataError(f"model.vocab_size: data.tokenizer={spec!r} trains a BPE of model.vocab_size entries; set "
                    f"config.model.vocab_size (or give data.tokenizer a tokenizer.json)")
  if spec in ("", "bpe"):
    # Always the full stdlib with one fixed split, so every experiment shares one tokenizer per vocab size.
    std = stdlib_corpus()
    return tokenizer_lib.load_or_train("", vocab_size, _bpe_texts(std, _BPE_HELD_OUT),
                                       digest([std.fingerprint, _BPE_CHARS]), cache)
  if spec == "data":
    if corpus is None or corpus.format in ("bin", "npy"):
      raise DataError("data.tokenizer: 'data' trains a BPE on data.source, which must then be text/jsonl/"
                      "parquet; use '' or a tokenizer.json path")
    fp = digest([corpus.fingerprint, data_cfg.validation_fraction, _BPE_CHARS])
    return tokenizer_lib.load_or_train("", vocab_size, _bpe_texts(corpus, data_cfg.validation_fraction),
                                       fp, cache)
  return tokenizer_lib.load(spec)
