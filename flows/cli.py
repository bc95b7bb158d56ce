"""The ``tdml`` command.

    tdml plan SPEC                      print the stage plan
    tdml run SPEC --out DIR [--resume]  the protocol: the tdml-train Prefect flow
    tdml audit DIR                      re-check a finished run from its ledger and store
    tdml train SPEC --out DIR           the engine alone: no chain, no storage
    tdml baseline single|fedavg SPEC --out DIR

A user's mistake (a bad spec, a model that cannot be split, a missing dataset,
an --out that cannot be written, a store that does not answer) ends with one
clear line on stderr and exit code 2; a failure while training (a stage process
that died) with one line naming it and the log file that holds the traceback,
and exit code 1. ``tdml run`` writes Prefect's logs to DIR/tdml.log; ``--verbose``
shows them on the console too.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

LOG_NAME = "tdml.log"  # in the run folder: Prefect's logs, and the traceback of a failure


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
        self.said_few = False

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def __call__(self, rec: dict) -> None:
        local = " ".join(
            f"p{lc['pipeline']}={lc['accuracy']:.3f}{'*' if lc['selected'] else ''}" for lc in rec["local"]
        )
        note = rec.get("detection", "")
        if "too few" in note and not self.said_few:  # once per run: the update stage cannot judge here
            self.console.print(f"detection: {note}")
            self.said_few = True
        flagged = [v["slot"] for v in rec.get("verdicts", []) if v["flagged"] and not v["malicious"]]
        evicted = [v["slot"] for v in rec.get("verdicts", []) if v["malicious"] and not v.get("proven")]
        convicted = [v["slot"] for v in rec.get("verdicts", []) if v.get("proven")]
        self.console.print(
            f"epoch {rec['epoch'] + 1}: global test accuracy {rec['global_accuracy']:.4f}  "
            f"loss {rec['global_loss']:.4f}  ({rec['wall_s']:.1f} s)" + (f"  local (validation) {local}" if local else "")
            + (f"  restarted trainers {' '.join(rec['restarted'])} (optimizer state lost)" if rec.get("restarted")
               else "")
            + (f"  flagged {' '.join(flagged)}" if flagged else "")
            + (f"  evicted {' '.join(evicted)}" if evicted else "")
            + (f"  convicted {' '.join(convicted)} (fraud proof, bond forfeited)" if convicted else "")
            + "".join(f"  {r['slot']} replaced by a standby" if r.get("replacement")
                      else f"  pipeline {r['slot'].split('/')[0]} dropped (no standby)" for r in rec.get("replaced", []))
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
    from tdml_core.paths import check_out_folder
    from tdml_core.report import plot_epochs, summary, write_summary

    spec = load_spec(args.spec)
    out = Path(args.out)
    with _undo_if_refused(out):
        check_out_folder(out)  # before minutes of training, not after
        args.log_path = out / LOG_NAME
        console = _console()
        with EpochProgress(console, title, spec.rounds) as progress:
            result = fn(spec, on_epoch=progress)
    path = write_summary(out, summary(spec, result))
    plot_epochs(result.epochs, out / "accuracy.png", f"{spec.name} ({result.mode})")
    console.print(
        f"final test accuracy {result.final_accuracy:.4f} in {result.wall_s:.1f} s; wrote {path} and {out / 'accuracy.png'}"
    )
    return 0


def cmd_train(args) -> int:
    from tdml_core.runtime.engine import train

    return _run(args, train, "tdml train")


def cmd_baseline(args) -> int:
    from tdml_core.runtime.baselines import fedavg, single_node

    fn = {"single": single_node, "fedavg": fedavg}[args.kind]
    return _run(args, fn, f"baseline {args.kind}")


def _prefect_env() -> None:
    """Settings read when Prefect is imported: a patient temporary server, no telemetry."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if not os.environ.get("PREFECT_API_URL"):  # the Prefect server of `make services-up`, when it is up
        from tdml_core.services import ServicesError, prefect_api, services_file

        api = prefect_api()
        if api:
            import urllib.request

            try:
                with urllib.request.urlopen(api + "/health", timeout=10):
                    pass
            except OSError:
                raise ServicesError(f"the Prefect server that {services_file()} names ({api}) does not answer: "
                                    "`make services-down`, then `make services-up`") from None
            os.environ["PREFECT_API_URL"] = api


