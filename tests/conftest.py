import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# flows run in tests talk to a temporary Prefect server with its own database, not the user's
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="tdml-test-prefect-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# a developer's `make services-up` stays out of the tests: a spec's `chain: rpc` finds no services file here
os.environ["TDML_SERVICES"] = os.path.join(tempfile.mkdtemp(prefix="tdml-test-services-"), "services.json")
os.environ.setdefault("TDML_CACHE_DIR", tempfile.mkdtemp(prefix="tdml-test-cache-"))  # compiled contracts


@pytest.fixture(scope="session", autouse=True)
def prefect_server(tmp_path_factory):
    """One Prefect server for every flow the tests run (PREFECT_API_URL), instead of a temporary one per run.

    A user's PREFECT_API_URL is used as it is. The runs that check what ``make demo`` does start their own."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("prefect-server") / "server.log"
    prefect = Path(sys.executable).with_name("prefect")
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                                 "--no-services", "--no-ui"], stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the Prefect server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    os.environ["PREFECT_API_URL"] = url
    try:
        yield url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(params=["embedded", "anvil"])
def chain(request):
    from tdml_core.chain import Chain

    if request.param == "embedded":
        return Chain("embedded")
    return Chain(request.getfixturevalue("anvil_url"))


def _service(tmp_path_factory, env: str, script: str, name: str):
    url = os.environ.get(env)
    if url:
        yield url
        return
    pidfile = tmp_path_factory.mktemp(name) / f"{name}.pid"
    path = ROOT / "infra" / script
    out = subprocess.run([str(path), "start", str(pidfile)], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        pytest.fail(f"could not start {name}: {out.stderr.strip()[-2000:]}")
    try:
        yield out.stdout.strip()
    finally:
        subprocess.run([str(path), "stop", str(pidfile)], timeout=30)


@pytest.fixture(scope="session")
def anvil_url(tmp_path_factory):
    """A real anvil node: the one .ci/run started (TDML_ANVIL_URL), or one started here."""
    yield from _service(tmp_path_factory, "TDML_ANVIL_URL", "anvil.sh", "anvil")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3 server (SeaweedFS): the one .ci/run started (TDML_S3_ENDPOINT), or one started here."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "tdml")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "tdml")
    yield from _service(tmp_path_factory, "TDML_S3_ENDPOINT", "seaweedfs.sh", "seaweedfs")


@pytest.fixture(scope="session")
def ipfs_api(tmp_path_factory):
    """A real IPFS node's RPC API (host:port): TDML_IPFS_API, or one started here."""
    yield from _service(tmp_path_factory, "TDML_IPFS_API", "ipfs.sh", "ipfs")


@pytest.fixture(params=["local", "s3", "ipfs"])
def store_url(request, tmp_path):
    if request.param == "local":
        return f"local:{tmp_path / 'store'}"
    if request.param == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        return f"s3://tdml-test?endpoint={endpoint}"
    return f"ipfs://{request.getfixturevalue('ipfs_api')}"
