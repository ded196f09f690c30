"""Saving and loading models: dense-with-zeros and compressed sparse formats."""

from .saving import EXPORT_FORMATS, FORMAT_FILE, read_format, save_model

__all__ = ["EXPORT_FORMATS", "FORMAT_FILE", "read_format", "save_model"]
