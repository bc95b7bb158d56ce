"""The tdml-train flow end to end: run, audit, tampering, a retried step, a killed run resumed."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tdml_core.chain.market import Kind
from tdml_core.protocol.audit import AuditFailure, audit
from tdml_core.protocol.job import JobRef

ROOT = Path(__file__).resolve().parents[1]
BUDGET = 10**18
SMALL = {"stages": 1, "dataset": {"name": "digits", "limit": 400}}  # 2 pipelines x 1 stage: every protocol step


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
    """One real ``tdml run``: 3 epochs, 2 pipelines x 2 stages, embedded chain, local store.

    Trainer 0/1's stage process is killed as epoch 1 starts: its pipeline's trainers are started again.
    """
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "run"
    # 4 checked steps per trainer and epoch (and the last), not all 22: the forged run checks every step
    done = tdml("run", _spec(tmp, epochs=3, verification={"checks": 4}), "--out", out,
                env_extra={"TDML_TEST_KILL_STAGE": "0/1@1"})
    assert done.returncode == 0, done.stderr[-3000:]
    (out / "stdout.txt").write_text(done.stdout)
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
    assert data["refund_wei"] == BUDGET - BUDGET * 18 // 18 == 0
    assert (finished_run / "accuracy.png").stat().st_size > 0
    # the killed trainer, and its pipeline's other trainer, were started afresh in epoch 1, and the run says so
    assert [e["restarted"] for e in data["epochs"]] == [[], ["0/0", "0/1"], []]
    assert "killed by SIGKILL" in data["epochs"][1]["failures"][0]
    said = (finished_run / "stdout.txt").read_text()
    assert "restarted trainers 0/0 0/1" in said
    # two pipelines: the update stage cannot judge, and the run says so once
    assert said.count("detection: 2 pipelines: too few for the update stage to separate; scores alone judge") == 1

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


@pytest.mark.parametrize("kind", ["weights", "grad", "score", "verdicts", "global", "stage", "data", "eval"])
def test_one_flipped_byte_in_the_store_fails_the_audit(finished_run, tmp_path, kind):
    from tdml_core.protocol.audit import Auditor
    from tdml_core.storage.store import LocalStore

    run = _copy(finished_run, tmp_path)
    events = [ev for ev in Auditor(run, say=lambda _: None).commitments() if ev["slot"].kind.label == kind]
    target = events[len(events) // 2]
    blob = LocalStore(run / "store")._path(target["cid"])
    raw = bytearray(blob.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    blob.write_bytes(bytes(raw))

    with pytest.raises(AuditFailure) as failure:
        _quiet_audit(run)
    assert str(target["slot"]) in str(failure.value) and target["cid"] in str(failure.value)

    if kind == "weights":  # the command says the same (one process start is enough to show it)
        cli = tdml("audit", run)
        assert cli.returncode == 1 and "FAIL" in cli.stdout and target["cid"] in cli.stdout


def _recommit_doc(run: Path, kind, epoch: int, pipeline: int, edit) -> None:
    """Rewrite the journal so that the (epoch, kind, pipeline) commitment names ``edit(doc)`` instead,
    signed again by the key that signed it: a participant committing a document of its own making."""
    from eth_account import Account
    from eth_account.typed_transactions import TypedTransaction
    from hexbytes import HexBytes
    from web3 import Web3

    from tdml_core.chain.compile import compile_contract
    from tdml_core.identity import Identity
    from tdml_core.protocol.audit import Auditor

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
        if fn.fn_name == "commit" and args["kind"] == kind and args["epoch"] == epoch and args["pipeline"] == pipeline:
            break
    else:
        pytest.fail(f"no {kind!r} commitment of epoch {epoch} pipeline {pipeline} found in the journal")
    doc = edit(job.get_doc(job.must(epoch, kind, pipeline, 0, args["attempt"]), kind, pipeline))
    cid, dig = job.put_doc(kind, doc, pipeline)
    signer = keys[Account.recover_transaction(bytes.fromhex(entry["raw"]))]
    tx = {k: v for k, v in tx.items() if k not in ("v", "r", "s", "type")}
    tx["data"] = ledger.encode_abi("commit", [epoch, kind, pipeline, 0, args["attempt"], cid, bytes.fromhex(dig)])
    signed = signer.account.sign_transaction(tx)
    lines[n] = json.dumps({**entry, "hash": signed.hash.hex(), "status": 1, "raw": bytes(signed.raw_transaction).hex()})
    journal.write_text("\n".join(lines) + "\n")


def test_a_changed_committed_score_fails_the_audit(finished_run, tmp_path):
    """A validator that commits a score its model does not earn: the audit re-evaluates and says so."""
    from tdml_core.chain.market import Kind

    def lower(doc):
        doc["accuracy"] = round(doc["accuracy"] - 0.25, 6)
        return doc

    run = _copy(finished_run, tmp_path)
    _recommit_doc(run, Kind.SCORE, 1, 0, lower)

    with pytest.raises(AuditFailure, match=r"epoch 1 pipeline 0: committed score accuracy"):
        _quiet_audit(run)


def test_a_step_that_fails_once_is_retried_and_the_run_completes(tmp_path):
    from flows.train import tdml_train
    from tasks.step import FAIL_ONCE

    FAIL_ONCE.update({"publish task", "cross-validate", "aggregate"})
    try:
        data = tdml_train(spec_path=str(_spec(tmp_path, epochs=1, **SMALL)), out_dir=str(tmp_path / "run"))
    finally:
        left = set(FAIL_ONCE)
        FAIL_ONCE.clear()
    assert left == set()  # every injected failure happened, and was retried
    assert data["status"] == "finished" and len(data["epochs"]) == 1
    assert data["epochs"][0]["attempt"] == 0
    assert "audit" not in _quiet_audit(tmp_path / "run")[-1]  # passes: no exception


OUTER = {"epochs": 2, "rounds_per_epoch": 2, "verification": {"checks": 4},  # 2 x 2, 4 rounds, an outer Nesterov step
         "aggregation": {"rule": "top_k", "outer_lr": 0.9, "outer_momentum": 0.5}}


def test_tdml_run_and_tdml_train_agree_epoch_for_epoch_and_the_audit_re_applies_the_outer_step(tmp_path):
    """The same spec and seed: the protocol and the engine give the same local and global numbers every epoch.

    Two rounds an epoch, each a full protocol round (4 on the ledger). The engine has
    no detection: the two agree while the protocol flags nobody, as here (asserted)."""
    from flows.train import tdml_train
    from tdml_core.config import load_spec
    from tdml_core.runtime.engine import train

    spec_path = _spec(tmp_path, **OUTER)
    flow = tdml_train(spec_path=str(spec_path), out_dir=str(tmp_path / "run"))
    engine = train(load_spec(spec_path))
    assert len(flow["epochs"]) == len(engine.epochs) == 4
    for f, e in zip(flow["epochs"], engine.epochs):
        for key in ("global_accuracy", "global_loss", "global_val_accuracy", "global_val_loss"):
            assert f[key] == pytest.approx(e[key], rel=1e-6, abs=1e-7), (f["epoch"], key)
        assert [lc["accuracy"] for lc in f["local"]] == pytest.approx([lc["accuracy"] for lc in e["local"]], abs=1e-9)
        assert [lc["loss"] for lc in f["local"]] == pytest.approx([lc["loss"] for lc in e["local"]], rel=1e-6)
        assert "outer step lr 0.9 with Nesterov momentum 0.5" in f["aggregation"]
        assert not any(lc["flagged"] for lc in f["local"]) and all(lc["selected"] for lc in f["local"])
    from tdml_core.protocol.audit import Auditor
    from tdml_core.protocol.steps import local_model
    from tdml_core.robust.aggregate import average_states

    said = []
    auditor = Auditor(tmp_path / "run", say=said.append)
    auditor.run()  # raises on a global model the outer step does not re-derive
    assert any("outer step lr 0.9 with Nesterov momentum 0.5" in line for line in said)
    # the outer step moved the model: the plain average of the last epoch's local models is not the global model
    job = auditor.job
    assert job.ledger.global_epochs == 4 and auditor.task["epochs"] == 4  # the market's task counts rounds
    plain = average_states([local_model(job, p, 3, 0) for p in range(2)])
    committed = job.get_state(job.must(3, Kind.GLOBAL), Kind.GLOBAL)
    assert plain.keys() == committed.keys() and len(plain) > 4
    assert max(float((plain[k] - committed[k]).abs().max()) for k in plain if plain[k].is_floating_point()) > 1e-3


def test_a_run_on_a_real_node_and_s3_passes_its_audit(tmp_path, anvil_url, s3_endpoint):
    out = tmp_path / "run"
    done = tdml("run", _spec(tmp_path, epochs=1, **SMALL), "--out", out, "--chain", anvil_url,
                "--store", f"s3://tdml-flow?endpoint={s3_endpoint}")
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((out / "summary.json").read_text())
    assert data["chain"]["url"] == anvil_url and data["chain"]["chain_id"] == 31337
    assert data["store"].startswith("s3://tdml-flow")
    assert len(data["rewards"]) == 4 and set(data["rewards"].values()) == {BUDGET // 4}
    assert not (out / "chain.jsonl").exists()  # the node keeps the chain; nothing to journal
    checked = tdml("audit", out)
    assert checked.returncode == 0, checked.stdout[-3000:]


# -- the ledger's owners, the audit's reach, least-privilege keys ---------------------------------------------------
def _journal_call(run: Path, fn_name: str, match) -> tuple[list[str], int, dict, dict]:
    """(journal lines, index, decoded tx, decoded args) of the first ledger call ``fn_name`` whose args match."""
    from eth_account.typed_transactions import TypedTransaction
    from hexbytes import HexBytes
    from web3 import Web3

    from tdml_core.chain.compile import compile_contract

    ledger_address = JobRef.load(run).ledger
    ledger = Web3().eth.contract(abi=compile_contract("Ledger").abi)
    lines = (run / "chain.jsonl").read_text().splitlines()
    for n, line in enumerate(lines):
        entry = json.loads(line)
        tx = TypedTransaction.from_bytes(HexBytes(entry["raw"])).as_dict()
        if len(tx.get("to") or b"") != 20 or Web3.to_checksum_address(tx["to"]) != ledger_address:
            continue
        fn, args = ledger.decode_function_input(tx["data"])
        if fn.fn_name == fn_name and match(args):
            return lines, n, tx, args
    pytest.fail(f"no {fn_name} call found in the journal")


def test_a_commitment_signed_by_another_trainer_fails_the_audit(finished_run, tmp_path):
    """Trainer 1/0 signs trainer 0/1's weights commitment: the ledger refuses it, so the run's record breaks."""
    from tdml_core.chain.market import Kind
    from tdml_core.identity import Identity

    run = _copy(finished_run, tmp_path)
    lines, n, tx, _ = _journal_call(run, "commitWork", lambda a: a["pipeline"] == 0 and a["stage"] == 1
                                    and a["epoch"] == 2)  # its one work transaction: weights, gradient, root
    from eth_account import Account

    other = Identity.load(run / "keys" / "trainer-1-0.json")
    nonce = sum(Account.recover_transaction(bytes.fromhex(json.loads(line)["raw"])) == other.address
                for line in lines[:n])
    tx = {k: v for k, v in tx.items() if k not in ("v", "r", "s", "type")}
    signed = other.account.sign_transaction({**tx, "nonce": nonce})
    lines[n] = json.dumps({**json.loads(lines[n]), "hash": signed.hash.hex(), "raw": bytes(signed.raw_transaction).hex()})
    (run / "chain.jsonl").write_text("\n".join(lines) + "\n")

    with pytest.raises(AuditFailure, match="re-executes differently"):
        _quiet_audit(run)


@pytest.fixture(scope="module")
def audited_copy(finished_run, tmp_path_factory):
    """An auditor that has re-derived everything of a copy of the run, and the run's own summary.json."""
    from tdml_core.protocol.audit import Auditor

    run = _copy(finished_run, tmp_path_factory.mktemp("audited"))
    auditor = Auditor(run, say=lambda _: None)
    auditor.run()
    return auditor, (run / "summary.json").read_text()


