"""Training-free refinement of masks found by one-shot pruning (DSnoT)."""
