"""Validation, detection and aggregation rules.

* ``aggregate``: which local models enter the global model and how they are
  combined -- top-K averaging of state dicts, and the Byzantine-robust rules over
  flattened update vectors (``mean``, ``median``, ``trimmed_mean``, ``multi_krum``,
  ``krum_scores``, ``multi_krum_selection``, ``centered_clip``).
* ``detect``: which pipelines and trainers to distrust -- stage 1 on cross-
  validation scores, stage 2 on update vectors (``two_means``, ``mandera`` and
  their ``*_evidence`` twins).
* ``vectors``: ``flatten`` (mapping name -> array or tensor to one float64
  vector, names sorted) and ``update`` (end - start per name).
* ``validate``: cross-validation of a model on the test set.

Pure functions over numpy arrays (and, for the state-dict rules, torch tensors);
nothing here imports Prefect.
"""

from tdml_core.robust import aggregate, detect, vectors
from tdml_core.robust.vectors import flatten, update

__all__ = ["aggregate", "detect", "vectors", "flatten", "update"]
