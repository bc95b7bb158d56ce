"""The ``tdml`` command.

    tdml plan SPEC                      print the stage plan
    tdml run SPEC --out DIR [--resume]  the protocol: the tdml-train Prefect flow
    tdml audit DIR                      re-check a finished run from its ledger and store
    tdml train SPEC --out DIR           the engine alone: no chain, no storage
    tdml baseline single|fedavg SPEC --out DIR

A user's mistake (a bad spec, a model that cannot be split, a missing dataset)
ends with one clear line on stderr and exit code 2; a failure while training
(a stage process that died) with exit code 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.2f} MiB"


def _print_plan(console, plan) -> None:
    from rich.table import Table

    table = Table(title=f"stage plan ({plan.method})")
    for col in ("stage", "trainer", "layers", "params", "memory", "trainer memory"):
        table.add_column(col, justify="right" if col in ("params", "memory", "trainer memory") else "left")
    for s in plan.stages:
        layers = s.layers[0] if len(s.layers) == 1 else f"{s.layers[0]} … {s.layers[-1]} ({len(s.layers)})"
        table.add_row(
            str(s.index), s.trainer or "-", layers, f"{s.params:,}", _mib(s.memory_bytes), _mib(s.trainer_memory_bytes)
        )
    console.print(table)
    for note in plan.notes:
        console.print(f"note: {note}")


class EpochProgress:
    """A progress bar over epochs, and one line per finished epoch."""

    def __init__(self, console, title: str, epochs: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=True,
        )
        self.task = self.progress.add_task(title, total=epochs)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def __call__(self, rec: dict) -> None:
        local = " ".join(
            f"p{lc['pipeline']}={lc['accuracy']:.3f}{'*' if lc['selected'] else ''}" for lc in rec["local"]
        )
        self.console.print(
            f"epoch {rec['epoch'] + 1}: global accuracy {rec['global_accuracy']:.4f}  "
            f"loss {rec['global_loss']:.4f}  ({rec['wall_s']:.1f} s)" + (f"  local {local}" if local else "")
        )
        self.progress.advance(self.task)


def cmd_plan(args) -> int:
    from tdml_core.config import load_spec
    from tdml_core.runtime.context import load_job, make_plan

    spec = load_spec(args.spec)
    ds, model = load_job(spec)
    plan = make_plan(spec, model, ds)
    console = _console()
    console.print(f"{spec.name}: {spec.model} on {ds.name}, microbatch {spec.microbatch_size}, {spec.precision}")
    _print_plan(console, plan)
    return 0


def _run(args, fn, title: str) -> int:
    from tdml_core.config import load_spec
    from tdml_core.report import plot_epochs, summary, write_summary

    spec = load_spec(args.spec)
    console = _console()
    with EpochProgress(console, title, spec.epochs) as progress:
        result = fn(spec, on_epoch=progress)
    out = Path(args.out)
    path = write_summary(out, summary(spec, result))
    plot_epochs(result.epochs, out / "accuracy.png", f"{spec.name} ({result.mode})")
    console.print(
        f"final accuracy {result.final_accuracy:.4f} in {result.wall_s:.1f} s; wrote {path} and {out / 'accuracy.png'}"
    )
    return 0


def cmd_train(args) -> int:
    from tdml_core.runtime.engine import train

    return _run(args, train, "tdml train")


def cmd_baseline(args) -> int:
    from tdml_core.runtime.baselines import fedavg, single_node

    fn = {"single": single_node, "fedavg": fedavg}[args.kind]
    return _run(args, fn, f"baseline {args.kind}")


def _prefect_env(verbose: bool) -> None:
    """Settings read when Prefect is imported: a patient temporary server, quiet logs, no telemetry."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def cmd_run(args) -> int:
    _prefect_env(args.verbose)
    from tdml_core.config import load_spec

    from tdml_core.protocol.steps import check_run_folder

    spec = load_spec(args.spec)  # a bad spec or folder is reported before Prefect starts
    check_run_folder(args.out, args.resume)
    from flows.train import EPOCH_LISTENERS, tdml_train

    console = _console()
    console.print(f"tdml run {args.spec}: {spec.data_parallel} pipelines, {spec.epochs} epochs, chain "
                  f"{args.chain or spec.protocol.chain}; starting Prefect …")
    with EpochProgress(console, "tdml-train", spec.epochs) as progress:
        EPOCH_LISTENERS.append(progress)
        try:
            data = tdml_train(spec_path=str(args.spec), out_dir=str(args.out), resume=args.resume,
                              chain=args.chain, store=args.store)
        finally:
            EPOCH_LISTENERS.remove(progress)
    out = Path(args.out)
    if data["resumed_from"]:
        console.print(f"resumed job {data['job_id']} after epoch {data['resumed_from']}")
    paid = sum(data["rewards"].values())
    console.print(
        f"job {data['job_id']}: final accuracy {data['final_accuracy']:.4f} in {data['wall_s']:.1f} s; "
        f"{len([w for w in data['rewards'].values() if w > 0])} participants paid {paid} wei, "
        f"refund {data['refund_wei']} wei, {data['chain']['tx_count']} transactions\n"
        f"wrote {out / 'summary.json'} and {out / 'accuracy.png'}; check it with: tdml audit {out}"
    )
    return 0


