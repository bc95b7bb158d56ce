import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="session")
def anvil_url(tmp_path_factory):
    """A real anvil node: the one .ci/run started (TDML_ANVIL_URL), or one started here."""
    url = os.environ.get("TDML_ANVIL_URL")
    if url:
        yield url
        return
    pidfile = tmp_path_factory.mktemp("anvil") / "anvil.pid"
    script = ROOT / "infra" / "anvil.sh"
    out = subprocess.run([str(script), "start", str(pidfile)], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        pytest.fail(f"could not start anvil: {out.stderr.strip()}")
    try:
        yield out.stdout.strip()
    finally:
        subprocess.run([str(script), "stop", str(pidfile)], timeout=30)


@pytest.fixture(params=["embedded", "anvil"])
def chain(request):
    from tdml_core.chain import Chain

    if request.param == "embedded":
        return Chain("embedded")
    return Chain(request.getfixturevalue("anvil_url"))
