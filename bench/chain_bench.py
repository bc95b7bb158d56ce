"""Gas per contract call and signed transactions per second, embedded EVM beside anvil.

    python bench/chain_bench.py [--txs 200]

Starts anvil with infra/anvil.sh (unless TDML_ANVIL_URL is set), runs one whole
job's contract calls on each backend, then sends --txs signed ledger commits
and times them.
"""

from __future__ import annotations

import argparse
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

ETH = 10**18


def job_gas(chain: Chain) -> dict[str, list[int]]:
    gas: dict[str, list[int]] = defaultdict(list)
    client, ps, t0, t1 = (Account.create() for _ in range(4))
    for a in (client, ps, t0, t1):
        chain.fund(a.address, 100 * ETH)
    blueprint, s = chain.deploy(client, "Ledger", blueprint=True)
    gas["deploy Ledger blueprint"].append(s.gas_used)
    addr, s = chain.deploy(client, "Market", blueprint)
    gas["deploy Market"].append(s.gas_used)
    m = MarketClient(chain, addr)
    task, s = m.publish_task(client, "bench", ETH, 1, 1, 1)
    gas["publishTask"].append(s.gas_used)
    gas["register"].append(m.register(ps, 10**9, 4).gas_used)
    gas["hireServers"].append(m.hire_servers(client, task, [ps.address]).gas_used)
    gas["postTrainerHiring"].append(m.post_trainer_hiring(ps, task, 2, 0).gas_used)
    for t in (t0, t1):
        gas["offerTrainer"].append(m.offer_trainer(t, task, ps.address, 10**9, 2).gas_used)
    gas["hireTrainers"].append(m.hire_trainers(ps, task, [t0.address, t1.address]).gas_used)
    ledger, s = m.open_ledger(client, task, 10)
    gas["openLedger"].append(s.gas_used)
    cid = "bafybeiacar55miutwskxzrxgkwc5lpg7exkoadseotw2nvu54haczvantq"
    gas["commit"].append(ledger.commit(t0, 0, "grad", "0/0", cid, bytes(32)).gas_used)
    gas["commit"].append(ledger.commit(ps, 0, "global", "-", cid, bytes(32)).gas_used)
    gas["credit"].append(ledger.credit(client, ps.address, 2).gas_used)
    gas["credit"].append(ledger.credit(ps, t0.address, 2).gas_used)
    ledger.credit(ps, t1.address, 1)
    gas["evict"].append(ledger.evict(ps, t1.address, 0, "gradient outlier").gas_used)
    gas["finish"].append(ledger.finish(client).gas_used)
    gas["settle (2 paid, 1 refund)"].append(m.settle(client, task).gas_used)
    return gas, ledger, t0


def tx_rate(chain: Chain, ledger, writer, n: int) -> float:
    cid = "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq"
    # a fresh ledger-writer run: commits need an unfinished ledger, so use a new job
    client, ps = Account.create(), Account.create()
    for a in (client, ps):
        chain.fund(a.address, 100 * ETH)
    m = MarketClient.deploy(chain, client)
    task, _ = m.publish_task(client, "rate", ETH, 1, 1, 1)
    m.register(ps, 1, 1)
    m.hire_servers(client, task, [ps.address])
    led, _ = m.open_ledger(client, task, 1)
    t0 = time.perf_counter()
    for i in range(n):
        led.commit(ps, i, "grad", "0/0", cid, bytes(32))
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
            gas, ledger, writer = job_gas(chain)
            results[name] = (gas, tx_rate(chain, ledger, writer, args.txs))
        gas_e, rate_e = results["embedded"]
        gas_a, rate_a = results["anvil"]
        print(f"{'call':32} {'gas (embedded)':>16} {'gas (anvil)':>12}")
        for call in gas_e:
            fmt = lambda v: "/".join(str(g) for g in sorted(set(v)))  # noqa: E731
            print(f"{call:32} {fmt(gas_e[call]):>16} {fmt(gas_a[call]):>12}")
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


def _has_coincurve() -> bool:
    try:
        import coincurve  # noqa: F401
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    main()
