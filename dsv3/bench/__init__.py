"""Benchmarks, studies and analysis tools: they import the core as any user would, and no core module imports
them (as big_vision keeps tools/). One command each:

  python -m dsv3.bench [--what=train,hf,profile,moe,seq,compile,memory]   # tables (__main__.py, step.py, hf.py)
  python -m dsv3.bench gpu [--smoke]                # a lent GPU: kernel checks, GEMM TFLOP/s, train step (gpu.py)
  python -m dsv3.bench.ep                           # expert-parallel traffic and timing, 8 simulated CPU devices
  python -m dsv3.bench.pipeline                     # the pipeline executor on 8 simulated CPU devices
  python -m dsv3.bench.overlap                      # DualPipe's compiled overlap (compile-only GPU toolchain)
  python -m dsv3.bench.hlo_gemms FILE.hlo.txt       # the GEMMs of a compiled program and what runs each
  python -m dsv3.bench.studies.{balance,mtp,fp8}    # the paper's training claims at small scale

Simulated CPU devices come from one place, common.use_cpu_devices.
"""
