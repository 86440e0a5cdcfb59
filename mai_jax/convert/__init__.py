"""Checkpoint conversion to and from other ecosystems (`hf`: Hugging Face safetensors)."""
