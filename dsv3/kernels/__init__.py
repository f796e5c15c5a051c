"""Numerics and kernels: FP8 fine-grained scaling, expert GEMMs (XLA tiled, tokamax), the GPU platform check."""