@pytest.mark.parametrize("field,edit", [
    ("final_accuracy", lambda d: d.update(final_accuracy=0.999)),
    ("epoch 1 global_accuracy", lambda d: d["epochs"][1].update(global_accuracy=0.5)),
    ("epoch 0 pipeline 1 accuracy", lambda d: d["epochs"][0]["local"][1].update(accuracy=0.99)),
    ("epoch 2 verdicts", lambda d: d["epochs"][2]["verdicts"][0].update(malicious=True)),
    ("rewards", lambda d: d["rewards"].update({next(iter(d["rewards"])): 1})),
    ("refund_wei", lambda d: d.update(refund_wei=5)),
])
def test_a_rewritten_summary_fails_the_audit(audited_copy, field, edit):
    auditor, honest = audited_copy
    data = json.loads(honest)
    edit(data)
    (auditor.out / "summary.json").write_text(json.dumps(data))

    with pytest.raises(AuditFailure, match=f"summary.json {field} is"):
        auditor.check_summary()


def test_each_trainer_opens_only_its_own_shard_and_stage(finished_run):
    """Trainer 0/1 holds its pipeline's data key and its own stage's keys: nothing of others, nor the eval set."""
    from tdml_core.artifacts import get_state
    from tdml_core.chain.market import Kind
    from tdml_core.crypto import CryptoError
    from tdml_core.identity import Identity, open_secrets
    from tdml_core.protocol.keys import JobKeys, role_of

    auditor = __import__("tdml_core.protocol.audit", fromlist=["Auditor"]).Auditor(finished_run, say=lambda _: None)
    job = auditor.job
    me = Identity.load(finished_run / "keys" / "trainer-0-1.json")
    client_pub, server_pub = job.public_key(job.people.client.address), job.public_key(job.server_address(0))
    held = {}
    held.update(open_secrets(me, client_pub, job.job_id, "data-key", bytes(job.store.get(job.must(0, Kind.DATA_KEY, 0, 1).cid))))
    held.update(open_secrets(me, server_pub, job.job_id, "trainer-keys",
                             bytes(job.store.get(job.must(0, Kind.TRAINER_KEYS, 0, 1).cid))))
    assert sorted(held) == ["data/0", "spec", "stage/1", "weights/0/1"]
    keys = JobKeys.from_doc(held)

    def opens(kind, p=0, s=0, epoch=0, attempt=0) -> bool:
        c = job.must(epoch, kind, p, s, attempt)
        try:
            get_state(job.store, keys.for_kind(kind, p, s), job.job_id, role_of(kind, p, s), c.cid, c.digest)
            return True
        except CryptoError:
            return False

    assert opens(Kind.DATA, 0) and opens(Kind.STAGE, 0, 1, epoch=1) and opens(Kind.WEIGHTS, 0, 1, epoch=1)
    assert not opens(Kind.DATA, 1)  # the other pipeline's shard
    assert not opens(Kind.EVAL)  # the set its model is scored on
    assert not opens(Kind.STAGE, 0, 0, epoch=1)  # the other stage's input
    assert not opens(Kind.WEIGHTS, 0, 0, epoch=1) and not opens(Kind.WEIGHTS, 1, 1, epoch=1)  # others' weights
    assert not opens(Kind.GLOBAL, epoch=1)  # the whole global model
    with pytest.raises(CryptoError):  # the servers' envelope is not sealed to it
        open_secrets(me, client_pub, job.job_id, "server-keys", bytes(job.store.get(job.must(0, Kind.SERVER_KEYS, 0).cid)))


