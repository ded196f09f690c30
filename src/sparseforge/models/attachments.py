"""What a method attaches to a loaded model, behind one small protocol.

An FFN-skip policy, the routers of a factorized model (and next a sparse runtime) change how a loaded model
computes without being weights. Each is an :class:`Attachment`: it has a kind, says whether it takes over the FFN
(two of those cannot run together), saves itself into an export directory and removes itself from the model. A
method package registers how its kind is restored from a directory (:func:`register_restorer`); the saver and the
loader loop over attachments and restorers and import no method package. :class:`~.handle.LoadedModel` holds the
attachments and enforces the one exclusivity rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol, runtime_checkable

from ..errors import SparseforgeError

if TYPE_CHECKING:
    from .handle import LoadedModel


class AttachmentConflict(SparseforgeError):
    """Two attachments that both take over the FFN."""


@runtime_checkable
class Attachment(Protocol):
    kind: str  # one attachment of a kind per model: "skip", "experts", ...
    takes_over_ffn: bool  # at most one attachment that replaces how the FFN runs

    def save(self, directory: Path) -> None:
        """Write the files that restore this attachment next to an export's weights."""

    def remove(self) -> None:
        """Undo every change to the model: afterwards it computes as it did before."""


# kind -> restore(handle, directory): installs the attachment if ``directory`` holds one of that kind
_RESTORERS: dict[str, Callable[["LoadedModel", Path], None]] = {}


def register_restorer(kind: str, restore: Callable[["LoadedModel", Path], None]) -> None:
    """How an export directory gives back an attachment of ``kind`` (called by the method package that owns it)."""
    _RESTORERS[kind] = restore


# kind -> install(handle, option) -> attachment: attachments a run can ask for by name (the sparse runtime)
_INSTALLERS: dict[str, Callable[["LoadedModel", str], "Attachment"]] = {}


def register_installer(kind: str, install: Callable[["LoadedModel", str], "Attachment"]) -> None:
    """How an attachment of ``kind`` is put on a loaded model by name (called by the package that owns it)."""
    _INSTALLERS[kind] = install


def install_attachment(handle: "LoadedModel", kind: str, option: str) -> "Attachment":
    """Put an attachment of ``kind`` on ``handle`` (e.g. kind "runtime", option "sparse") without naming its
    package."""
    from ..registry import load_method_packages

    load_method_packages()
    if kind not in _INSTALLERS:
        raise SparseforgeError(f"no installer for attachments of kind '{kind}'; known: {', '.join(sorted(_INSTALLERS))}")
    return _INSTALLERS[kind](handle, option)


def restore_attachments(handle: "LoadedModel", directory: Path) -> None:
    """Give ``handle`` back every attachment saved in ``directory`` (each restorer checks it fits these weights)."""
    from ..registry import load_method_packages

    load_method_packages()
    for restore in _RESTORERS.values():
        restore(handle, directory)
