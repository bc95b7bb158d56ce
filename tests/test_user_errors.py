"""A user's mistake ends ``tdml`` in one clear line and exit 2; a failure in one line and exit 1; ``tdml run``
keeps Prefect's logs in DIR/tdml.log.

Every case is a real ``python -m flows.cli`` process. The cases refused before Prefect starts are all started
together when the first test asks (a module fixture), and so are the two that start Prefect (marked slow): the
file takes about as long as its slowest case, the one real ``tdml run``, where there are cores to run them side
by side.
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 5


def _dead_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Refuse(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that refuses every request's credentials, as S3 does for an unknown access key."""

    body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidAccessKeyId</Code>'
            b"<Message>The AWS Access Key Id you provided does not exist in our records.</Message></Error>")

    def _refuse(self):
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(self.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(self.body)

    do_HEAD = do_GET = do_PUT = do_POST = _refuse

    def log_message(self, *args):
        pass


@dataclass
class Case:
    argv: list
    env: dict
    out: Path | None = None  # the run folder, where one is named
    proc: subprocess.Popen | None = None
    _text: str | None = None
    rc: int | None = None

    def start(self, pythonpath: list[Path]) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [*pythonpath, ROOT]))}
        env.pop("PREFECT_LOGGING_SETTINGS_PATH", None)
        for k, v in self.env.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        self.proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *map(str, self.argv)], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()

    def result(self) -> tuple[int, str]:
        if self._text is None:
            stdout, stderr = self.proc.communicate(timeout=600)
            self.rc, self._text = self.proc.returncode, stdout + stderr
        return self.rc, self._text


def _spec(folder: Path, name: str, **over) -> Path:
    data = yaml.safe_load((ROOT / "examples" / "digits.yaml").read_text())
    data.update(epochs=1, **over)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def prefect_cases(tmp_path_factory):
    """Two runs that start Prefect: one failing in the flow's first step, one that trains an epoch."""
    tmp = tmp_path_factory.mktemp("prefect-runs")
    ok = _spec(tmp, "ok")
    table = {
        "in_flow": Case(["run", ok, "--out", tmp / "in_flow"],
                        {"PREFECT_HOME": str(tmp / "prefect-in-flow"), "TDML_TEST_FAIL_STEP": "publish task",
                         "PREFECT_API_URL": None},
                        tmp / "in_flow"),
        "quiet": Case(["run", ok, "--out", tmp / "quiet"],
                      {"PREFECT_HOME": str(tmp / "prefect-quiet"), "PREFECT_LOGGING_LEVEL": "INFO",
                       "PREFECT_API_URL": None}, tmp / "quiet"),  # the temporary server, as `make demo` runs
    }
    for case in table.values():
        case.start([])
    yield table
    for case in table.values():
        case.stop()


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("user-errors")
    (tmp / "models").mkdir()
    (tmp / "models" / "user_models.py").write_text(
        "from torch import nn\n\n"
        "def exploding():\n"
        "    raise RuntimeError('weights file missing\\nsecond line of the message')\n\n"
        "def too_narrow():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(10, 10))\n"
    )
    a_file = tmp / "a-file"
    a_file.write_text("not a folder\n")
    ok = _spec(tmp, "ok")
    creds = {"AWS_ACCESS_KEY_ID": "tdml", "AWS_SECRET_ACCESS_KEY": "tdml"}
    no_creds = {"AWS_SHARED_CREDENTIALS_FILE": str(tmp / "none"), "AWS_CONFIG_FILE": str(tmp / "none"),
                "AWS_EC2_METADATA_DISABLED": "true", "AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
                "AWS_SESSION_TOKEN": None, "AWS_PROFILE": None}

    refuse = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
    threading.Thread(target=refuse.serve_forever, daemon=True).start()
    refusing = f"http://127.0.0.1:{refuse.server_address[1]}"

    def run(name, *args, env=None, spec=ok):
        out = tmp / name
        return Case(["run", spec, "--out", out, *args], env or {}, out)

    table = {
        "seed": run("seed", spec=_spec(tmp, "seed", seed=-1)),
        "batch": run("batch", spec=_spec(tmp, "batch", batch_size=800, microbatches=4)),
        "data_parallel": run("data_parallel", spec=_spec(tmp, "dp", data_parallel=1000, top_k=1)),
        "factory": run("factory", spec=_spec(tmp, "factory", model="user_models:exploding")),
        "misfit": Case(["plan", _spec(tmp, "misfit", model="user_models:too_narrow")], {}),
        "out_file": Case(["run", ok, "--out", a_file], {}, a_file),
        "out_proc": Case(["run", ok, "--out", "/proc/tdml-x/run"], {}),
        "out_under_file": Case(["run", ok, "--out", a_file / "run"], {}, a_file / "run"),
        "train_out_file": Case(["train", ok, "--out", a_file], {}),
        "baseline_out_proc": Case(["baseline", "fedavg", ok, "--out", "/proc/tdml-x"], {}),
        "scheme": run("scheme", "--store", "foo://x"),
        "s3_down": run("s3_down", "--store", f"s3://tdml?endpoint=http://127.0.0.1:{_dead_port()}", env=creds),
        "chain_down": run("chain_down", "--chain", f"http://127.0.0.1:{_dead_port()}"),
        "s3_refused": run("s3_refused", "--store", f"s3://tdml?endpoint={refusing}", env=creds),
        "s3_no_creds": run("s3_no_creds", "--store", f"s3://tdml?endpoint={refusing}", env=no_creds),
    }
    for case in table.values():
        case.start([tmp / "models"])
    yield table
    for case in table.values():
        case.stop()
    refuse.shutdown()


