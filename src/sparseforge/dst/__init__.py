"""Dynamic sparse training (SET, RigL, SNFS and the continual-DST study's growth rules) for any ``nn.Module``, and
task-incremental continual learning with a sparse sub-network per task.

    from sparseforge.dst import DSTConfig, DynamicSparsity
    sparsity = DynamicSparsity.install(model, DSTConfig(density=0.2, method="rigl", total_steps=steps))
    sparsity.attach(optimizer)        # one call: topology updates run after optimizer.step()
"""

from .api import continual, train_sparse
from .continual import ContinualConfig, run_continual
from .engine import METHODS, DSTConfig, DynamicSparsity
from .lm import sparse_train_lm
from .subnetworks import TaskSubnetworks
from .train import SparseTrainConfig

__all__ = ["METHODS", "ContinualConfig", "DSTConfig", "DynamicSparsity", "SparseTrainConfig", "TaskSubnetworks",
           "continual", "run_continual", "sparse_train_lm", "train_sparse"]
