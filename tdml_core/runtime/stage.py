"""One pipeline stage as its own OS process.

The process joins its pipeline's gloo (or NCCL) group, derives its stage module
from the job spec and the plan exactly as every other stage does, and then
serves commands from the coordinator over a pipe: train an epoch starting from
given weights, or compute the gradients of one batch (used to check the split).
"""

from __future__ import annotations

import copy
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tdml_core.artifacts import state_digest
from tdml_core.config import JobSpec
from tdml_core.data import batches, shard
from tdml_core.model import StagePlan, split_model
from tdml_core.model.split import quiet_trace_warnings
from tdml_core.runtime.context import epoch_seed, example_microbatch, load_job, make_optimizer


@dataclass
class StageArgs:
    spec: JobSpec
    plan: StagePlan
    pipeline: int
    stage: int
    port: int


def _as_tuple(v):
    return v if isinstance(v, tuple) else (v,)


def _detached(v):
    if isinstance(v, tuple):
        return tuple(_detached(x) for x in v)
    return v.detach().requires_grad_(v.requires_grad)


def _boundary_values(stages, example):
    """Example values entering and leaving each stage (shapes for the p2p buffers).

    Runs with autograd on, since whether a value requires grad tells the stage
    whether a gradient comes back for it; then restores every stage's state,
    because traced stages always run in training mode and would move
    BatchNorm's running statistics.
    """
    saved = [copy.deepcopy(m.state_dict()) for m in stages]
    values = [example]
    v = example
    for m in stages:
        v = _detached(m(*_as_tuple(v)))
        values.append(v)
    for m, s in zip(stages, saved):
        m.load_state_dict(s)
    return values


def stage_device(pipeline: int, stage: int, n_stages: int) -> torch.device:
    """A GPU of its own for every stage of a pipeline when there are enough, else the CPU.

    NCCL refuses two ranks of one group on the same GPU, so a pipeline goes to GPUs
    only when each of its stages can have one; pipelines may share GPUs.
    """
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpus >= n_stages:
        return torch.device("cuda", (pipeline * n_stages + stage) % n_gpus)
    return torch.device("cpu")


class StageProcess:
    def __init__(self, args: StageArgs):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        spec, plan = args.spec, args.plan
        self.args = args
        self.n_stages = plan.n_stages
        self.is_first = args.stage == 0
        self.is_last = args.stage == plan.n_stages - 1
        self.device = stage_device(args.pipeline, args.stage, plan.n_stages)
        ds, model = load_job(spec)
        self.x, self.y = shard(ds, args.pipeline, spec.data_parallel, spec.seed)
        example = example_microbatch(ds, spec)
        stages = [m.to(self.device) for m in split_model(model, plan, example)]
        values = _boundary_values(stages, example.to(self.device))
        self.module = stages[args.stage]
        stage = PipelineStage(
            self.module,
            args.stage,
            plan.n_stages,
            self.device,
            input_args=_as_tuple(values[args.stage]),
            output_args=values[args.stage + 1],
        )
        schedule_cls = Schedule1F1B if spec.schedule == "1f1b" else ScheduleGPipe
        self.schedule = schedule_cls(stage, spec.microbatches, loss_fn=F.cross_entropy)
        self.optimizer = make_optimizer(spec, self.module.parameters())

    def _step(self, xb, yb) -> list[torch.Tensor]:
        """One pipelined forward/backward of a batch; the microbatch losses on the last stage."""
        losses: list[torch.Tensor] = []
        args = (xb.to(self.device),) if self.is_first else ()
        kwargs = {"target": yb.to(self.device), "losses": losses} if self.is_last else {}
        self.schedule.step(*args, **kwargs)
        return losses

    def train_epoch(self, epoch: int, state: dict) -> tuple[dict, dict]:
        spec = self.args.spec
        self.module.load_state_dict(state)
        self.module.train()
        loss_sum, n = 0.0, 0
        grad_sum = {name: torch.zeros_like(p) for name, p in self.module.named_parameters()}
        for xb, yb in batches(self.x, self.y, spec.batch_size, epoch_seed(spec, epoch, self.args.pipeline)):
            self.optimizer.zero_grad(set_to_none=True)
            losses = self._step(xb, yb)
            with torch.no_grad():
                for name, p in self.module.named_parameters():
                    if p.grad is not None:
                        grad_sum[name] += p.grad
            self.optimizer.step()
            if losses:
                loss_sum += float(torch.stack([loss.detach() for loss in losses]).mean())
            n += 1
        state = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        grads = {k: v.cpu() for k, v in grad_sum.items()}
        stats = {
            "batches": n,
            "train_loss": (loss_sum / n) if (self.is_last and n) else None,
            # what the trainer commits: digests of its stage's weights and of its epoch gradient
            "weight_digest": state_digest(state),
            "grad_digest": state_digest(grads),
            "grads": grads,
        }
        return state, stats

    def batch_grads(self, state: dict, xb, yb) -> tuple[dict, list[float]]:
        self.module.load_state_dict(state)
        self.optimizer.zero_grad(set_to_none=True)
        losses = self._step(xb, yb)
        grads = {n: p.grad.detach().cpu().clone() for n, p in self.module.named_parameters() if p.grad is not None}
        return grads, [float(loss) for loss in losses]


def stage_main(args: StageArgs, conn) -> None:
    """Entry point of a stage process."""
    torch.set_num_threads(1)
    quiet_trace_warnings()
    device = stage_device(args.pipeline, args.stage, args.plan.n_stages)
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method=f"tcp://127.0.0.1:{args.port}",
            rank=args.stage,
            world_size=args.plan.n_stages,
            timeout=timedelta(seconds=args.spec.stage_timeout_s),
        )
        proc = StageProcess(args)
        conn.send(("ready", sorted(proc.module.state_dict().keys())))
        while True:
            try:
                cmd, *payload = conn.recv()
            except EOFError:  # the coordinator is gone
                break
            if cmd == "stop":
                break
            if cmd == "epoch":
                conn.send(("trained", *proc.train_epoch(*payload)))
            elif cmd == "grads":
                conn.send(("grads", *proc.batch_grads(*payload)))
            else:
                raise ValueError(f"unknown command {cmd!r}")
    except Exception:
        try:
            conn.send(("error", traceback.format_exc()))
        finally:
            sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
