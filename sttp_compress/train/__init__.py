"""Fine-tuning: the distillation loop, its fast path (weight bank, step graph, free cores) and multi-process runs."""