def test_a_state_is_opened_once_per_process_and_a_wrong_digest_is_still_refused(finished_run):
    """Job.get_state keeps what it opened: the second read is the same tensors without a fetch; a commitment
    naming the same artifact with another digest misses the cache and is refused as before."""
    from tdml_core.chain.market import Commitment, Kind
    from tdml_core.storage import IntegrityError

    job = __import__("tdml_core.protocol.audit", fromlist=["Auditor"]).Auditor(finished_run, say=lambda _: None).job
    c = job.must(1, Kind.WEIGHTS, 0, 1)
    first, hits = job.get_state(c, Kind.WEIGHTS, 0, 1), job.opened.hits
    again = job.get_state(c, Kind.WEIGHTS, 0, 1)
    assert job.opened.hits == hits + 1 and again.keys() == first.keys() and again is not first
    assert all(torch.equal(again[k], first[k]) for k in first)
    other = job.must(1, Kind.WEIGHTS, 1, 1).digest
    with pytest.raises(IntegrityError, match="committed digest"):
        job.get_state(Commitment(c.cid, other, c.writer), Kind.WEIGHTS, 0, 1)


def test_servers_score_on_the_validation_set_and_the_test_set_stays_with_the_client(finished_run):
    """What the servers were sealed to score with is the validation set; the reported accuracies are the test set's."""
    from tdml_core.config import load_spec
    from tdml_core.data import load_dataset
    from tdml_core.protocol.audit import Auditor
    from tdml_core.robust.validate import evaluate

    job = Auditor(finished_run, say=lambda _: None).job
    job.spec = load_spec(finished_run.parent / "spec.yaml")
    committed_x, committed_y, _ = job.eval_set()
    ds = load_dataset(job.spec.dataset, job.spec.seed)
    assert torch.equal(committed_x, ds.val_x) and torch.equal(committed_y, ds.val_y)
    rows = {r.numpy().tobytes() for r in committed_x.reshape(len(committed_x), -1)}
    assert not rows & {r.numpy().tobytes() for r in ds.test_x.reshape(len(ds.test_x), -1)}
    data = json.loads((finished_run / "summary.json").read_text())
    assert "test set" in data["accuracy_sets"]["final_accuracy, global_accuracy, global_loss"]
    for e in data["epochs"]:  # both sets reported, each as its own number
        assert 0 < e["global_accuracy"] <= 1 and 0 < e["global_val_accuracy"] <= 1
    # the validation accuracy is the model scored on the committed set, the test accuracy on the client's own
    global_state = job.get_state(job.must(2, Kind.GLOBAL), Kind.GLOBAL)
    model = job.new_model()
    model.load_state_dict(global_state)
    assert evaluate(model, committed_x, committed_y)[0] == pytest.approx(data["epochs"][2]["global_val_accuracy"])
    assert evaluate(model, ds.test_x, ds.test_y)[0] == pytest.approx(data["final_accuracy"])