def cmd_audit(args) -> int:
    from tdml_core.protocol.audit import AuditFailure, audit

    console = _console()
    try:
        audit(args.dir, args.key, os.environ.get(args.passphrase_env) if args.passphrase_env else None,
              say=console.print)
    except AuditFailure as exc:
        console.print(f"FAIL  {exc}")
        return 1
    console.print("audit passed")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tdml", description="Trustworthy distributed machine learning")
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("plan", help="print the stage plan of a job spec")
    sp.add_argument("spec")
    sp.set_defaults(func=cmd_plan)
    sp = sub.add_parser("run", help="run the protocol (the tdml-train Prefect flow)")
    sp.add_argument("spec")
    sp.add_argument("--out", required=True, help="run folder: summary, keys, chain journal, local store")
    sp.add_argument("--resume", action="store_true", help="continue the job in --out after its last global model")
    sp.add_argument("--chain", help="JSON-RPC URL of a node (default: the spec's, else the embedded chain)")
    sp.add_argument("--store", help="local:DIR, ipfs://HOST:PORT or s3://BUCKET?endpoint=URL")
    sp.add_argument("--verbose", action="store_true", help="show Prefect's logs")
    sp.set_defaults(func=cmd_run)
    sp = sub.add_parser("audit", help="re-check a finished run from its ledger and store")
    sp.add_argument("dir", help="the run folder of tdml run")
    sp.add_argument("--key", help="the client's key file (default DIR/keys/client.json)")
    sp.add_argument("--passphrase-env", help="variable holding the key file's passphrase")
    sp.set_defaults(func=cmd_audit)
    sp = sub.add_parser("train", help="run the engine alone (no chain, no storage)")
    sp.add_argument("spec")
    sp.add_argument("--out", required=True, help="folder for summary.json and the plot")
    sp.set_defaults(func=cmd_train)
    sp = sub.add_parser("baseline", help="train a reference on the same data split")
    sp.add_argument("kind", choices=["single", "fedavg"])
    sp.add_argument("spec")
    sp.add_argument("--out", required=True)
    sp.set_defaults(func=cmd_baseline)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from tdml_core.model.split import quiet_trace_warnings

    quiet_trace_warnings()
    from tdml_core.errors import USER_ERRORS
    from tdml_core.chain.client import ChainError
    from tdml_core.runtime.cluster import StageFailure

    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"tdml: error: {exc}", file=sys.stderr)
        return 2
    except StageFailure as exc:
        first = str(exc).splitlines()[0]
        print(f"tdml: training failed: {first}", file=sys.stderr)
        return 1
    except ChainError as exc:
        print(f"tdml: chain: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tdml: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
