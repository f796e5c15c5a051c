"""Offline data preparation: a corpus tokenized once, in parallel, into token streams the trainer memory-maps.

  python -m dsv3.data prepare --source=SRC --tokenizer=TOKENIZER.json --out=DIR [--workers=N]
  python -m dsv3.train --config=configs/tiny.py --config.data.source=DIR    # starts in seconds, any host

`--source` takes what `data.source` takes ('' = the stdlib corpus), `--tokenizer` a tokenizer.json (or a
directory holding one; '' = the project's default BPE for `--vocab_size`). The files are cut into chunks of
`--chunk_files` consecutive files, tokenized by a pool of `--workers` processes. A document goes to the
validation split by the hash of its name, as in training from raw text, and the chunk streams concatenated
in order are exactly the streams the trainer builds from raw text, so training from DIR reads the same
tokens as training from SRC with the same tokenizer, seed and validation fraction.

DIR holds only what this module writes; each file is written to a temporary name and renamed into place:
  prepare.json                      the job (settings and fingerprints); written first, it marks DIR as ours
  tokenizer.json, tokenizer_config.json   the tokenizer (HF layout; data.tokenizer=DIR loads it too)
  chunks/NNNNN.{train,val}.npy      chunk N's train / validation tokens (1-D, dtype from the vocabulary size)
  chunks/NNNNN.json                 chunk N's done record (token and document counts), written after its .npy
  manifest.json                     written last, when every chunk is done: the dataset (MANIFEST_KEYS)
A re-run after an interruption (even kill -9) keeps the chunks already done and writes the same bytes as
an uninterrupted run; a finished DIR is reported up to date. A DIR holding anything else, or the preparation
of another corpus / tokenizer / settings, is refused, and nothing in it is deleted.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import pathlib
import re
from typing import Optional

import ml_collections
import numpy as np
import tqdm
from absl import flags

from dsv3.config import ConfigError
from dsv3.data import corpus as corpus_lib
from dsv3.data import tokenizer as tokenizer_lib
from dsv3.data.corpus import DataError, digest

FORMAT, FORMAT_VERSION = "dsv3.prepared", 1
MANIFEST, JOB, CHUNKS = "manifest.json", "prepare.json", "chunks"
MANIFEST_KEYS = ("format", "format_version", "source", "source_format", "field", "max_files",
                 "source_fingerprint", "files", "tokenizer", "vocab_size", "dtype", "validation_fraction",
                 "split", "tokens", "documents", "chunks")
_OURS = r"prepare\.json|manifest\.json|tokenizer\.json|tokenizer_config\.json"
_CHUNK_FILE = r"\d{5}\.(?:train\.npy|val\.npy|json)"
_TMP = re.compile(rf"^\.(?:{_OURS}|{_CHUNK_FILE})\.[a-z0-9_]+\.tmp$")   # atomic_write's, left by kill -9
_TOP = re.compile(rf"^(?:{_OURS}|{CHUNKS})$")
_CHUNK = re.compile(rf"^{_CHUNK_FILE}$")


def _dump(obj) -> bytes:
  return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def _read_json(path: pathlib.Path) -> Optional[dict]:
  try:
    obj = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  return obj if isinstance(obj, dict) else None


def _chunk_paths(out: pathlib.Path, i: int) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
  d = out / CHUNKS
  return d / f"{i:05d}.train.npy", d / f"{i:05d}.val.npy", d / f"{i:05d}.json"


# ------------------------------------------------------------------------------------------------
# Workers.

_worker_tok: Optional[tokenizer_lib.Tokenizer] = None


def _init_worker(tokenizer_dir: str, threads: bool) -> None:
  global _worker_tok
  if not threads:   # one Rust thread per worker process: the pool is the parallelism
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
  _worker_tok = tokenizer_lib.load(tokenizer_dir)


def _run_chunk(task) -> tuple[int, int]:
  """Tokenizes one chunk of files into its .npy streams and done record; returns (chunk, files)."""
  out, i, files, names, fmt, field, fraction, job_key = task
  sub = corpus_lib.Corpus([pathlib.Path(f) for f in files], names, fmt, field, "")
  train, val, ndocs = corpus_lib.encode_documents(corpus_lib.iter_documents(sub), _worker_tok, fraction)
  train_path, val_path, record_path = _chunk_paths(pathlib.Path(out), i)
  for path, arr in ((train_path, train), (val_path, val)):
    tokenizer_lib.atomic_write(path, lambda f, a=arr: np.save(f, a, allow_pickle=False))
  record = {"chunk": i, "job": job_key, "files": len(files), "train_tokens": len(train),
            "validation_tokens": len(val), "train_documents": ndocs[0], "validation_documents": ndocs[1]}
  tokenizer_lib.atomic_write(record_path, lambda f: f.write(_dump(record)))
  return i, len(files)


def _done(out: pathlib.Path, i: int, job_key: str) -> Optional[dict]:
  """Chunk i's record when it and both of its streams are complete for this job, else None."""
  train_path, val_path, record_path = _chunk_paths(out, i)
  record = _read_json(record_path)
  if not record or record.get("job") != job_key:
    return None
  try:
    if (len(np.load(train_path, mmap_mode="r")) != record["train_tokens"] or
        len(np.load(val_path, mmap_mode="r")) != record["validation_tokens"]):
      return None
  except (OSError, ValueError, KeyError):
    return None
  return record


