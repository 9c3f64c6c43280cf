"""Qwen3-style models on megatron-core: presets, parameter/FLOP/memory counting, construction.

presets and counting are pure Python (no torch); gpt builds megatron-core's GPTModel.
"""
