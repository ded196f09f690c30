"""Dense FFNs factorized into routed experts (FactorLLM): partitions of the FFN neurons so far."""

from .partition import PARTITIONS, neuron_features, partition_neurons

__all__ = ["PARTITIONS", "neuron_features", "partition_neurons"]
