"""Out-of-core pruning: a model's blocks read from its checkpoint one at a time, pruned, written, released."""
