"""What "nothing on disk was lost" compares: a snapshot of every file and folder under a path."""
import hashlib
import os


def snapshot(root):
  """{relative path: sha256 of the file, or None for a folder} under `root`; the file's own hash if `root`
  is a file, None if it does not exist."""
  root = os.fspath(root)
  if not os.path.exists(root):
    return None
  if os.path.isfile(root):
    return _sha(root)
  out = {}
  for dirpath, dirs, files in os.walk(root):
    out.update({os.path.relpath(os.path.join(dirpath, d), root): None for d in dirs})
    out.update({os.path.relpath(os.path.join(dirpath, f), root): _sha(os.path.join(dirpath, f)) for f in files})
  return out


def _sha(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()
