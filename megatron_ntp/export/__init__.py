"""Export to Hugging Face format (Qwen3 / Qwen3-MoE): megatron_ntp.export.hf."""
