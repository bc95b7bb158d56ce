"""The one decorator every protocol step goes through: a named Prefect task with retries."""

from __future__ import annotations

import functools
import os

from prefect import task
from prefect.cache_policies import NO_CACHE

# Test hooks: names of steps that raise once before running (tests add to it; normal runs never do), and
# TDML_TEST_FAIL_STEP, a step that raises on every try.
FAIL_ONCE: set[str] = set()


class InjectedFailure(RuntimeError):
    pass


def step(name: str, retries: int = 2, retry_delay_seconds: float = 1.0):
    """A protocol step as a task named ``name``. Steps are idempotent (they read the ledger
    first), so a retry picks up where the failed try stopped. Steps pass live objects
    (the opened job), so nothing is cached by inputs."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            if name in FAIL_ONCE:
                FAIL_ONCE.discard(name)
                raise InjectedFailure(f"{name}: failing once (test hook)")
            if os.environ.get("TDML_TEST_FAIL_STEP") == name:  # a step that fails on every try (test hook)
                raise InjectedFailure(f"{name}: failing on every try (test hook)")
            return fn(*args, **kwargs)

        return task(name=name, retries=retries, retry_delay_seconds=retry_delay_seconds, cache_policy=NO_CACHE,
                    persist_result=False)(run)

    return wrap
