"""The one list of method packages that plug into the centre of sparseforge.

Importing a package on this list registers what it contributes (today: how its model attachments are restored from
an export directory, :mod:`sparseforge.models.attachments`). The loader asks for them through
:func:`load_method_packages`, so no central module imports a method package by name; adding such a method is its
package plus one line here.
"""

from __future__ import annotations

import importlib

METHOD_PACKAGES = (
    "skip",  # FFN-skip policies (attachment "skip")
    "moe",  # routed experts of a factorized model (attachment "experts")
)


def load_method_packages() -> None:
    for name in METHOD_PACKAGES:
        importlib.import_module(f"{__package__}.{name}")
