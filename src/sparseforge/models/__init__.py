"""Loading models (``loading``) and the per-family adapters that give algorithms a uniform view of them."""