def _one_clear_line(case: Case, code: int, *needles: str) -> str:
    rc, text = case.result()
    assert rc == code, text
    assert "Traceback" not in text, text
    assert len(text.strip().splitlines()) <= MAX_LINES, text
    for needle in needles:
        assert needle in text, text
    return text


def _before_prefect(case: Case) -> None:
    """Refused before Prefect starts: nothing said about it, and no run folder (so no log) left behind."""
    _, text = case.result()
    assert "starting Prefect" not in text and "prefect" not in text.lower(), text
    if case.out is not None:
        assert not case.out.is_dir()


def test_a_negative_seed_is_refused(cases):
    _one_clear_line(cases["seed"], 2, "tdml: error:", "seed", "greater than or equal to 0")
    _before_prefect(cases["seed"])


def test_a_batch_larger_than_a_pipelines_shard_is_refused(cases):
    _one_clear_line(cases["batch"], 2, "batch_size (800)", "1221 training samples", "data_parallel (2)",
                    "610 samples per shard")
    _before_prefect(cases["batch"])


def test_more_pipelines_than_a_batch_each_is_refused_by_the_same_check(cases):
    _one_clear_line(cases["data_parallel"], 2, "batch_size (32)", "data_parallel (1000)", "1 sample per shard")
    _before_prefect(cases["data_parallel"])


def test_a_model_factory_that_raises_is_named_with_its_message(cases):
    text = _one_clear_line(cases["factory"], 2, "user_models:exploding", "RuntimeError: weights file missing")
    assert "second line" not in text
    _before_prefect(cases["factory"])


def test_a_model_that_does_not_fit_the_input_is_named(cases):
    _one_clear_line(cases["misfit"], 2, "user_models:too_narrow", "does not fit the input",
                    "mat1 and mat2 shapes cannot be multiplied")


def test_run_out_naming_a_file_is_refused(cases):
    _one_clear_line(cases["out_file"], 2, "--out", "exists and is not a folder")
    _before_prefect(cases["out_file"])


def test_run_out_that_cannot_be_created_is_refused(cases):
    _one_clear_line(cases["out_proc"], 2, "--out /proc/tdml-x/run", "cannot create the folder")
    _before_prefect(cases["out_proc"])


def test_run_out_below_a_file_is_refused(cases):
    _one_clear_line(cases["out_under_file"], 2, "is a file, not a folder")
    _before_prefect(cases["out_under_file"])


def test_train_out_naming_a_file_is_refused(cases):
    _one_clear_line(cases["train_out_file"], 2, "--out", "exists and is not a folder")
    assert "epoch" not in cases["train_out_file"].result()[1]


def test_baseline_out_that_cannot_be_created_is_refused(cases):
    _one_clear_line(cases["baseline_out_proc"], 2, "--out /proc/tdml-x", "cannot create the folder")


