"""What the runtime contributes to the registry: no recipe stage, an installer for its attachment (kind
``runtime``), so that a recipe's ``evaluate: {runtime: sparse}`` measures speed in it without the pipeline naming it."""

from __future__ import annotations

from ..models.attachments import register_installer
from .install import install_runtime


def _install(handle, mode: str):
    return install_runtime(handle, mode, log=lambda message: None)


register_installer("runtime", _install)
