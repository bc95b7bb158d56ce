"""TDML's protocol, step by step, as plain functions over an opened ``Job``.

``steps`` holds one function per row of the protocol table; ``audit`` re-checks
a finished job from its ledger and store alone. The Prefect flow in
``flows/train.py`` calls the steps in order, each as a retryable task.
"""
