"""Files in and out: model and architecture sources, compressed checkpoints, atomic outputs, local Hugging Face folders."""
