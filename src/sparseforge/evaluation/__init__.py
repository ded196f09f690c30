"""Evaluation: every metric every method is measured by."""
