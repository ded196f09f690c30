"""Dense FFNs factorized into routed experts (FactorLLM). So far: partitions of the FFN neurons into experts and
routed execution with sparse dispatch, and the router objectives (Prior-Approximate and balance losses); the
training stages, export and the CLI come next."""

from .dispatch import ExpertDispatch
from .losses import balance_loss, pa_labels, pa_loss
from .partition import PARTITIONS, neuron_features, partition_neurons

__all__ = ["PARTITIONS", "ExpertDispatch", "balance_loss", "neuron_features", "pa_labels", "pa_loss",
           "partition_neurons"]
