"""One-shot pruning: scorers and the pruner."""
