"""`run(main)`: absl's `app.run(main)` for dsv3's command lines, with one-line errors for bad settings.

absl parses `--config=FILE --config.a.b=v` while the flags are parsed, before `main` runs; an unknown field
there (ml_collections looks it up with getattr on the locked ConfigDict) ends in an AttributeError and three
chained tracebacks. `run` checks the command line first: the config file must load, every `--config.*`
override must name a field of that file (else the closest field is suggested), and any other flag error
(a wrong value type, a missing required flag) is reported as one line too. A `ConfigError` raised by
`main` (the validators) is also printed as its one line. Each of these prints to stderr and exits with 2,
the usage-error status, before anything is written to disk.

Errors `main` raises later are user errors too when dsv3 raised them on purpose: an exception of any type
whose innermost frame is a `raise` statement in dsv3's own code is one of its input checks (a missing
file, a checkpoint of another shape, a mesh that is not the device count, ...), and by the project's
convention its message names the field or file and the fix. It ends the run as one line on stderr, exit
status 1, whatever its type (ValueError, FileNotFoundError, a CheckpointError, ...). An exception raised
anywhere else (inside JAX, numpy, orbax) is a bug or a missing check and keeps its traceback, as does
every error when -v / --verbosity is given.

  from dsv3 import cli
  if __name__ == "__main__":
    cli.run(main)                      # instead of absl.app.run(main)
  config = cli.load_config("configs/tiny.py:ep")   # what --config=configs/tiny.py:ep gives, for code and tests
"""
from __future__ import annotations

import os
import re
import sys
import traceback
from typing import Callable, Optional, Sequence

from absl import app, flags, logging
from ml_collections.config_flags import config_flags  # the module: is_config_flag, ConfigFileFlagParser

from dsv3.config import ConfigError, closest_key

USAGE_ERROR = 2
USER_ERROR = 1
# The dsv3 package: a `raise` here is one of its checks (`raised_by_a_check`).
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# The repository's configs/, where load_config looks up a bare name such as 'tiny'.
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class UsageError(Exception):
  """A command-line setting is wrong; the message names it and the fix."""


def _program(argv: Sequence[str]) -> str:
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  if spec is not None and spec.name:      # `python -m dsv3.data` runs dsv3.data.__main__: name the package
    return spec.name.removesuffix(".__main__")
  return os.path.basename(argv[0] if argv else "dsv3")


def _flag_value(argv: Sequence[str], name: str) -> Optional[str]:
  """The last value given as --name=V or --name V (absl's last-wins rule), else None."""
  value = None
  for i, arg in enumerate(argv):
    m = re.match(rf"^--?{re.escape(name)}(=(.*))?$", arg)
    if m:
      value = m.group(2) if m.group(1) is not None else (argv[i + 1] if i + 1 < len(argv) else "")
  return value


def _overrides(argv: Sequence[str], name: str) -> list:
  """(dotted field path, value or None) of every --name.a.b[=v] / --noname.a.b override, in order."""
  out = []
  for arg in argv:
    m = re.match(rf"^--?(no)?{re.escape(name)}\.([^=]+)(?:=(.*))?$", arg)
    if m:
      out.append((m.group(2), None if m.group(1) or m.group(3) is None else m.group(3)))
  return out


def _parses_as(value: str, like) -> bool:
  """Whether the command-line string `value` can set a field whose current value is `like`."""
  try:
    if isinstance(like, bool):
      return value.lower() in ("true", "false", "1", "0")
    if isinstance(like, int):
      int(value)
    elif isinstance(like, float):
      float(value)
  except ValueError:
    return False
  return True


def dotted_keys(c, prefix: str = "") -> list:
  """Every field of a (nested) ConfigDict / mapping as a dotted path, blocks included: ['mesh', 'mesh.data']."""
  out = []
  for k in c.keys():
    out.append(prefix + str(k))
    v = c[k]
    if hasattr(v, "keys") and callable(v.keys):
      out += dotted_keys(v, f"{prefix}{k}.")
  return out


def _check_overrides(config, name: str, path: str, overrides: Sequence[tuple]) -> None:
  """UsageError naming the first override that is no field of `config` (with the closest one) or whose
  value does not parse as the field's type."""
  keys = dotted_keys(config)
  for field, value in overrides:
    node, parts = config, field.split(".")
    for depth, part in enumerate(parts):
      if not (hasattr(node, "keys") and part in node.keys()):
        where = ".".join(parts[:depth])
        if depth and not hasattr(node, "keys"):
          raise UsageError(f"{name}.{field}: {name}.{where} is a value, not a block of fields; override "
                           f"--{name}.{where} itself")
        hint = closest_key(field, keys, prefix=f"{name}.")
        if not hint:
          siblings = ", ".join(map(str, sorted(node.keys())))
          hint = f"; {path} has no such field (the fields of {name}{'.' + where if where else ''}: {siblings})"
        raise UsageError(f"{name}.{field}: unknown field{hint}")
      node = node[part]
    if value is not None and node is not None and not _parses_as(value, node):
      kind = {"int": "an integer", "float": "a number", "bool": "true or false"}[type(node).__name__]
      raise UsageError(f"{name}.{field}: {value!r} is not {kind} ({path} sets {node!r}); give {kind}, "
                       f"e.g. --{name}.{field}={node!r}")


