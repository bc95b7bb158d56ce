"""Gas per contract call and signed transactions per second, embedded EVM beside anvil.

    python bench/chain_bench.py [--txs 200]

Starts anvil with infra/anvil.sh (unless TDML_ANVIL_URL is set), runs one whole
job's contract calls on each backend (publish, hire, open the ledger, one epoch's
commits, credit, evict, replace, finish, settle, claim), then sends --txs signed
ledger commits and times them.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from eth_account import Account

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tdml_core.chain import Chain, MarketClient  # noqa: E402
from tdml_core.chain.market import Kind, Slot  # noqa: E402

ETH = 10**18
BOND = 10**15
CID = "bafybeiacar55miutwskxzrxgkwc5lpg7exkoadseotw2nvu54haczvantq"
DIGEST = bytes(32)


def _key(who) -> bytes:
    """A stand-in X25519 public key (fixed bytes, so both chains price the calldata alike)."""
    return hashlib.sha256(who.address.encode()).digest()


def _publish(chain: Chain, m: MarketClient, client, name: str, splits: int, stages: int, epochs: int):
    salt = hashlib.sha256(name.encode()).digest()
    return m.publish_task(client, salt, name, ETH, splits=splits, stages=stages, epochs=epochs,
                          deadline=chain.timestamp() + 3600, pubkey=_key(client), bond_wei=BOND)


def job_gas(chain: Chain) -> dict[str, list[int]]:
    """One whole job of one pipeline with two stages (and a standby trainer), each call's gas."""
    gas: dict[str, list[int]] = defaultdict(list)
    client, ps, t0, t1, t2 = (Account.create() for _ in range(5))
    for a in (client, ps, t0, t1, t2):
        chain.fund(a.address, 100 * ETH)
    blueprint, s = chain.deploy(client, "Ledger", blueprint=True)
    gas["deploy Ledger blueprint"].append(s.gas_used)
    addr, s = chain.deploy(client, "Market", blueprint)
    gas["deploy Market"].append(s.gas_used)
    m = MarketClient(chain, addr)
    task, s = _publish(chain, m, client, "bench", 1, 2, 1)
    gas["publishTask"].append(s.gas_used)
    gas["register"].append(m.register(ps, task, 10**9, 4, _key(ps), BOND).gas_used)
    gas["hireServers (1 server)"].append(m.hire_servers(client, task, [ps.address]).gas_used)
    gas["postTrainerHiring"].append(m.post_trainer_hiring(ps, task, 2, 0).gas_used)
    for t in (t0, t1, t2):
        gas["offerTrainer"].append(m.offer_trainer(t, task, ps.address, 10**9, 2, _key(t), BOND).gas_used)
    gas["hireTrainers (2 trainers)"].append(m.hire_trainers(ps, task, [t0.address, t1.address], [0, 1]).gas_used)
    ledger, s = m.open_ledger(client, task)
    gas["openLedger (makes the ledger)"].append(s.gas_used)
    commits = [(client, Slot(0, Kind.SPEC)), (ps, Slot(0, Kind.PLAN)), (client, Slot(0, Kind.DATA_KEY, 0, 0)),
               (ps, Slot(0, Kind.TRAINER_KEYS, 0, 0)), (ps, Slot(0, Kind.ATTEMPT)), (ps, Slot(0, Kind.STAGE)),
               (t0, Slot(0, Kind.WEIGHTS, 0, 0)), (t0, Slot(0, Kind.GRAD, 0, 0)),
               (t1, Slot(0, Kind.WEIGHTS, 0, 1)), (t1, Slot(0, Kind.GRAD, 0, 1)),
               (ps, Slot(0, Kind.SCORE)), (ps, Slot(0, Kind.VERDICTS)), (ps, Slot(0, Kind.GLOBAL))]
    for who, slot in commits:
        gas["commit"].append(ledger.commit(who, slot, CID, DIGEST).gas_used)
    gas["credit (1 epoch)"].append(ledger.credit(client, ps.address, [0]).gas_used)
    gas["credit (1 epoch)"].append(ledger.credit(ps, t0.address, [0]).gas_used)
    ledger.credit(ps, t1.address, [0])
    gas["evict"].append(ledger.evict(ps, t1.address, 0, "gradient outlier").gas_used)
    gas["replaceTrainer"].append(m.replace_trainer(ps, task, t1.address, t2.address).gas_used)
    gas["finish"].append(ledger.finish(client).gas_used)
    gas["settle (refund)"].append(m.settle(client, task).gas_used)
    for who in (ps, t0, t1, t2):  # earnings and bond, bond alone (evicted), bond alone (standby, no work)
        gas["claim"].append(m.claim(client, task, who.address).gas_used)
    return gas


