"""File I/O: safetensors, adapter file layouts, PEFT folders, merging a model on disk."""