def load_config(spec: str, name: str = "config", lock: bool = False, by_name: bool = True):
  """The one loader of config files: the ConfigDict `--config=SPEC` gives. SPEC is FILE[:ARG] (ml_collections'
  parser calls the file's get_config(ARG)); with `by_name`, a bare name ('tiny', 'tiny:ep') is that file in
  configs/ (the command line takes paths only). UsageError (naming --`name`) when the file does not exist or
  get_config returns None."""
  file, sep, arg = spec.partition(":")
  if by_name and not file.endswith(".py") and os.sep not in file:
    file = os.path.join(CONFIGS_DIR, f"{file}.py")
  if not os.path.isfile(file):
    raise UsageError(f"--{name}: config file {file!r} does not exist; give a file such as configs/tiny.py")
  try:
    config = config_flags.ConfigFileFlagParser(name, lock_config=lock).parse(file + sep + arg)
  except (TypeError, ValueError) as e:   # ml_collections puts the file's traceback in the message: keep its end
    last = [l.strip() for l in str(e).splitlines() if l.strip()][-1]
    raise type(e)(re.sub(r"^[\w.]*(Error|Exception): ", "", last)) from e
  if config is None:
    raise UsageError(f"--{name}: get_config() in {file!r} returned None; return the ConfigDict")
  return config


def check_config_flags(argv: Sequence[str], flag_values=flags.FLAGS) -> None:
  """Loads each ml_collections config-file flag given in argv and checks its overrides; UsageError if bad."""
  argv = flag_values.read_flags_from_files(list(argv), force_gnu=False)
  for name in list(flag_values):
    flag = flag_values[name]
    if name != flag.name or not config_flags.is_config_flag(flag):
      continue
    fields = _overrides(argv[1:], name)
    path = _flag_value(argv[1:], name)
    if path is None:
      if fields:
        raise UsageError(f"--{name}.{fields[0][0]}: overrides need a config file; add --{name}=configs/tiny.py "
                         f"(or another file in configs/)")
      continue
    if not isinstance(flag.parser, config_flags.ConfigFileFlagParser):
      continue
    _check_overrides(load_config(path, name, by_name=False), name, path.split(":", 1)[0], fields)


def parse_flags(argv: Sequence[str]) -> list:
  """absl's flags_parser: checks the config flags, parses, and exits 2 with one line on any flag error."""
  try:
    check_config_flags(argv)
    # ml_collections re-raises a config file's TypeError / ValueError with its traceback in the message.
    return flags.FLAGS(list(argv))
  except (UsageError, flags.Error, TypeError, ValueError) as e:
    lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()] or [type(e).__name__]
    message = lines[-1] if "Error whilst parsing config file" in lines[0] else lines[0]
    if isinstance(e, flags.UnrecognizedFlagError):
      message += "; run with --helpfull to list the flags"
    print(f"{_program(argv)}: {message}", file=sys.stderr)
    sys.exit(USAGE_ERROR)


def raised_by_a_check(err: BaseException) -> bool:
  """Whether `err` was raised by a `raise` statement in dsv3's own code (one of its input checks, whose
  message names the field or file and the fix), rather than by a library or an implicit failure (a
  KeyError, a None subscripted): the innermost frame of its traceback is a `raise` line under dsv3/."""
  if not isinstance(err, Exception) or isinstance(err, (AssertionError, NotImplementedError)):
    return False
  frames = traceback.extract_tb(err.__traceback__)
  if not frames:
    return False
  last = frames[-1]
  return (os.path.abspath(last.filename).startswith(PACKAGE_DIR + os.sep)
          and (last.line or "").lstrip().startswith("raise "))


def one_line(err: BaseException) -> str:
  """The error's message as one line: a multi-line message (a list of fields, a 'Fix:' line) joined."""
  text = str(err).strip() or type(err).__name__
  text = re.sub(r":[ \t]*\n\s*", ": ", text)
  return re.sub(r"\s*\n\s*", "; ", text)


def _traceback_wanted() -> bool:
  """-v / --verbosity on the command line: library logs, and the traceback of every error."""
  return flags.FLAGS.is_parsed() and "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present


def run(main: Callable[[list], object], argv: Optional[Sequence[str]] = None,
        user_errors: tuple = ()) -> None:
  """absl.app.run(main) with one-line, exit-status-2 errors for bad flags, config fields, ConfigErrors and
  the UsageErrors `main` raises.

  Any other error dsv3 raises on purpose (`raised_by_a_check`), and any of the `user_errors` types (whose
  message already says what went wrong and the fix: a locked workdir, a diverged run, a full disk) wherever
  raised, ends the run with that message as one line and exit status 1, without a traceback. Library INFO
  logs stay off; -v / --verbosity brings them back, and every error's traceback.
  """
  def guarded(args):
    if not _traceback_wanted():       # library INFO logs (absl, orbax, jax) only with -v / --verbosity
      logging.set_verbosity(logging.WARNING)
    try:
      return main(args)
    except (ConfigError, UsageError) as e:
      if _traceback_wanted():
        raise
      print(f"{_program(args)}: {one_line(e)}", file=sys.stderr)
      sys.exit(USAGE_ERROR)
    except Exception as e:  # noqa: BLE001 - a user error is reported in one line, anything else re-raised
      if _traceback_wanted() or not (isinstance(e, user_errors) or raised_by_a_check(e)):
        raise
      print(f"{_program(args)}: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
      sys.exit(USER_ERROR)
  app.run(guarded, argv=argv, flags_parser=parse_flags)
