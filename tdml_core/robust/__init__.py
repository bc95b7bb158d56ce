"""Validation, detection and aggregation rules."""