def test_an_unknown_store_scheme_is_refused(cases):
    _one_clear_line(cases["scheme"], 2, "unknown store 'foo://x'", "s3://BUCKET?endpoint=URL")
    _before_prefect(cases["scheme"])  # the folder the refused run had made is taken away again


def test_an_s3_endpoint_that_is_down_is_named(cases):
    _one_clear_line(cases["s3_down"], 2, "S3 endpoint http://127.0.0.1:", "no answer")
    _before_prefect(cases["s3_down"])


def test_a_chain_node_that_does_not_answer_is_named(cases):
    _one_clear_line(cases["chain_down"], 2, "no JSON-RPC node answers at http://127.0.0.1:")
    _before_prefect(cases["chain_down"])


def test_s3_credentials_refused_are_named(cases):
    _one_clear_line(cases["s3_refused"], 2, "S3 endpoint http://127.0.0.1:", "credentials refused",
                    "AWS_ACCESS_KEY_ID")
    _before_prefect(cases["s3_refused"])


def test_s3_without_credentials_is_named(cases):
    _one_clear_line(cases["s3_no_creds"], 2, "S3 endpoint http://127.0.0.1:", "no credentials",
                    "AWS_ACCESS_KEY_ID")
    _before_prefect(cases["s3_no_creds"])


@pytest.mark.slow
def test_a_failure_inside_the_flow_is_one_line_and_its_traceback_is_in_the_log(prefect_cases):
    """A step that fails on every try (a test hook makes "publish task" raise each time) fails the flow."""
    case = prefect_cases["in_flow"]
    text = _one_clear_line(case, 1, "tdml: failed: InjectedFailure: publish task: failing",
                           f"(full log: {case.out / 'tdml.log'})")
    assert "Finished in state" not in text and " | ERROR " not in text
    log = (case.out / "tdml.log").read_text()
    assert "Traceback" in log and "InjectedFailure" in log and "Finished in state Failed" in log


def test_audit_reports_an_unexpected_exception_in_one_line(tmp_path, monkeypatch, capsys):
    import flows.cli
    import tdml_core.protocol.audit

    def broken(*args, **kw):
        raise RuntimeError("the auditor tripped\nover this")

    monkeypatch.setattr(tdml_core.protocol.audit, "audit", broken)
    rc = flows.cli.main(["audit", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.strip().splitlines() == [err.strip()] and "Traceback" not in err
    assert err.startswith("tdml: failed: RuntimeError: the auditor tripped (full log: ")
    log = Path(err.strip().rsplit("(full log: ", 1)[1].rstrip(")"))
    assert "Traceback" in log.read_text()
    log.unlink()


def test_user_errors_wrapped_by_prefect_are_still_user_errors():
    from flows.cli import user_error
    from tdml_core.config import SpecError

    class FakePrefectError(Exception):
        pass

    FakePrefectError.__module__ = "prefect.exceptions"
    inner = SpecError("batch_size: too big")
    try:
        try:
            raise inner
        except SpecError:
            raise FakePrefectError("task crashed")  # context, not cause: how a wrapper re-raises
    except FakePrefectError as outer:
        assert user_error(outer) is inner
    assert user_error(RuntimeError("disk on fire")) is None
    try:
        try:
            raise inner
        except SpecError:
            raise RuntimeError("cleanup failed")  # not Prefect's: a new failure, not the user's mistake
    except RuntimeError as outer:
        assert user_error(outer) is None


@pytest.mark.slow
def test_run_is_quiet_and_prefects_logs_are_in_the_run_folder(prefect_cases):
    """A normal run (digits, 1 epoch): our lines only on the console; Prefect's own lines in DIR/tdml.log."""
    case = prefect_cases["quiet"]
    rc, text = case.result()
    assert rc == 0, text
    assert "final test accuracy" in text and "epoch 1: global test accuracy" in text
    for prefect_line in ("Finished in state", "Starting temporary server", "Beginning flow run", " | INFO ",
                         " | WARNING ", "Task run", "Flow run"):
        assert prefect_line not in text, text
    assert len(text.strip().splitlines()) <= 8, text
    log = (case.out / "tdml.log").read_text()
    assert "Starting temporary server" in log and "Finished in state Completed" in log