def _prefect_logging(log: Path, verbose: bool) -> None:
    """Send Prefect's logs (and those of its temporary server, a subprocess) to ``log``; to the console as well
    only when ``verbose``. Prefect reads the file PREFECT_LOGGING_SETTINGS_PATH names when it is imported, and
    its server subprocess inherits the variable; the file is Prefect's own logging.yml with the console
    handlers replaced (or joined) by one that appends to ``log``. A user's own settings file is left alone."""
    import atexit
    import importlib.util

    import yaml

    if os.environ.get("PREFECT_LOGGING_SETTINGS_PATH"):
        return
    origin = importlib.util.find_spec("prefect").origin
    config = yaml.safe_load((Path(origin).parent / "logging" / "logging.yml").read_text())
    config.setdefault("handlers", {})["tdml_file"] = {
        "level": 0,
        "class": "logging.FileHandler",
        "formatter": "standard",
        "filename": str(log.resolve()).replace("$", "$$"),  # the file is a string.Template
        "encoding": "utf-8",
    }
    console = {"console", "debug"}
    for logger in [config.get("root", {}), *config.get("loggers", {}).values()]:
        handlers = logger.get("handlers")
        if not handlers or not console & set(handlers):
            continue
        kept = list(handlers) if verbose else [h for h in handlers if h not in console]
        logger["handlers"] = kept + ["tdml_file"]
    fd, path = tempfile.mkstemp(prefix="tdml-prefect-logging-", suffix=".yml")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    atexit.register(lambda: Path(path).unlink(missing_ok=True))
    os.environ["PREFECT_LOGGING_SETTINGS_PATH"] = path


def _check_store(spec, out: Path, args) -> None:
    """Open the store the run will use, so that a store that does not answer is refused before Prefect starts."""
    from tdml_core.protocol.job import JobRef
    from tdml_core.services import resolve_store
    from tdml_core.storage import open_store

    if args.resume:
        url = JobRef.load(out).store_url
    else:
        url = resolve_store(args.store or spec.protocol.store or "local:store")
        if url.startswith("local:") and not Path(url[6:]).is_absolute():
            url = f"local:{out / url[6:]}"  # inside the run folder, as steps.prepare makes it
    open_store(url)


def _check_chain(spec, out: Path, args) -> None:
    """A chain URL that names no node is refused before Prefect starts (the embedded chain is always there)."""
    from tdml_core.chain import Chain
    from tdml_core.protocol.job import JobRef
    from tdml_core.services import resolve_chain

    url = JobRef.load(out).chain if args.resume else resolve_chain(args.chain or spec.protocol.chain)
    if url != "embedded":
        Chain(url)


def _chain_named(spec, out: Path, args) -> str:
    from tdml_core.protocol.job import JobRef
    from tdml_core.services import resolve_chain

    return JobRef.load(out).chain if args.resume else resolve_chain(args.chain or spec.protocol.chain)


def _remove_empty(folder: Path) -> None:
    """Remove ``folder`` and the folders below it that are empty; never a file."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir():
            try:
                path.rmdir()
            except OSError:
                pass
    try:
        folder.rmdir()
    except OSError:
        pass


@contextmanager
def _undo_if_refused(out: Path):
    """A command refused for a user's mistake leaves no empty folders behind where there were none."""
    top = out.absolute()  # the outermost folder the command may create
    while not top.parent.exists():
        top = top.parent
    existed = top.exists()
    try:
        yield
    except BaseException as exc:
        if not existed and user_error(exc) is not None:
            _remove_empty(top)
        raise


