"""`make services-up` / `make services-down`: every real service on free ports, and one file with their addresses.

One slow test starts them all (infra/services.sh, what the make targets run), runs the `tdml-train/services`
deployment through the Prefect server on PostgreSQL and its worker, with a spec that says `chain: rpc` and
`store: s3` and no address, audits the run, sees a wrong S3 secret refused in one line, and stops them all.
"""

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ROOT / "infra" / "services.sh"
CHROMIUM = ROOT / "infra" / "chromium.sh"


def _page_text(path: Path) -> str:
    """The words of a dumped DOM, without its scripts and styles."""
    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", path.read_text(errors="replace"), flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text)))


def _shot(url: str, tmp_path: Path, name: str, want: tuple[str, ...] = ()) -> str:
    """A screenshot and the words of ``url``'s page; taken again (up to 3 times) until every word of ``want`` shows.

    The UI draws a page from several API answers: on a loaded machine the DOM can be dumped after the page's
    frame has drawn and before a list in it has (an artifacts page showing "3 Artifacts" and no names yet).
    """
    png, dom = tmp_path / f"ui-{name}.png", tmp_path / f"ui-{name}.html"
    for _ in range(3):
        shot = subprocess.run([str(CHROMIUM), "shot", url, str(png), str(dom)], capture_output=True, text=True,
                              timeout=300)
        assert shot.returncode == 0, shot.stderr[-2000:]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
        text = _page_text(dom)
        assert "Can't connect to Server API" not in text, text[-500:]
        if all(w in text for w in want):
            break
    return text


