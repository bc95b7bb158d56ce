"""Prefect tasks of TDML: one retryable protocol step each, calling tdml_core."""
