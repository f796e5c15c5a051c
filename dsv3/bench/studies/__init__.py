"""Studies: experiments that reproduce the paper's training claims at small scale, one command each.

  python -m dsv3.bench.studies.balance   # none / aux loss / aux-loss-free (gamma sweep): MaxVio over training
  python -m dsv3.bench.studies.mtp       # with vs without MTP: main-model validation loss, draft acceptance
  python -m dsv3.bench.studies.fp8       # FP8 vs BF16 loss curves and their relative error against the paper's 0.25%

Each trains configs/tiny.py through the real trainer (`dsv3.train.train_and_evaluate`) and writes its table
(`<study>.md`), its numbers (`<study>.json`) and a plot (`<study>.png`) to --out. The core never imports this
package.
"""