def _broken_copy(finished_run, tmp_path, how: str) -> Path:
    run = _copy(finished_run, tmp_path)
    ref = json.loads((run / "job.json").read_text())
    if how == "no journal":
        (run / "chain.jsonl").unlink()
    elif how == "another run's journal":
        from tdml_core.chain import Chain

        other = Chain("embedded", journal=tmp_path / "other.jsonl")
        other.fund("0x000000000000000000000000000000000000dEaD", 1)
        shutil.copy(tmp_path / "other.jsonl", run / "chain.jsonl")
    elif how == "damaged market address":
        ref["market"] = ref["market"][:-4] + "zzzz"
    elif how == "moved ledger_block":
        ref["ledger_block"] += 3
    (run / "job.json").write_text(json.dumps(ref))
    return run


@pytest.mark.parametrize("how,says", [
    ("no journal", "chain.jsonl is missing"),
    ("another run's journal", "no market contract at"),
    ("damaged market address", "cannot open the job's contracts"),
    ("moved ledger_block", "job.json says the ledger opened at block"),
])
def test_a_damaged_run_folder_fails_the_audit_in_one_line(finished_run, tmp_path, how, says):
    run = _broken_copy(finished_run, tmp_path, how)
    cli = tdml("audit", run)
    out = cli.stdout + cli.stderr
    assert cli.returncode == 1 and says in out, out[-2000:]
    assert "Traceback" not in out and len(out.strip().splitlines()) <= 3