# ------------------------------------------------------------------------------------------------
# The output directory.

def _claim(out: pathlib.Path, job: dict) -> None:
  """Makes `out` ours for `job`, or raises DataError (--out) without touching it."""
  if out.exists() and not out.is_dir():
    raise DataError(f"--out: {str(out)!r} is a file, not a directory; give a new directory (or one a previous "
                    f"prepare wrote)")
  if not out.exists():
    out.mkdir(parents=True)
    return
  entries = sorted(p.name for p in out.iterdir())
  if not entries:
    return
  old = _read_json(out / JOB)
  if not old or old.get("format") != FORMAT:
    raise DataError(f"--out: {str(out)!r} holds files prepare did not write ({', '.join(entries[:3])}); give "
                    f"an empty or new directory")
  foreign = [n for n in entries if not (_TOP.match(n) or _TMP.match(n))]
  if (out / CHUNKS).is_dir():
    foreign += [f"{CHUNKS}/{n}" for n in sorted(os.listdir(out / CHUNKS)) if not (_CHUNK.match(n) or _TMP.match(n))]
  if foreign:
    raise DataError(f"--out: {str(out)!r} also holds files prepare did not write ({', '.join(foreign[:3])}); "
                    f"move them away or give another directory")
  differs = sorted(k for k in set(job) | set(old) if k != "source" and job.get(k) != old.get(k))
  if differs:
    raise DataError(f"--out: {str(out)!r} holds the preparation of another corpus or settings (differs in: "
                    f"{', '.join(differs)}); give another --out, or delete that directory yourself to redo it")


def _remove_temporaries(out: pathlib.Path) -> None:
  """Deletes the temporary files an interrupted run of ours left (only names atomic_write makes)."""
  for d in (out, out / CHUNKS):
    if d.is_dir():
      for p in d.iterdir():
        if _TMP.match(p.name) and p.is_file():
          p.unlink()


# ------------------------------------------------------------------------------------------------
# Preparation.

