"""Evolutionary search of per-block sparsity (NSGA-II, EvoPress-style, sub-network decomposition), on Ray or not."""

from .api import ALGORITHMS, SearchConfig, run_search, search
from .front import hypervolume, non_dominated, pick_point
from .space import SearchSpace, parse_levels

__all__ = ["ALGORITHMS", "SearchConfig", "SearchSpace", "hypervolume", "non_dominated", "parse_levels", "pick_point",
           "run_search", "search"]