def _look_at_the_ui(api: str, run_id: str, run_name: str, job_id: int, tmp_path: Path) -> None:
    """The Prefect UI in headless Chromium: the run's page, its steps' task-run pages and the artifacts page.

    TDML_UI_SCREENSHOT=PATH keeps the run page's screenshot there (the README's picture)."""
    import urllib.request

    ui = api.removesuffix("/api")
    text = _shot(f"{ui}/runs/flow-run/{run_id}", tmp_path, "run", (run_name, "Task Runs", "Artifacts"))
    assert run_name in text and "tdml-train" in text and "Task Runs" in text and "Artifacts" in text, text[-1000:]
    query = json.dumps({"flow_runs": {"id": {"any_": [run_id]}}}).encode()
    req = urllib.request.Request(f"{api}/task_runs/filter", data=query, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        tasks = {t["name"].rsplit("-", 1)[0]: t["id"] for t in json.load(r)}
    for step in ("train stages", "cross-validate", "verify work", "aggregate", "reward"):
        text = _shot(f"{ui}/runs/task-run/{tasks[step]}", tmp_path, step.replace(" ", "-"),
                     (step, run_name, "Completed"))
        assert step in text and run_name in text and "Completed" in text, (step, text[-800:])
    keys = (f"tdml-job-{job_id}-epoch-0", f"tdml-job-{job_id}-accuracy", f"tdml-job-{job_id}-summary")
    text = _shot(f"{ui}/artifacts", tmp_path, "artifacts", keys)
    for key in keys:
        assert key in text, (key, text[-800:])
    keep = os.environ.get("TDML_UI_SCREENSHOT")
    if keep:
        shutil.copyfile(tmp_path / "ui-run.png", keep)


def _pids(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): int(p.read_text().split()[0]) for p in folder.rglob("*.pid")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    folder = tmp_path_factory.mktemp("services")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL",)}
    env["PREFECT_HOME"] = str(folder / "client-prefect")
    up = subprocess.run([str(SERVICES), "up", str(folder)], capture_output=True, text=True, timeout=600, env=env)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        doc = json.loads((folder / "services.json").read_text())
        yield folder, doc, up.stdout, env
    finally:
        pids = _pids(folder)
        down = subprocess.run([str(SERVICES), "down", str(folder)], capture_output=True, text=True, timeout=120)
        folder.joinpath("down.txt").write_text(down.stdout + down.stderr + json.dumps(pids))


@pytest.mark.slow
def test_services_up_serve_a_deployed_run_by_kind_alone_and_go_down_by_pid(services, tmp_path):
    folder, doc, printed, env = services
    assert (folder / "services.json").stat().st_mode & 0o777 == 0o600  # it holds the S3 secret
    assert set(doc["start_s"]) == {"chain", "ipfs", "s3", "postgres", "prefect"}
    assert doc["chain"].startswith("http://127.0.0.1:") and doc["prefect_database"].startswith("postgresql://")
    assert not list((folder / "prefect").rglob("*.db"))  # the Prefect server keeps nothing in SQLite
    for line in ("chain (anvil)", "IPFS RPC API", "S3 (SeaweedFS)", "PostgreSQL", "Prefect API"):
        assert line in printed

    env = {**env, "TDML_SERVICES": str(folder / "services.json"), "PREFECT_API_URL": doc["prefect_api"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(key, None)  # the worker's flow finds the S3 credentials in the services file
    spec = yaml.safe_load((ROOT / "examples" / "digits-services.yaml").read_text())
    spec.update(epochs=1, stages=1, dataset={"name": "digits", "limit": 400})
    spec_path, out = tmp_path / "spec.yaml", tmp_path / "run"
    spec_path.write_text(yaml.safe_dump(spec))
    prefect = Path(sys.executable).with_name("prefect")
    ran = subprocess.run([str(prefect), "deployment", "run", "tdml-train/services", "--watch",
                          "--watch-timeout", "600", "-p", f"spec_path={spec_path}", "-p", f"out_dir={out}"],
                         capture_output=True, text=True, timeout=700, env=env, cwd=ROOT)
    assert ran.returncode == 0, (ran.stdout + ran.stderr)[-3000:] + \
        (folder / "prefect" / "worker.pid.log").read_text()[-3000:]
    assert "finished successfully in 'Completed'" in ran.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert summary["chain"]["url"] == doc["chain"] and summary["chain"]["chain_id"] == 31337
    assert summary["store"] == f"s3://tdml?endpoint={doc['s3']['endpoint']}"
    assert len(summary["rewards"]) == 4 and all(w > 0 for w in summary["rewards"].values())
    assert not (out / "chain.jsonl").exists()  # the node keeps the chain
    audited = subprocess.run([sys.executable, "-m", "flows.cli", "audit", str(out)], capture_output=True,
                             text=True, timeout=600, env=env, cwd=ROOT)
    assert audited.returncode == 0, audited.stdout[-3000:]

    # what the run looks like in the Prefect UI of the services, opened in headless Chromium
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", ran.stdout).group(1)
    run_name = re.search(r"Created flow run '([^']+)'", ran.stdout).group(1)
    _look_at_the_ui(doc["prefect_api"], run_id, run_name, summary["job_id"], tmp_path)

    # the S3 server requires its credentials: a wrong secret is refused before anything starts, in one line
    wrong = {**env, "AWS_ACCESS_KEY_ID": doc["s3"]["access_key_id"], "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    refused = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(spec_path), "--out",
                              str(tmp_path / "refused")], capture_output=True, text=True, timeout=300, env=wrong,
                             cwd=ROOT)
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0, refused.stderr
    assert "credentials refused" in refused.stderr and doc["s3"]["endpoint"] in refused.stderr

    pids = _pids(folder)
    assert {"anvil.pid", "ipfs.pid", "s3.pid", "postgres/postgres.pid", "prefect/server.pid",
            "prefect/worker.pid"} <= set(pids)
    down = subprocess.run([str(SERVICES), "down", str(folder)], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert not (folder / "services.json").exists()
    assert [name for name, pid in pids.items() if _alive(pid)] == []


def test_a_spec_naming_a_service_with_no_services_file_is_refused_in_one_line(tmp_path):
    spec = yaml.safe_load((ROOT / "examples" / "digits-services.yaml").read_text())
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "TDML_SERVICES": str(tmp_path / "none" / "services.json")}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(spec_path), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 2
    line = done.stderr.strip()
    assert "\n" not in line and "store: s3 needs the services' addresses" in line and "make services-up" in line
    assert not (tmp_path / "r").exists()  # nothing left behind
