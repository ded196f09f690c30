"""Dense FFNs factorized into routed experts (FactorLLM), with real sparse dispatch.

``factorize`` splits every FFN into experts (neurons reordered, no weight changed) and installs untrained routers;
``train_factorized`` runs the two training stages (routers on the Prior-Approximate loss, then experts on the LM
loss); ``factorize_model`` (``sparseforge.factorize``) does both. Routers are saved next to the weights and
restored by ``sparseforge.load_model``.
"""

from .api import factorize_model
from .dispatch import ExpertDispatch, ExpertLayout
from .factorize import check_factorize_request, factorize, unfactorize
from .losses import balance_loss, pa_labels, pa_loss
from .partition import PARTITIONS, neuron_features, partition_neurons
from .routing import ExpertRouting, ExpertSettings
from .train import train_experts, train_factorized, train_routers

__all__ = ["PARTITIONS", "ExpertDispatch", "ExpertLayout", "ExpertRouting", "ExpertSettings", "balance_loss",
           "check_factorize_request", "factorize", "factorize_model", "neuron_features", "pa_labels", "pa_loss",
           "partition_neurons", "train_experts", "train_factorized", "train_routers", "unfactorize"]
