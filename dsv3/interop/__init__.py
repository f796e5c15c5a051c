"""Formats: HF config conversion, sharded safetensors reading and writing."""