def prepare(source: str = "", tokenizer: str = "", out: str = "", workers: int = 1, chunk_files: int = 32,
            vocab_size: int = 4096, validation_fraction: float = corpus_lib.VALIDATION_FRACTION,
            fmt: str = "auto", field: str = "text", max_files: int = 0, cache_dir: str = "",
            progress: bool = True) -> dict:
  """Tokenizes `source` into `out` (see the module doc) and returns the manifest; resumes a partial `out`.

  Bad settings raise DataError naming the flag (--source, --tokenizer, --out, ...) and the fix."""
  if not isinstance(out, str) or not out.strip():
    raise DataError("--out: required; give the directory to write the prepared dataset to")
  for name, value, low in (("workers", workers, 1), ("chunk_files", chunk_files, 1)):
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      raise DataError(f"--{name}: must be an integer >= {low}, got {value!r}")
  if not isinstance(validation_fraction, (int, float)) or not 0 <= validation_fraction < 1:
    raise DataError(f"--validation_fraction: must be in [0, 1) (0 = no validation split), got "
                    f"{validation_fraction!r}")
  try:
    corpus = corpus_lib.resolve_corpus(source or "stdlib", fmt, field, max_files)
    if corpus.format in ("bin", "npy"):
      raise DataError(f"data.source: {source!r} is already tokenized ({corpus.format}); the trainer "
                      f"memory-maps it as it is (--config.data.source={source})")
    tok = corpus_lib.load_tokenizer(ml_collections.ConfigDict(dict(
        tokenizer=tokenizer, validation_fraction=validation_fraction, cache_dir=cache_dir)), corpus,
        vocab_size=vocab_size)
  except ConfigError as e:   # the library names data.* fields; here they are flags
    raise DataError(re.sub(r"\bdata\.(\w+)", r"--\1", str(e))) from None
  out_dir = pathlib.Path(os.path.expanduser(out)).absolute()
  fraction = float(validation_fraction)
  job = {"format": FORMAT, "format_version": FORMAT_VERSION, "source": source or "stdlib",
         "source_format": corpus.format, "field": field, "max_files": max_files,
         "source_fingerprint": corpus.fingerprint, "files": len(corpus.files), "tokenizer": tok.fingerprint,
         "validation_fraction": fraction, "chunk_files": chunk_files}
  job_key = digest({k: v for k, v in job.items() if k != "source"})
  _claim(out_dir, job)
  if (out_dir / MANIFEST).is_file() and all(_done(out_dir, i, job_key) for i in
                                            range(-(-len(corpus.files) // chunk_files))):
    manifest = json.loads((out_dir / MANIFEST).read_text())
    print(f"{out_dir} is up to date: {manifest['tokens']['train']} train / {manifest['tokens']['validation']} "
          f"validation tokens")
    return manifest
  _remove_temporaries(out_dir)
  if not (out_dir / JOB).is_file():
    tokenizer_lib.atomic_write(out_dir / JOB, lambda f: f.write(_dump(job)))
  tok.save(out_dir)
  (out_dir / CHUNKS).mkdir(exist_ok=True)

  files = [str(p) for p in corpus.files]
  tasks = [(str(out_dir), i, files[s:s + chunk_files], corpus.names[s:s + chunk_files], corpus.format, field,
            fraction, job_key) for i, s in enumerate(range(0, len(files), chunk_files))]
  todo = [t for t in tasks if not _done(out_dir, t[1], job_key)]
  bar = tqdm.tqdm(total=len(files), initial=len(files) - sum(len(t[2]) for t in todo), unit="file",
                  desc=f"prepare ({len(todo)}/{len(tasks)} chunks to do)", disable=not progress)
  if workers == 1 or len(todo) <= 1:
    _init_worker(str(out_dir), threads=True)
    for task in todo:
      bar.update(_run_chunk(task)[1])
  elif todo:
    ctx = multiprocessing.get_context("spawn")   # no fork of a threaded parent (tokenizers, jax)
    with ctx.Pool(min(workers, len(todo)), initializer=_init_worker, initargs=(str(out_dir), False)) as pool:
      for _, n in pool.imap_unordered(_run_chunk, todo):
        bar.update(n)
  bar.close()

  records = [_done(out_dir, t[1], job_key) for t in tasks]
  manifest = _manifest(job, tok, records)
  tokenizer_lib.atomic_write(out_dir / MANIFEST, lambda f: f.write(_dump(manifest)))
  print(f"{out_dir}: {manifest['tokens']['train']} train / {manifest['tokens']['validation']} validation "
        f"tokens from {len(files)} files")
  return manifest


def _manifest(job: dict, tok: tokenizer_lib.Tokenizer, records: list) -> dict:
  ndocs = (sum(r["train_documents"] for r in records), sum(r["validation_documents"] for r in records))
  ntok = (sum(r["train_tokens"] for r in records), sum(r["validation_tokens"] for r in records))
  fraction = job["validation_fraction"]
  tail = corpus_lib.tail_split(ndocs, fraction)
  if tail:
    cut = corpus_lib.tail_cut(sum(ntok), fraction)
    ntok = (cut, sum(ntok) - cut)
  chunks = []
  for r in records:
    train, val, _ = _chunk_paths(pathlib.Path("."), r["chunk"])
    chunks.append({"files": r["files"], "train": train.as_posix(), "validation": val.as_posix(),
                   "train_tokens": r["train_tokens"], "validation_tokens": r["validation_tokens"]})
  return {"format": FORMAT, "format_version": FORMAT_VERSION, "source": job["source"],
          "source_format": job["source_format"], "field": job["field"], "max_files": job["max_files"],
          "source_fingerprint": job["source_fingerprint"], "files": job["files"],
          "tokenizer": {"path": tok.path, "fingerprint": tok.fingerprint, "file": "tokenizer.json",
                        "bos_id": tok.bos_id, "eos_id": tok.eos_id},
          "vocab_size": tok.vocab_size, "dtype": corpus_lib.token_dtype(tok.vocab_size).name,
          "validation_fraction": fraction, "split": "tail" if tail else "name_hash",
          "tokens": {"train": ntok[0], "validation": ntok[1]},
          "documents": {"train": ndocs[0], "validation": ndocs[1]}, "chunks": chunks}


# ------------------------------------------------------------------------------------------------
# Reading a prepared directory (the trainer's side).

def find(source) -> Optional[dict]:
  """The manifest when `source` is a prepared directory, None when it is something else (a raw corpus).

  Raises DataError (data.source) for a preparation that has not finished, or a manifest of a newer format."""
  if (not isinstance(source, str) or source == "stdlib" or "," in source
      or not os.path.isdir(os.path.expanduser(source))):
    return None
  d = pathlib.Path(os.path.expanduser(source))
  manifest = _read_json(d / MANIFEST) if (d / MANIFEST).is_file() else None
  if manifest is None or manifest.get("format") != FORMAT:
    job = _read_json(d / JOB) if (d / JOB).is_file() else None
    if job and job.get("format") == FORMAT:
      raise DataError(f"data.source: {source!r} is an unfinished preparation (no {MANIFEST}); finish it with "
                      f"the same command: python -m dsv3.data prepare --out={source} ...")
    return None
  if manifest.get("format_version") != FORMAT_VERSION or any(k not in manifest for k in MANIFEST_KEYS):
    raise DataError(f"data.source: {source!r} was prepared in format version {manifest.get('format_version')!r}"
                    f", this dsv3 reads version {FORMAT_VERSION}; prepare it again into a new --out")
  return manifest


def check_model_vocab(source: str, manifest: dict, model_vocab_size: int) -> None:
  """DataError (model.vocab_size) when the prepared tokens may not fit the model's embedding."""
  if manifest["vocab_size"] > model_vocab_size:
    raise DataError(f"model.vocab_size: {source!r} was tokenized with a {manifest['vocab_size']}-entry vocabulary "
                    f"({MANIFEST}) but model.vocab_size is {model_vocab_size}; set model.vocab_size >= "
                    f"{manifest['vocab_size']}, or prepare the data with a tokenizer of <= {model_vocab_size} "
                    f"entries")


def load(source: str, manifest: dict) -> tuple[list, list, tokenizer_lib.Tokenizer]:
  """(train parts, validation parts, tokenizer) of a prepared directory; parts are memory-mapped arrays."""
  d = pathlib.Path(os.path.expanduser(source))
  tok = tokenizer_lib.load(str(d))
  if tok.fingerprint != manifest["tokenizer"]["fingerprint"]:
    raise DataError(f"data.source: {d / 'tokenizer.json'} is not the tokenizer {source!r} was prepared with "
                    f"(fingerprint {tok.fingerprint}, {MANIFEST} says {manifest['tokenizer']['fingerprint']}); "
                    f"prepare the data again")
  parts = ([], [])
  for chunk in manifest["chunks"]:
    for side, key in ((0, "train"), (1, "validation")):
      if chunk[f"{key}_tokens"] == 0:
        continue
      path = d / chunk[key]
      try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
      except (OSError, ValueError) as e:
        raise DataError(f"data.source: {path} is missing or damaged ({e}); prepare {source!r} again") from None
      if arr.shape != (chunk[f"{key}_tokens"],):
        raise DataError(f"data.source: {path} holds {arr.shape} tokens, {MANIFEST} says "
                        f"{chunk[f'{key}_tokens']}; prepare {source!r} again")
      parts[side].append(arr)
  return parts[0], parts[1], tok


# ------------------------------------------------------------------------------------------------
# Command line (`python -m dsv3.data prepare`).

def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The `prepare` command's flags, defined only by `python -m dsv3.data prepare` (every trainer imports this
  module, through dsv3.data, and defines none)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("source", "", "What data.source accepts: paths / globs / directories of text, jsonl or "
                      "parquet files, comma-separated; '' = the stdlib corpus.", **fv)
  flags.DEFINE_string("tokenizer", "", "tokenizer.json (or a dir holding one); '' = the default BPE "
                      "(trained once on the stdlib corpus, cached) with --vocab_size entries.", **fv)
  flags.DEFINE_string("out", None, "Directory to write the prepared dataset to (new, empty or a previous one).",
                      **fv)
  flags.DEFINE_integer("workers", os.cpu_count() or 1, "Tokenizing processes.", **fv)
  flags.DEFINE_integer("chunk_files", 32, "Files per chunk (the unit of parallel work and of resume).", **fv)
  flags.DEFINE_integer("vocab_size", 4096, "Vocabulary size of the default BPE (with --tokenizer='').", **fv)
  flags.DEFINE_float("validation_fraction", corpus_lib.VALIDATION_FRACTION,
                     "Share of documents held out by the hash of their name; "
                     "train with the same data.validation_fraction.", **fv)
  flags.DEFINE_string("format", "auto", "As data.format: auto | text | jsonl | parquet.", **fv)
  flags.DEFINE_string("field", "text", "jsonl key / parquet column holding the text.", **fv)
  flags.DEFINE_integer("max_files", 0, "Only the first N files of the sorted source (0 = all).", **fv)
  flags.DEFINE_string("cache_dir", "", "Cache of trained tokenizers ('' = $DSV3_CACHE or ~/.cache/dsv3).", **fv)
  flags.DEFINE_bool("progress", True, "Show a progress bar.", **fv)


def main(argv) -> None:
  """`python -m dsv3.data prepare --source=... --out=...` (flags from define_flags)."""
  if argv[1:] not in ([], ["prepare"]):
    raise DataError(f"prepare: unexpected arguments {argv[1:]}; usage: python -m dsv3.data prepare "
                    f"--source=SRC --tokenizer=TOKENIZER.json --out=DIR")
  f = flags.FLAGS
  prepare(f.source, f.tokenizer, f.out or "", f.workers, f.chunk_files, f.vocab_size, f.validation_fraction,
          f.format, f.field, f.max_files, f.cache_dir, f.progress)
