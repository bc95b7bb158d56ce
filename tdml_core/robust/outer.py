"""The outer optimizer: how the epoch's combined update moves the global model.

What pipelines hand back is, in effect, an update: the epoch's global model minus
the combined local models (the rule of ``tdml_core.robust.combine``). Plain
averaging replaces the global model by the combination (outer learning rate 1,
no momentum). DiLoCo (Douillard et al. 2023) treats that update as a
pseudo-gradient and takes an SGD step with Nesterov momentum on it:

    delta = start - combined
    m     = momentum * m + delta
    step  = delta + momentum * m        (Nesterov; plain momentum: step = m)
    next  = start - lr * step

The momentum buffer is a pure function of the epochs' starts and combinations,
so anyone who re-derives each epoch's combination re-derives it too.
"""

from __future__ import annotations

import torch

State = dict[str, torch.Tensor]


def is_plain(lr: float, momentum: float) -> bool:
    """Whether the rule is plain averaging: the combination becomes the global model as it is."""
    return lr == 1.0 and momentum == 0.0


def step_by(agg, start: State, combined: State, buffer: State | None) -> tuple[State, State | None]:
    """``outer_step`` with the settings of a spec's ``aggregation`` (outer_lr, outer_momentum, nesterov)."""
    return outer_step(start, combined, buffer, lr=agg.outer_lr, momentum=agg.outer_momentum, nesterov=agg.nesterov)


def outer_step(start: State, combined: State, buffer: State | None, *, lr: float, momentum: float,
               nesterov: bool = True) -> tuple[State, State | None]:
    """(the next global model, the new momentum buffer); integer buffers come from ``combined``.

    ``buffer`` None is an empty buffer (the first epoch). Plain averaging returns
    ``combined`` itself, bit for bit, and no buffer.
    """
    if is_plain(lr, momentum):
        return combined, None
    out: State = {}
    new_buffer: State = {}
    for k, c in combined.items():
        if not c.is_floating_point():
            out[k] = c.clone()
            continue
        s = start[k].to(torch.float64)
        delta = s - c.to(torch.float64)
        m = delta if buffer is None or k not in buffer else momentum * buffer[k] + delta
        step = delta + momentum * m if nesterov else m
        new_buffer[k] = m
        out[k] = (s - lr * step).to(c.dtype)
    return out, new_buffer
