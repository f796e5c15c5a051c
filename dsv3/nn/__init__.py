"""The model's building blocks: layers, Multi-head Latent Attention, DeepSeekMoE, attention kernels."""
