"""dsv3: DeepSeek-V3 in JAX/Flax, and the system that trains it."""
