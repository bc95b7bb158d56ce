"""The coordinator's side: start every stage process of every pipeline and talk to them.

Each pipeline is its own torch.distributed group of ``n_stages`` processes, so
the pipelines of one epoch train at the same time on their own shards. The
coordinator never blocks on one process alone: it waits on all pipes and on
every process's sentinel together, so a stage that dies (killed, out of
memory, crashed) fails the epoch at once with its pipeline and stage named,
instead of leaving its neighbours waiting on a socket.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import socket
import time
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch

from tdml_core.config import JobSpec
from tdml_core.model import StagePlan
from tdml_core.runtime.stage import StageArgs, TrainerSource, stage_main

Slot = tuple[int, int]  # (pipeline, stage)


class StageFailure(RuntimeError):
    """A stage process died, raised an error, or went silent."""

    def __init__(self, pipeline: int, stage: int, message: str):
        super().__init__(f"pipeline {pipeline} stage {stage}: {message}")
        self.pipeline, self.stage = pipeline, stage


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        import signal

        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = str(-exitcode)
        return f"process was killed by {name}"
    return f"process exited with code {exitcode}"


class PipelineCluster:
    """``pipelines`` × ``plan.n_stages`` stage processes, started together.

    ``pipelines`` is how many (numbered from 0) or which pipelines to run here;
    ``sources`` makes every stage a trainer of the protocol (see ``stage.py``).
    """

    def __init__(self, spec: JobSpec, plan: StagePlan, pipelines: int | list[int] | None = None,
                 sources: dict[Slot, TrainerSource] | None = None, collusion_dir: str | None = None):
        self.spec, self.plan = spec, plan
        # where the spec's colluding attackers swap their honest updates (shared by this process's clusters)
        self.collusion_dir = collusion_dir or str(Path(tempfile.gettempdir()) / f"tdml-collusion-{os.getpid()}")
        if isinstance(pipelines, list):
            self.pipeline_ids = list(pipelines)
        else:
            self.pipeline_ids = list(range(pipelines or spec.data_parallel))
        self.n_pipelines = len(self.pipeline_ids)
        self.sources = sources or {}
        self.procs: dict[Slot, mp.Process] = {}
        self.conns: dict[Slot, Any] = {}
        self.keys: dict[Slot, list[str]] = {}
        self.phase = "start-up"

    # -- life cycle ---------------------------------------------------------
    def start(self) -> "PipelineCluster":
        ctx = mp.get_context("spawn")
        for p in self.pipeline_ids:
            port = _free_port()
            for s in range(self.plan.n_stages):
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=stage_main,
                    args=(StageArgs(self.spec, self.plan, p, s, port, self.sources.get((p, s)),
                                     self.collusion_dir), child),
                    name=f"tdml-p{p}-s{s}",
                    daemon=True,
                )
                proc.start()
                child.close()
                self.procs[(p, s)], self.conns[(p, s)] = proc, parent
        replies = self._gather(set(self.procs), timeout=max(self.spec.stage_timeout_s, 300.0))
        self.keys = {slot: reply[1] for slot, reply in replies.items()}
        return self

    def close(self) -> None:
        for conn in self.conns.values():
            try:
                conn.send(("stop",))
            except (OSError, EOFError, BrokenPipeError):
                pass
        deadline = time.monotonic() + 5
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        self._kill_all()

    def _kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.is_alive():
                proc.kill()
        for proc in self.procs.values():
            proc.join(2)

    def __enter__(self) -> "PipelineCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def pid(self, pipeline: int, stage: int) -> int:
        return self.procs[(pipeline, stage)].pid

    # -- talking to stages --------------------------------------------------
    def _fail(self, slot: Slot, message: str) -> None:
        self._kill_all()
        raise StageFailure(slot[0], slot[1], f"{message} during {self.phase}")

    def _check_deaths(self, pending: set[Slot]) -> None:
        for slot, proc in self.procs.items():
            if proc.exitcode is not None and (slot in pending or proc.exitcode != 0):
                self._last_words(slot)
                self._fail(slot, _death(proc.exitcode))

    def _last_words(self, slot: Slot) -> None:
        """A stage that failed sent its traceback before exiting: report that, not just the exit."""
        conn = self.conns[slot]
        try:
            while conn.poll():
                reply = conn.recv()
                if reply[0] == "error":
                    self._on_error(slot, reply[1])
        except (EOFError, OSError):
            pass

    def _on_error(self, slot: Slot, tb: str) -> None:
        # A neighbour of a killed stage reports a broken connection first; give the
        # dead process a moment to be seen so the failure names the real cause.
        time.sleep(0.5)
        for (p, s), proc in self.procs.items():
            if p == slot[0] and (p, s) != slot and proc.exitcode is not None and proc.exitcode < 0:
                self._fail((p, s), _death(proc.exitcode))
        last = [line for line in tb.strip().splitlines() if line.strip()][-1]
        self._fail(slot, f"raised {last}\n{tb}")

    def _gather(self, pending: set[Slot], timeout: float) -> dict[Slot, tuple]:
        replies: dict[Slot, tuple] = {}
        pending = set(pending)
        deadline = time.monotonic() + timeout
        by_conn = {self.conns[s]: s for s in pending}
        sentinels = [p.sentinel for p in self.procs.values()]
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                slot = min(pending)
                self._fail(slot, f"sent nothing for {timeout:.0f} s")
            ready = wait([self.conns[s] for s in pending] + sentinels, timeout=min(left, 1.0))
            for obj in ready:
                slot = by_conn.get(obj)
                if slot is None or slot not in pending:
                    continue
                try:
                    reply = obj.recv()
                except (EOFError, OSError):
                    continue  # the sentinel check below names the death
                if reply[0] == "error":
                    self._on_error(slot, reply[1])
                replies[slot] = reply
                pending.discard(slot)
            self._check_deaths(pending)
        return replies

    def request(self, messages: dict[Slot, tuple], phase: str) -> dict[Slot, tuple]:
        self.phase = phase
        for slot, msg in messages.items():
            try:
                self.conns[slot].send(msg)
            except (OSError, BrokenPipeError):
                self._check_deaths({slot})
                self._fail(slot, "pipe to the stage is closed")
        return self._gather(set(messages), self.spec.stage_timeout_s * 4)

    # -- the two things stages do --------------------------------------------
    def train_epoch(self, epoch: int, global_state: dict[str, torch.Tensor]) -> list[dict]:
        """Every pipeline trains one epoch from ``global_state`` on its own shard.

        Returns, per pipeline, {"state": the local model's state, "train_loss",
        "batches", "stages": [per-stage state dicts]}.
        """
        msgs = {
            slot: ("epoch", epoch, {k: global_state[k] for k in keys}) for slot, keys in self.keys.items()
        }
        replies = self.request(msgs, f"epoch {epoch}")
        out = []
        for p in self.pipeline_ids:
            stage_states = [replies[(p, s)][1] for s in range(self.plan.n_stages)]
            last_stats = replies[(p, self.plan.n_stages - 1)][2]
            state = {k: v for st in stage_states for k, v in st.items()}
            stage_stats = [replies[(p, s)][2] for s in range(self.plan.n_stages)]
            out.append(
                {
                    "state": state,
                    "stages": stage_states,
                    "train_loss": last_stats["train_loss"],
                    "batches": last_stats["batches"],
                    "records": [st.get("record") for st in stage_stats],  # per stage: its commitment, if recorded
                    "record_bytes": [st.get("record_bytes", 0) for st in stage_stats],
                    "cpu_s": [st.get("cpu_s", 0.0) for st in stage_stats],  # each stage's CPU time in the epoch
                    "record_cpu_s": [st.get("record_cpu_s", 0.0) for st in stage_stats],  # of it, recording
                }
            )
        return out

    def train_epoch_from_store(self, epoch: int, stage_in: list[dict]) -> dict[int, list[dict]]:
        """Every trainer fetches its stage's weights (``stage_in[s]`` = {cid, digest}) and trains.

        Returns, per pipeline, each stage's stats: batches, train_loss (last stage),
        and the {cid, digest} of its weights and of its epoch gradient in the store.
        """
        msgs = {slot: ("epoch", epoch, stage_in[slot[1]]) for slot in self.keys}
        replies = self.request(msgs, f"epoch {epoch}")
        return {p: [replies[(p, s)][2] for s in range(self.plan.n_stages)] for p in self.pipeline_ids}

    def reset(self, attacks: list, collusion_dir: str | None = None) -> None:
        """Start a new run on the same processes: these attacks, first trainers everywhere, fresh optimizers.

        Only without trainer sources (the engine alone, as benchmarks drive it): a
        protocol trainer's attacks and generation come with its source.
        """
        if self.sources:
            raise RuntimeError("reset is for clusters without trainer sources")
        self.collusion_dir = collusion_dir or self.collusion_dir
        self.request({slot: ("reset", list(attacks), self.collusion_dir) for slot in self.keys}, "a reset")

    def replace(self, slots: list[Slot]) -> None:
        """A new, honest trainer takes each slot: it does not run the spec's attacks and its optimizer starts empty."""
        self.request({slot: ("replace",) for slot in slots}, "a replacement")

    def batch_grads(self, pipeline: int, state: dict, xb: torch.Tensor, yb: torch.Tensor):
        """Gradients of one batch through one pipeline (no optimizer step): (grads, losses)."""
        msgs = {
            (pipeline, s): ("grads", {k: state[k] for k in self.keys[(pipeline, s)]}, xb, yb)
            for s in range(self.plan.n_stages)
        }
        replies = self.request(msgs, "a gradient check")
        grads = {k: v for s in range(self.plan.n_stages) for k, v in replies[(pipeline, s)][1].items()}
        return grads, replies[(pipeline, self.plan.n_stages - 1)][2]

    def reveal(self, challenges: dict[Slot, list[int]], epoch: int | None = None) -> dict[Slot, dict]:
        """Each challenged trainer reveals the records and tensors of its challenged steps of the last epoch
        (of ``epoch``, when given: a trainer that kept another epoch's records fails)."""
        replies = self.request({slot: ("reveal", list(steps), epoch) for slot, steps in challenges.items()},
                               "a challenge")
        return {slot: reply[1] for slot, reply in replies.items()}
