"""Turn a model into stage modules without touching its code.

The model is traced by ``torch.distributed.pipelining.pipeline`` (through
``torch.export``) and cut before the planned modules. The traced graph may pass
a value from one stage to a later, non-adjacent one (a residual connection that
spans a cut); each stage module we return therefore takes the values that are
live at its start and returns those live at its end, so that the stages run in
order, each feeding the next, and each can sit on its own process with only
neighbour-to-neighbour communication. State-dict keys stay the model's own
qualified names. Where tracing fails, the model's top-level children are
grouped instead, after checking that running them in order gives the model's
output.
"""

from __future__ import annotations

import copy
import operator
from collections import OrderedDict

import torch
from torch import fx, nn

from tdml_core.model.plan import PlanError, StagePlan


class SplitError(PlanError):
    pass


def quiet_trace_warnings() -> None:
    """torch.export's pytree pickling warns on every trace; it tells a user nothing."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec.*")


def trace_pipe(model: nn.Module, example: torch.Tensor, split_points: list[str]):
    """Trace a copy of ``model`` and cut it before ``split_points``.

    A copy, because ``pipeline()`` wraps the ``forward`` of every module it cuts
    before and leaves the wrapper in place: tracing the same module twice would
    recurse without end.
    """
    from torch.distributed.pipelining import SplitPoint, pipeline

    import warnings

    spec = {name: SplitPoint.BEGINNING for name in split_points}
    # Always traced in training mode: the stages train, and a graph traced in eval
    # mode would freeze BatchNorm to its running statistics. The filter is set here
    # too, since another thread's catch_warnings may have restored the global ones.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec.*")
        return pipeline(copy.deepcopy(model).train(), mb_args=(example,), split_spec=spec)


def _stage_of(node: fx.Node, stage_nodes: list[fx.Node], owner: dict) -> int:
    if node.op == "output":
        return len(stage_nodes)
    if node.op == "call_module":
        return stage_nodes.index(node)
    return owner[node]


def _live_stage_modules(pipe) -> list[nn.Module]:
    graph = pipe.split_gm.graph
    nodes = list(graph.nodes)
    stage_nodes = [n for n in nodes if n.op == "call_module"]
    n_stages = len(stage_nodes)
    owner: dict[fx.Node, int] = {}
    for n in nodes:
        if n.op == "placeholder":
            owner[n] = -1
        elif n.op == "call_module":
            owner[n] = stage_nodes.index(n)
        elif n.op == "call_function":
            if n.target is not operator.getitem:
                raise SplitError(f"unexpected operation between stages: {n.format_node()}")
            owner[n] = owner[n.args[0]]

    def consumers(v: fx.Node) -> set[int]:
        """Stages (n_stages for the output) that read ``v`` directly, not through getitem."""
        return {_stage_of(u, stage_nodes, owner) for u in v.users if u.op != "call_function"}

    values = [n for n in nodes if n in owner]
    output_node = next(n for n in nodes if n.op == "output")
    modules = []
    for i, stage_node in enumerate(stage_nodes):
        live_in = [v for v in values if owner[v] < i and any(c >= i for c in consumers(v))]
        live_out = [v for v in values if owner[v] <= i and any(c > i for c in consumers(v))]
        sub = pipe.split_gm.get_submodule(stage_node.target)
        g = fx.Graph()
        env = {v: g.placeholder(v.name) for v in live_in}
        sub_inputs = [n for n in sub.graph.nodes if n.op == "placeholder"]
        val_map = {ph: env[arg] for ph, arg in zip(sub_inputs, stage_node.args)}
        result = g.graph_copy(sub.graph, val_map)
        env[stage_node] = result
        for v in values:
            if v.op == "call_function" and v.args[0] is stage_node:
                env[v] = result[v.args[1]]
        if i == n_stages - 1:
            out = fx.node.map_arg(output_node.args[0], lambda n: env[n])
            if isinstance(out, (tuple, list)) and len(out) == 1:
                out = out[0]
        else:
            outs = [env[v] for v in live_out]
            out = outs[0] if len(outs) == 1 else tuple(outs)
        g.output(out)
        modules.append(fx.GraphModule(sub, g, class_name=f"Stage{i}"))
    return modules


def _children_stage_modules(model: nn.Module, plan: StagePlan, example: torch.Tensor) -> list[nn.Module]:
    stages = [
        nn.Sequential(OrderedDict((name, model.get_submodule(name)) for name in s.layers))
        for s in plan.stages
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(example)
            got = example
            for stage in stages:
                got = stage(got)
        same = isinstance(expected, torch.Tensor) and got.shape == expected.shape
        same = same and torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    except Exception:  # the children do not even fit together
        same = False
    finally:
        model.train(was_training)
    if not same:
        raise SplitError(
            "the model could not be traced, and running its top-level children in order "
            "does not give its output (its forward does more than call them in sequence); "
            "make the model traceable by torch.export or an nn.Sequential of its parts"
        )
    return stages


def split_model(model: nn.Module, plan: StagePlan, example_batch: torch.Tensor) -> list[nn.Module]:
    """Stage modules of ``model`` for ``plan``; running them in order gives the model's output.

    Stage k takes the values live at its start (one tensor, or a tuple when a
    residual connection spans the cut) and returns those live at its end; the
    last returns the model's output. Traced stages hold copies of the model's
    parameters; the children fallback shares them.
    """
    if plan.n_stages == 1:
        return [model]
    if plan.method == "children":
        return _children_stage_modules(model, plan, example_batch)
    pipe = trace_pipe(model, example_batch, plan.split_points())
    if pipe.num_stages != plan.n_stages:
        raise SplitError(f"tracing gave {pipe.num_stages} stages where the plan has {plan.n_stages}")
    return _live_stage_modules(pipe)


def run_stages(stages: list[nn.Module], batch: torch.Tensor):
    """Run stage modules in order, unpacking tuples of live values between them."""
    value = batch
    for stage in stages:
        value = stage(*value) if isinstance(value, tuple) else stage(value)
    return value
