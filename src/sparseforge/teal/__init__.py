"""Activation sparsity while decoding (TEAL): the low-magnitude entries of each linear's input are zeroed with
per-layer thresholds calibrated for a model-wide target, so a kernel can skip the matching weight columns."""

from .calibrate import calibrate_activation_sparsity
from .thresholds import SITES, ActivationThresholds, read_thresholds
from .runtime import ActivationSparsity, install_thresholds

__all__ = ["SITES", "ActivationSparsity", "ActivationThresholds", "calibrate_activation_sparsity",
           "install_thresholds", "read_thresholds"]
