"""User-facing errors.

Anything a user can cause with bad input (a model that does not exist, a sparsity outside [0, 1), a corrupted
checkpoint, an unknown recipe key) raises a :class:`SparseforgeError`. The CLI prints its message as one line and
exits non-zero; everything else is a bug and keeps its traceback.
"""


class SparseforgeError(Exception):
    """Bad input or an unusable asset, with a message written for the user."""


class ModelNotFoundError(SparseforgeError):
    pass


class UnsupportedArchitectureError(SparseforgeError):
    pass


class CorruptCheckpointError(SparseforgeError):
    pass


class InvalidWeightsError(SparseforgeError):
    pass


class DataError(SparseforgeError):
    pass


class PatternError(SparseforgeError):
    pass


class RecipeError(SparseforgeError):
    pass


class EvaluationError(SparseforgeError):
    pass


class MissingTokenizerError(SparseforgeError):
    pass


class RetrainError(SparseforgeError):
    pass


class StructureError(SparseforgeError):
    pass


class SkipError(SparseforgeError):
    pass


class FactorizeError(SparseforgeError):
    pass


class SparseTrainingError(SparseforgeError):
    """Bad settings for dynamic sparse training or continual learning (density, task split, capacity)."""


class SearchError(SparseforgeError):
    """Bad settings for the per-layer sparsity search (levels, target, cache budget, Ray address)."""


class ActivationSparsityError(SparseforgeError):
    """Activation-sparsity thresholds that do not fit the request or the model."""
