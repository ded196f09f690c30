"""Sparsity core: patterns, allocations, masks."""
