"""Structure that really runs faster: FFN-neuron and head removal, FinerCut sub-layer removal, block removal.

Each function changes the model in place through the shape surgery of :mod:`sparseforge.models.surgery`, records
the new structure in the config (so exports reload) and appends a report to ``handle.history``.
"""

from .blocks import remove_blocks
from .finercut import finercut
from .width import shrink

__all__ = ["finercut", "remove_blocks", "shrink"]
