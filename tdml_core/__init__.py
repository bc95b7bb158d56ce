"""TDML core library: configuration, data, models, pipeline runtime and aggregation.

Plain library: nothing in this package imports Prefect, ``flows`` or ``tasks``.
"""

__version__ = "0.1.0"
