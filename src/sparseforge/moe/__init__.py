"""Dense FFNs factorized into routed experts (FactorLLM). So far: partitions of the FFN neurons into experts and
routed execution with sparse dispatch; router training (Prior-Approximate loss), export and the CLI come next."""

from .dispatch import ExpertDispatch
from .partition import PARTITIONS, neuron_features, partition_neurons

__all__ = ["PARTITIONS", "ExpertDispatch", "neuron_features", "partition_neurons"]
