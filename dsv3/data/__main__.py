"""`python -m dsv3.data prepare --source=... --out=...`: offline tokenization (dsv3.data.prepare)."""
from absl import flags

from dsv3 import cli
from dsv3.data import prepare

if __name__ == "__main__":
  prepare.define_flags()
  flags.adopt_module_key_flags(prepare)      # --help lists the main module's flags: prepare's are its own
  cli.run(prepare.main)                      # errors are one line naming the flag (exit status 2)
