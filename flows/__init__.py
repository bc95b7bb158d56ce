"""Prefect flows of TDML and the ``tdml`` command."""
