"""The tdml-train flow end to end: run, audit, tampering, a retried step, a killed run resumed."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tdml_core.protocol.audit import AuditFailure, audit
from tdml_core.protocol.job import JobRef

ROOT = Path(__file__).resolve().parents[1]
BUDGET = 10**18


def _spec(tmp_path: Path, **over) -> Path:
    data = yaml.safe_load((ROOT / "examples" / "digits.yaml").read_text())
    data.update(over)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def tdml(*args, env_extra=None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "flows.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900, **kw)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One real ``tdml run``: 3 epochs, 2 pipelines x 2 stages, embedded chain, local store."""
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "run"
    done = tdml("run", _spec(tmp, epochs=3), "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _quiet_audit(path, **kw):
    lines = []
    audit(path, say=lines.append, **kw)
    return lines


def test_a_run_pays_every_honest_participant_and_passes_its_audit(finished_run):
    data = json.loads((finished_run / "summary.json").read_text())

    assert data["status"] == "finished" and data["mode"] == "tdml-run"
    assert isinstance(data["job_id"], int)
    assert data["chain"]["chain_id"] > 0 and data["chain"]["tx_count"] > 50
    assert data["chain"]["market"].startswith("0x") and data["chain"]["ledger"].startswith("0x")
    assert data["store"] == f"local:{finished_run.resolve() / 'store'}"
    assert [e["epoch"] for e in data["epochs"]] == [0, 1, 2]
    assert data["final_accuracy"] > 0.85  # 3 epochs of the digits CNN; the full demo reaches 0.95+
    for epoch in data["epochs"]:
        assert epoch["global_model_cid"].startswith("baf")
        assert [v["slot"] for v in epoch["verdicts"]] == ["0/0", "0/1", "1/0", "1/1"]
        assert all(v["trainer"].startswith("0x") and v["malicious"] is False for v in epoch["verdicts"])
        assert all(lc["selected"] for lc in epoch["local"])
    assert data["evicted"] == []
    # 2 servers + 4 trainers, each credited one unit per epoch of 18 planned
    assert len(data["rewards"]) == 6
    assert set(data["rewards"].values()) == {BUDGET * 3 // 18}
    assert data["refund_wei"] == BUDGET - 6 * (BUDGET * 3 // 18)
    assert (finished_run / "accuracy.png").stat().st_size > 0

    checked = tdml("audit", finished_run)
    assert checked.returncode == 0, checked.stdout[-3000:]
    assert "audit passed" in checked.stdout and "scores reproduce" in checked.stdout


def test_starting_a_second_job_in_the_same_folder_is_refused(finished_run):
    again = tdml("run", finished_run.parent / "spec.yaml", "--out", finished_run)
    assert again.returncode == 2
    assert "already holds job" in again.stderr and "Traceback" not in again.stderr


def _copy(run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(run, dest)
    return dest


@pytest.mark.parametrize("kind", ["weights", "grad", "score", "verdicts", "global", "stage", "data", "test"])
def test_one_flipped_byte_in_the_store_fails_the_audit(finished_run, tmp_path, kind):
    from tdml_core.protocol.audit import Auditor
    from tdml_core.storage.store import LocalStore

    run = _copy(finished_run, tmp_path)
    events = [ev for ev in Auditor(run, say=lambda _: None).commitments() if ev["kind"] == kind]
    target = events[len(events) // 2]
    blob = LocalStore(run / "store")._path(target["cid"])
    raw = bytearray(blob.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    blob.write_bytes(bytes(raw))

    with pytest.raises(AuditFailure) as failure:
        _quiet_audit(run)
    assert f"{kind} {target['slot']}" in str(failure.value) and target["cid"] in str(failure.value)

    cli = tdml("audit", run)
    assert cli.returncode == 1 and "FAIL" in cli.stdout and target["cid"] in cli.stdout


def test_a_changed_committed_score_fails_the_audit(finished_run, tmp_path):
    """A validator that commits a score its model does not earn: the audit re-evaluates and says so."""
    from eth_account import Account
    from eth_account.typed_transactions import TypedTransaction
    from hexbytes import HexBytes
    from web3 import Web3

    from tdml_core.chain.compile import compile_contract
    from tdml_core.identity import Identity
    from tdml_core.protocol.audit import Auditor

    run = _copy(finished_run, tmp_path)
    job = Auditor(run, say=lambda _: None).job
    ledger = Web3().eth.contract(abi=compile_contract("Ledger").abi)
    keys = {i.address: i for i in (Identity.load(p) for p in (run / "keys").glob("*.json"))}
    journal = run / "chain.jsonl"
    lines = journal.read_text().splitlines()
    for n, line in enumerate(lines):
        entry = json.loads(line)
        tx = TypedTransaction.from_bytes(HexBytes(entry["raw"])).as_dict()
        if len(tx.get("to") or b"") != 20 or Web3.to_checksum_address(tx["to"]) != job.ledger.address:
            continue
        fn, args = ledger.decode_function_input(tx["data"])
        if fn.fn_name == "commit" and args["kind"] == "score" and args["epoch"] == 1 and args["slot"] == "0":
            break
    else:
        pytest.fail("no score commitment found in the journal")
    doc = job.get_doc("score/0", job.must(1, "score", "0"))
    doc["accuracy"] = round(doc["accuracy"] - 0.25, 6)
    cid, dig = job.put_doc("score/0", doc)
    validator = keys[Account.recover_transaction(bytes.fromhex(entry["raw"]))]
    tx = {k: v for k, v in tx.items() if k not in ("v", "r", "s", "type")}
    tx["data"] = ledger.encode_abi("commit", [1, "score", "0", cid, bytes.fromhex(dig)])
    signed = validator.account.sign_transaction(tx)
    lines[n] = json.dumps({"hash": signed.hash.hex(), "status": 1, "raw": bytes(signed.raw_transaction).hex()})
    journal.write_text("\n".join(lines) + "\n")

    with pytest.raises(AuditFailure, match=r"epoch 1 pipeline 0: committed score accuracy"):
        _quiet_audit(run)


def test_a_step_that_fails_once_is_retried_and_the_run_completes(tmp_path):
    from flows.train import tdml_train
    from tasks.step import FAIL_ONCE

    FAIL_ONCE.update({"publish task", "cross-validate", "aggregate"})
    try:
        data = tdml_train(spec_path=str(_spec(tmp_path, epochs=1)), out_dir=str(tmp_path / "run"))
    finally:
        left = set(FAIL_ONCE)
        FAIL_ONCE.clear()
    assert left == set()  # every injected failure happened, and was retried
    assert data["status"] == "finished" and len(data["epochs"]) == 1
    assert data["epochs"][0]["attempt"] == 0
    assert "audit" not in _quiet_audit(tmp_path / "run")[-1]  # passes: no exception


def test_a_killed_run_resumes_and_trains_only_the_remaining_epochs(tmp_path):
    spec, out = _spec(tmp_path, epochs=4), tmp_path / "run"

    killed = tdml("run", spec, "--out", out, env_extra={"TDML_TEST_KILL_AFTER_EPOCH": "2"}, start_new_session=True)
    assert killed.returncode == -signal.SIGKILL
    before = json.loads((out / "summary.json").read_text())
    assert before["status"] == "running" and [e["epoch"] for e in before["epochs"]] == [0, 1]

    resumed = tdml("run", spec, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    data = json.loads((out / "summary.json").read_text())
    assert data["resumed_from"] == 2 and data["trained_epochs"] == [2, 3]
    assert [e["epoch"] for e in data["epochs"]] == [0, 1, 2, 3]
    assert all(e["attempt"] == 0 for e in data["epochs"])  # no epoch was started twice
    assert JobRef.load(out).job_id == before["job_id"] == data["job_id"]
    _quiet_audit(out)


def test_a_run_on_a_real_node_and_s3_passes_its_audit(tmp_path, anvil_url, s3_endpoint):
    out = tmp_path / "run"
    done = tdml("run", _spec(tmp_path, epochs=1), "--out", out, "--chain", anvil_url,
                "--store", f"s3://tdml-flow?endpoint={s3_endpoint}")
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((out / "summary.json").read_text())
    assert data["chain"]["url"] == anvil_url and data["chain"]["chain_id"] == 31337
    assert data["store"].startswith("s3://tdml-flow")
    assert set(data["rewards"].values()) == {BUDGET // 6}
    assert not (out / "chain.jsonl").exists()  # the node keeps the chain; nothing to journal
    checked = tdml("audit", out)
    assert checked.returncode == 0, checked.stdout[-3000:]