def tx_rate(chain: Chain, n: int) -> float:
    """Signed commits by one writer, each waited for: the aggregator's attempt, verdicts and global model
    of epoch after epoch of a fresh one-pipeline job."""
    client, ps, t = Account.create(), Account.create(), Account.create()
    for a in (client, ps, t):
        chain.fund(a.address, 100 * ETH)
    m = MarketClient.deploy(chain, client)
    task, _ = _publish(chain, m, client, "rate", 1, 1, n // 3 + 1)
    m.register(ps, task, 1, 1, _key(ps), BOND)
    m.hire_servers(client, task, [ps.address])
    m.post_trainer_hiring(ps, task, 1, 0)
    m.offer_trainer(t, task, ps.address, 1, 1, _key(t), BOND)
    m.hire_trainers(ps, task, [t.address], [0])
    led, _ = m.open_ledger(client, task)
    cycle = (Kind.ATTEMPT, Kind.VERDICTS, Kind.GLOBAL)
    t0 = time.perf_counter()
    for i in range(n):
        led.commit(ps, Slot(i // 3, cycle[i % 3]), CID, DIGEST)
    return n / (time.perf_counter() - t0)


def sign_rate(n: int = 2000) -> float:
    acct = Account.create()
    tx = {"to": acct.address, "value": 1, "gas": 21000, "maxFeePerGas": 10**9, "maxPriorityFeePerGas": 1,
          "nonce": 0, "chainId": 1}
    t0 = time.perf_counter()
    for i in range(n):
        tx["nonce"] = i
        acct.sign_transaction(tx)
    return n / (time.perf_counter() - t0)


def backend_sign_rates(n: int = 300) -> dict[str, float]:
    """Raw secp256k1 signing per second with eth-keys' pure-Python backend and with coincurve."""
    import os as _os

    from eth_keys import KeyAPI
    from eth_keys.backends import CoinCurveECCBackend, NativeECCBackend

    key_bytes, msg = _os.urandom(32), _os.urandom(32)
    rates = {}
    for name, backend in (("pure Python", NativeECCBackend), ("coincurve", CoinCurveECCBackend)):
        api = KeyAPI(backend=backend)
        pk = api.PrivateKey(key_bytes)
        t0 = time.perf_counter()
        for _ in range(n):
            api.ecdsa_sign(msg, pk)
        rates[name] = n / (time.perf_counter() - t0)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--txs", type=int, default=200)
    args = ap.parse_args()
    url = os.environ.get("TDML_ANVIL_URL")
    pidfile = None
    if not url:
        pidfile = Path(tempfile.mkdtemp()) / "anvil.pid"
        url = subprocess.run([str(ROOT / "infra/anvil.sh"), "start", str(pidfile)], check=True,
                             capture_output=True, text=True).stdout.strip()
    try:
        results = {}
        for name, chain in (("embedded", Chain("embedded")), ("anvil", Chain(url))):
            results[name] = (job_gas(chain), tx_rate(chain, args.txs))
        gas_e, rate_e = results["embedded"]
        gas_a, rate_a = results["anvil"]
        print(f"{'call':32} {'gas (embedded)':>16} {'gas (anvil)':>12}")
        for call in gas_e:
            print(f"{call:32} {_fmt(gas_e[call]):>16} {_fmt(gas_a[call]):>12}")
        print()
        print(f"signed ledger commits per second ({args.txs} sent, each waited for its receipt):")
        print(f"  embedded EVM (py-evm)  {rate_e:8.1f} tx/s")
        print(f"  anvil over JSON-RPC    {rate_a:8.1f} tx/s")
        print(f"  anvil / embedded       {rate_a / rate_e:8.2f}x")
        print(f"local signing alone (eth-account{' + coincurve' if _has_coincurve() else ''}): {sign_rate():.0f} tx/s")
        rates = backend_sign_rates()
        print(f"secp256k1 signatures/s: pure Python {rates['pure Python']:.0f}, coincurve {rates['coincurve']:.0f}"
              f" ({rates['coincurve'] / rates['pure Python']:.1f}x)")
    finally:
        if pidfile:
            subprocess.run([str(ROOT / "infra/anvil.sh"), "stop", str(pidfile)])


def _fmt(gas: list[int]) -> str:
    """One call's gas: its values when they are one or two, else their range."""
    values = sorted(set(gas))
    return "/".join(map(str, values)) if len(values) <= 2 else f"{values[0]}-{values[-1]}"


def _has_coincurve() -> bool:
    try:
        import coincurve  # noqa: F401
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    main()
