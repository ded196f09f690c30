"""Calibration and evaluation text: sources and windowing."""
