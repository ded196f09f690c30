"""The CPU sparse-weight runtime: pruned linears held compressed and multiplied by :mod:`sparseforge.kernels`."""

from .install import RUNTIMES, RuntimeRequestError, SparseRuntime, install_runtime
from .linear import SparseLinear

__all__ = ["RUNTIMES", "RuntimeRequestError", "SparseLinear", "SparseRuntime", "install_runtime"]