def cmd_run(args) -> int:
    _prefect_env()
    from tdml_core.config import load_spec
    from tdml_core.protocol.steps import check_run_folder
    from tdml_core.runtime.context import load_job, make_plan

    # everything a user can get wrong is refused here, before Prefect starts; the cheap checks first
    spec = load_spec(args.spec)
    out = Path(args.out.replace("{now}", time.strftime("%Y%m%d-%H%M%S")))  # one folder per scheduled run
    with _undo_if_refused(out):
        check_run_folder(out, args.resume)  # a writable folder, created here, without a job unless resuming
        _check_store(spec, out, args)  # a store that answers
        _check_chain(spec, out, args)  # a chain node that answers
        ds, model = load_job(spec)  # a dataset that serves every pipeline a batch; a model that builds and fits
        make_plan(spec, model, ds)  # and splits into the stages asked for
    args.log_path = out / LOG_NAME
    _prefect_logging(args.log_path, args.verbose)

    console = _console()
    console.print(f"tdml run {args.spec}: {spec.data_parallel} pipelines, {spec.epochs} epochs"
                  f"{f' ({spec.rounds} rounds)' if spec.rounds_per_epoch > 1 else ''}, chain "
                  f"{_chain_named(spec, out, args)}; Prefect {os.environ.get('PREFECT_API_URL') or 'server: temporary'} "
                  f"(its logs: {args.log_path}) …")
    from flows.train import EPOCH_LISTENERS, tdml_train

    if not args.verbose:
        import logging

        logging.captureWarnings(True)  # library warnings join Prefect's logs in the file

    with EpochProgress(console, "tdml-train", spec.rounds) as progress:
        EPOCH_LISTENERS.append(progress)
        try:
            data = tdml_train(spec_path=str(args.spec), out_dir=str(out), resume=args.resume,
                              chain=args.chain, store=args.store)
        finally:
            EPOCH_LISTENERS.remove(progress)
    if data["resumed_from"]:
        console.print(f"resumed job {data['job_id']} after epoch {data['resumed_from']}")
    paid = sum(data["rewards"].values())
    console.print(
        f"job {data['job_id']}: final test accuracy {data['final_accuracy']:.4f} in {data['wall_s']:.1f} s; "
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
    sp.add_argument("--verbose", action="store_true", help="show Prefect's logs (always written to DIR/tdml.log)")
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


def _user_errors() -> tuple[type[BaseException], ...]:
    try:
        from tdml_core.errors import USER_ERRORS
    except Exception:  # a library that does not import: every error is a failure then
        return ()
    return USER_ERRORS


def user_error(exc: BaseException) -> BaseException | None:
    """The user's mistake behind ``exc``: ``exc`` itself, what it was raised from, one of a group, or what a
    Prefect exception was raised while handling (Prefect may wrap what a task raised)."""
    kinds = _user_errors()
    todo, seen = [exc], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if kinds and isinstance(e, kinds):
            return e
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        todo.append(e.__cause__)
        if type(e).__module__.split(".")[0] == "prefect":
            todo.append(e.__context__)
    return None


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _write_traceback(exc: BaseException, log: Path | None) -> Path:
    """Append the full traceback to ``log`` (the run folder's), else to a fresh temporary file."""
    text = "".join(traceback.format_exception(exc))
    if log is not None:
        try:
            with open(log, "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} tdml failed:\n{text}")
            return log
        except OSError:
            pass
    fd, path = tempfile.mkstemp(prefix="tdml-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def report(exc: BaseException, log: Path | None) -> int:
    """One line for any exception that ends a command: ``tdml: error:`` and 2 for a user's mistake,
    ``tdml: failed:`` and 1 for anything else, with the traceback kept in the log."""
    mistake = user_error(exc)
    if mistake is not None:
        print(f"tdml: error: {str(mistake).strip() or type(mistake).__name__}", file=sys.stderr)
        return 2
    where = _write_traceback(exc, log)
    print(f"tdml: failed: {_first_line(exc)} (full log: {where})", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.log_path = None  # set by the commands that have a folder to keep a log in
    try:
        from tdml_core.model.split import quiet_trace_warnings

        quiet_trace_warnings()
        return args.func(args)
    except KeyboardInterrupt:
        print("tdml: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        return report(exc, args.log_path)


if __name__ == "__main__":
    sys.exit(main())