# -- money survives crashes -------------------------------------------------------------------------------------------
def test_a_run_killed_after_each_money_moving_transaction_resumes_to_one_correct_settlement(tmp_path):
    """Killed right after publishTask, openLedger, the first global model, the first credit and settle;
    resumed each time: one task, no epoch trained twice, one settlement, everyone paid once, the audit passes."""
    from tdml_core.chain import Chain
    from tdml_core.chain.market import MarketClient

    spec, out = _spec(tmp_path, epochs=2, **SMALL), tmp_path / "run"
    kills = [("TDML_TEST_KILL_AFTER_TX", "publishTask"), ("TDML_TEST_KILL_AFTER_TX", "openLedger"),
             ("TDML_TEST_KILL_AFTER_EPOCH", "1"), ("TDML_TEST_KILL_AFTER_TX", "credit"),
             ("TDML_TEST_KILL_AFTER_TX", "settle")]
    for i, (hook, at) in enumerate(kills):
        args = ["run", spec, "--out", out] + (["--resume"] if i else [])
        killed = tdml(*args, env_extra={hook: at}, start_new_session=True)
        assert killed.returncode == -signal.SIGKILL, f"{at}: {killed.stderr[-2000:]}"
        if hook == "TDML_TEST_KILL_AFTER_EPOCH":
            before = json.loads((out / "summary.json").read_text())
            assert before["status"] == "running" and [e["epoch"] for e in before["epochs"]] == [0]
        if at == "credit":  # the run after the epoch kill trained only the epoch that was left
            assert json.loads((out / "summary.json").read_text())["trained_epochs"] == [1]
    resumed = tdml("run", spec, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    data = json.loads((out / "summary.json").read_text())
    assert data["status"] == "finished" and data["resumed_from"] == 2
    assert [e["epoch"] for e in data["epochs"]] == [0, 1] and all(e["attempt"] == 0 for e in data["epochs"])
    assert len(data["rewards"]) == 4 and set(data["rewards"].values()) == {BUDGET * 2 // 8}
    ref = JobRef.load(out)
    market = MarketClient(Chain("embedded", journal=out / "chain.jsonl"), ref.market)
    assert market.c.functions.task_count().call() == 1  # published once
    task = market.task(ref.job_id)
    assert task["settled"] and task["ledger"] == ref.ledger
    assert market.escrowed == BUDGET - 4 * (BUDGET * 2 // 8)  # only the rounding dust is left
    _quiet_audit(out)


BOND = 10**16
FORGED = {"epochs": 3, "attacks": [{"slot": "0/0", "kind": "forged_output", "from_epoch": 1}],
          "protocol": {"standby_trainers": 1, "bond_wei": BOND}}  # the spec of finished_run, and one forger


def _attacked_run(tmp_path_factory, name: str, spec: dict) -> Path:
    """One ``tdml run`` of ``spec``; what it printed goes beside the run folder, in stdout.txt."""
    tmp = tmp_path_factory.mktemp(name)
    out = tmp / "run"
    done = tdml("run", _spec(tmp, **spec), "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    (tmp / "stdout.txt").write_text(done.stdout)
    return out


@pytest.fixture(scope="module")
def forged_run(tmp_path_factory) -> Path:
    """2 pipelines x 2 stages; trainer 0/0 sends made-up activations downstream from epoch 1, inside its own process."""
    return _attacked_run(tmp_path_factory, "forged", FORGED)


def test_a_forging_trainer_is_convicted_by_its_fraud_proof_forfeits_its_bond_and_is_replaced(forged_run, finished_run):
    from tdml_core.protocol.audit import Auditor
    from tdml_core.protocol.rewards import payout, planned_units

    data = json.loads((forged_run / "summary.json").read_text())
    by_epoch = {e["epoch"]: {v["slot"]: v for v in e["verdicts"]} for e in data["epochs"]}
    checked = {e["epoch"]: {c["slot"]: c for c in e["checked"]} for e in data["epochs"]}
    forger, neighbour = by_epoch[0]["0/0"]["trainer"], by_epoch[0]["0/1"]["trainer"]
    assert not any(c["failed"] for c in checked[0].values()) and len(checked[0]) == 4  # honest until epoch 1
    assert all(c["max_diff"] < 1e-4 for e in checked.values() for c in e.values() if not c["failed"])
    # caught in the epoch it starts, on what it sent: the receiver of the forged activations is not blamed
    assert checked[1]["0/0"]["failed"] and checked[1]["0/0"]["failure"]["what"] == "outputs"
    assert [s for s, c in checked[1].items() if c["failed"]] == ["0/0"]
    v = by_epoch[1]["0/0"]
    assert v["proven"] and v["malicious"] and v["trainer"] == forger and v["reason"].startswith("fraud proof")
    assert not by_epoch[1]["0/1"]["flagged"] and not by_epoch[1]["0/1"]["malicious"]
    assert not any(v["malicious"] or v["flagged"] for e in by_epoch.values() for s, v in e.items()
                   if v["trainer"] != forger)  # no honest trainer is ever accused
    (swap,) = data["epochs"][1]["replaced"]
    assert swap["slot"] == "0/0" and swap["evicted"] == forger and swap["replacement"]
    assert by_epoch[2]["0/0"]["trainer"] == swap["replacement"] and not checked[2]["0/0"]["failed"]
    assert [e["local"][0]["selected"] for e in data["epochs"]] == [True, False, True]  # out of epoch 1's average
    said = [line for line in (forged_run.parent / "stdout.txt").read_text().splitlines() if line.startswith("epoch 2:")]
    assert "convicted 0/0 (fraud proof, bond forfeited)" in said[0] and "0/0 replaced by a standby" in said[0]
    # the same spec without the forger (fewer checks, and a stage restarted in epoch 1): the forgery cost the model
    # nothing beyond a point (3 epochs of digits vary by about 2 points either way from such differences alone)
    clean = json.loads((finished_run / "summary.json").read_text())
    assert data["final_accuracy"] >= clean["final_accuracy"] - 0.01, (data["final_accuracy"], clean["final_accuracy"])

    lines = _quiet_audit(forged_run)  # re-draws and re-runs every challenge; raises on the first mismatch
    assert any(line.startswith("ok") and "epoch 1: " in line and "(1 fraud proofs)" in line for line in lines)
    assert any("1 forfeited to the client" in line for line in lines)
    job = Auditor(forged_run, say=lambda _: None).job
    assert job.ledger.forfeited(forger) and job.ledger.evicted(forger) and job.ledger.earned(forger) == 0
    assert job.ledger.proof_of(forger) == job.must(1, Kind.CHECKS, 0).digest  # the evidence it was convicted on
    paid = {}
    for ev in job.chain.logs(job.market.c, "Paid", job.ref.ledger_block):
        paid[ev["who"]] = paid.get(ev["who"], 0) + ev["amount"]
    planned = planned_units(3, 2, 2)
    assert forger not in paid  # neither pay nor its bond
    assert paid[neighbour] == payout(BUDGET, 3, planned) + BOND  # the receiver of the forgery: every epoch
    assert paid[swap["replacement"]] == payout(BUDGET, 1, planned) + BOND
    assert paid[job.people.client.address] == data["refund_wei"] + BOND  # its refund and the forfeited bond
    assert data["refund_wei"] - (BUDGET - sum(data["rewards"].values())) in range(-8, 1)  # rounding dust only


def _accuse(doc: dict, slot: str) -> dict:
    (t,) = [t for t in doc["trainers"] if t["slot"] == slot]
    t["failed"] = True
    t["findings"][0].update(ok=False, what="outputs", detail="the activations sent are not what its inputs give")
    return doc


def test_checks_that_accuse_an_honest_trainer_fail_the_audit_naming_it(forged_run, tmp_path):
    """The referee of pipeline 1 commits evidence against its honest trainer 1/0: re-running it, the audit says so."""
    run = _copy(forged_run, tmp_path)
    _recommit_doc(run, Kind.CHECKS, 2, 1, lambda d: _accuse(d, "1/0"))

    with pytest.raises(AuditFailure, match=r"epoch 2: the checks accuse trainer 1/0 .* the evidence does not support it"):
        _quiet_audit(run)


def test_a_verdict_against_an_honest_trainer_fails_the_audit_naming_it(forged_run, tmp_path):
    """The aggregating server commits a fraud-proof verdict on honest trainer 1/1: the audit re-derives and says so."""
    def convict(doc):
        (v,) = [v for v in doc["verdicts"] if v["slot"] == "1/1"]
        v.update(flagged=True, malicious=True, proven=True, reason="fraud proof")
        return doc

    run = _copy(forged_run, tmp_path)
    _recommit_doc(run, Kind.VERDICTS, 2, 0, convict)

    with pytest.raises(AuditFailure, match=r"epoch 2: the verdict on trainer 1/1 is .*'proven': True"):
        _quiet_audit(run)


ATTACKED = {"data_parallel": 3, "stages": 1, "epochs": 4, "top_k": 2, "dataset": {"name": "digits", "limit": 600},
            "attacks": [{"slot": "1/0", "kind": "sign_flip", "from_epoch": 1}], "protocol": {"standby_trainers": 2},
            "detection": {"evict_after": 2, "window": 3},  # evicted on its second flag: the replacement trains once
            "verification": {"enabled": False}}  # statistics alone: with checks on, its first epoch convicts it


@pytest.fixture(scope="module")
def attacked_run(tmp_path_factory) -> Path:
    """3 pipelines x 1 stage; trainer 1/0 flips the sign of its update from epoch 1, inside its own process.

    Verification is off, so what catches it is detection from the updates (the robustness path)."""
    return _attacked_run(tmp_path_factory, "attacked", ATTACKED)


def test_a_sign_flipping_trainer_is_evicted_replaced_and_unpaid_and_the_audit_re_derives_it(attacked_run):
    from tdml_core.protocol.audit import Auditor
    from tdml_core.protocol.rewards import payout, planned_units

    data = json.loads((attacked_run / "summary.json").read_text())
    by_epoch = {e["epoch"]: {v["slot"]: v for v in e["verdicts"]} for e in data["epochs"]}
    attacker = by_epoch[0]["1/0"]["trainer"]
    assert not any(v["flagged"] for v in by_epoch[0].values())  # honest until epoch 1
    assert by_epoch[1]["1/0"]["flagged"] and not by_epoch[1]["1/0"]["malicious"]  # flagged once: not yet evicted
    assert by_epoch[2]["1/0"]["malicious"] and by_epoch[2]["1/0"]["trainer"] == attacker
    honest = [v for e in by_epoch.values() for s, v in e.items() if v["trainer"] != attacker]
    assert honest and not any(v["flagged"] for v in honest)  # no false accusation
    (swap,) = data["epochs"][2]["replaced"]
    assert swap["slot"] == "1/0" and swap["evicted"] == attacker and swap["replacement"]
    assert by_epoch[3]["1/0"]["trainer"] == swap["replacement"] and not by_epoch[3]["1/0"]["flagged"]
    assert data["evicted"] == ["1/0"]
    said = {line.split(":")[0]: line for line in (attacked_run.parent / "stdout.txt").read_text().splitlines()
            if line.startswith("epoch ")}  # what the user saw, epoch by epoch
    assert "flagged 1/0" in said["epoch 2"] and "evicted 1/0  1/0 replaced by a standby" in said["epoch 3"]
    assert "flagged" not in said["epoch 1"] + said["epoch 4"]
    # the picture of the detector's view (also the run's Prefect image artifact): only epochs that flagged someone
    assert [(attacked_run / f"verdicts-epoch-{e + 1}.png").is_file() for e in range(4)] == [False, True, True, False]
    assert (attacked_run / "verdicts-epoch-2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the flagged epochs of pipeline 1 stayed out of the global model; the last one is in again
    assert [e["local"][1]["flagged"] for e in data["epochs"]] == [False, True, True, False]

    lines = _quiet_audit(attacked_run)  # raises on the first mismatch
    assert any(line.startswith("ok") and "epoch 1: " in line and "(1 flagged)" in line for line in lines)
    job = Auditor(attacked_run, say=lambda _: None).job
    assert job.ledger.evicted(attacker) and job.ledger.earned(attacker) == 0
    assert job.trainer_address(1, 0) == swap["replacement"]
    one = payout(10**18, 1, planned_units(4, 3, 1))
    assert data["rewards"][attacker] == 0
    assert data["rewards"][swap["replacement"]] == job.ledger.earned(swap["replacement"]) == one  # epoch 3
    assert data["rewards"][by_epoch[0]["0/0"]["trainer"]] == payout(10**18, 4, planned_units(4, 3, 1))


def test_a_verdict_altered_by_the_aggregator_fails_the_audit_naming_it(attacked_run, tmp_path):
    """The aggregating server commits verdicts that clear the attacker at epoch 1: the audit re-derives and says so."""

    def clear(doc):
        (v,) = [v for v in doc["verdicts"] if v["slot"] == "1/0"]
        v["flagged"], v["reason"] = False, "clean"
        return doc

    run = _copy(attacked_run, tmp_path)
    _recommit_doc(run, Kind.VERDICTS, 1, 0, clear)

    with pytest.raises(AuditFailure, match=r"epoch 1: the verdict on trainer 1/0 is .*'flagged': False"):
        _quiet_audit(run)
