"""A web3.py client whose every transaction is signed locally by its sender.

Backends: ``embedded`` (web3's EthereumTesterProvider on py-evm, needing only
pip) and any JSON-RPC node by URL (``http://127.0.0.1:8545``). The node never
holds a participant's key: transactions are built here, signed with the
participant's own eth-account key, and sent raw. A relay may submit a
transaction someone else signed (``submit_signed``) but never signs for them.
Events are read from receipts (or narrow block ranges), never by scanning from
genesis.

The embedded chain lives only inside its process. Given a ``journal`` file it
appends every raw signed transaction it mines, and a later ``Chain("embedded",
journal=...)`` re-executes them in order on a fresh EVM, checking each hash and
outcome, to rebuild the same state: that is how a run is resumed or audited.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.contract import Contract
from web3.logs import DISCARD

from tdml_core.chain.compile import compile_contract

# anvil's first development account (its well-known test mnemonic): the faucet on a local node
ANVIL_DEV_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"


# Called with a contract function's name after each of its transactions is mined (a test hook).
AFTER_TRANSACT: list = []


class ChainError(RuntimeError):
    """A transaction reverted or the node refused it; the message carries the reason."""


class ChainConfigError(ChainError):
    """The chain asked for cannot be used: an unknown name, or no node answers at the URL (a user's mistake)."""


@dataclass
class Sent:
    receipt: dict
    gas_used: int

    @property
    def tx_hash(self) -> str:
        return self.receipt["transactionHash"].hex()


def _raw(value) -> bytes:
    """A topic or log data as bytes: from a node's hex string, or from web3's bytes."""
    return bytes.fromhex(value[2:]) if isinstance(value, str) else bytes(value)


def _checksummed(value, abi_type: str):
    """An address as web3 gives it (checksummed); anything else as the codec decoded it."""
    return Web3.to_checksum_address(value) if abi_type == "address" else value


def _reason(exc: Exception) -> str:
    msg = getattr(exc, "message", None) or (exc.args[0] if exc.args else str(exc))
    if isinstance(msg, dict):
        msg = msg.get("message", str(msg))
    return str(msg)


def _genesis_time(journal: str | Path | None) -> int | None:
    """The genesis timestamp a journal's first entry recorded (None: a new journal, or one written without it)."""
    if journal is None or not Path(journal).is_file():
        return None
    with Path(journal).open() as f:
        first = f.readline()
    try:
        return json.loads(first).get("genesis") if first.strip() else None
    except ValueError:
        return None  # the replay names the damaged line


def _replayable_backend(genesis_time: int | None = None):
    """eth-tester's py-evm chain with each block's ``prevrandao`` derived from its parent's hash.

    eth-tester draws it from ``os.urandom``, so a block hash would differ when a
    journal is re-executed; TDML seeds its challenges with a block hash, and the
    audit must reach the same one. The genesis block's time comes from the
    journal too (its first entry records it). (A trainer still cannot know the hash before
    it commits: it covers the block's transactions and state.)
    """
    import hashlib

    from eth_tester.backends.pyevm import main as pyevm
    from eth_tester.backends.pyevm.main import PyEVMBackend

    class ReplayableBackend(PyEVMBackend):
        def mine_blocks(self, num_blocks=1, coinbase=pyevm.ZERO_ADDRESS):  # eth-tester's, but for the mix hash
            hashes = []
            for _ in range(num_blocks):
                kwargs = {"coinbase": coinbase}
                vm = self.chain.get_vm()
                if isinstance(vm, pyevm.ParisVM):
                    kwargs["mix_hash"] = hashlib.sha256(b"tdml prevrandao" + bytes(self.chain.header.parent_hash)).digest()
                if isinstance(vm, pyevm.PragueVM):
                    kwargs["blob_gas_used"] = sum(pyevm.get_total_blob_gas(tx) for tx in self.chain.get_block().transactions)
                hashes.append(self.chain.mine_block(**kwargs).hash)
            return tuple(hashes)

    params = None if genesis_time is None else PyEVMBackend.generate_genesis_params({"timestamp": genesis_time})
    return ReplayableBackend(genesis_parameters=params)


class Chain:
    def __init__(self, url: str = "embedded", journal: str | Path | None = None):
        self.url = url
        self.journal: Path | None = None
        if url == "embedded":
            from eth_tester import EthereumTester
            from web3 import EthereumTesterProvider

            provider = EthereumTesterProvider(EthereumTester(backend=_replayable_backend(_genesis_time(journal))))
            self.w3 = Web3(provider)
            self.faucet = Account.from_key(provider.ethereum_tester.backend.account_keys[0])
        elif url.startswith(("http://", "https://")):
            self.w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": 60}))
            if not self.w3.is_connected():
                raise ChainConfigError(f"no JSON-RPC node answers at {url}")
            self.faucet = Account.from_key(ANVIL_DEV_KEY)
        else:
            raise ChainConfigError(f"unknown chain {url!r}: use 'embedded' or an http(s) JSON-RPC URL")
        self.chain_id = self.w3.eth.chain_id
        self.tx_count = 0
        self._nonces: dict[str, int] = {}
        self._lock = threading.RLock()  # participants of one process may send from several threads
        if journal is not None and url == "embedded":
            self.journal = Path(journal)
            if self.journal.exists():
                self._replay(self.journal)

    # -- the embedded chain's journal -------------------------------------------
    def _replay(self, path: Path) -> None:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                self._set_next_timestamp(entry.get("ts"))
                h = self.w3.eth.send_raw_transaction(bytes.fromhex(entry["raw"]))
            except Exception as exc:
                raise ChainError(f"{path}:{n}: transaction does not re-execute: {_reason(exc)}") from None
            receipt = self.w3.eth.wait_for_transaction_receipt(h, timeout=60, poll_latency=0.005)
            if h.hex().removeprefix("0x") != entry["hash"].removeprefix("0x") or receipt["status"] != entry["status"]:
                raise ChainError(f"{path}:{n}: transaction re-executes differently from its record")
            self.tx_count += 1

    def _set_next_timestamp(self, ts: int | None) -> None:
        """Mine the next block at the time it was first mined at, so that rules on time replay alike."""
        backend = self.w3.provider.ethereum_tester.backend
        parent = self.w3.eth.get_block("latest")["timestamp"]
        if ts is not None and ts > parent:
            backend.chain.header = backend.chain.header.copy(timestamp=ts)

    def _record(self, raw: bytes, receipt) -> None:
        if self.journal is None:
            return
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        ts = self.w3.eth.get_block(receipt["blockNumber"])["timestamp"]
        entry = {"hash": receipt["transactionHash"].hex(), "status": receipt["status"], "ts": ts, "raw": raw.hex()}
        if not self.journal.exists() or self.journal.stat().st_size == 0:  # the first entry: the genesis time too
            entry["genesis"] = self.w3.eth.get_block(0)["timestamp"]
        with self.journal.open("a") as f:  # one line per mined transaction, flushed at once
            f.write(json.dumps(entry) + "\n")

    # -- accounts -----------------------------------------------------------
    def balance(self, address: str) -> int:
        return self.w3.eth.get_balance(address)

    def fund(self, address: str, wei: int) -> Sent:
        return self.send(self.faucet, {"to": address, "value": wei})

    def nonce(self, address: str) -> int:
        """The nonce ``address``'s next transaction will carry."""
        with self._lock:
            return self._nonce(address)

    def timestamp(self) -> int:
        """The latest block's timestamp."""
        return self.w3.eth.get_block("latest")["timestamp"]

    def advance_time(self, seconds: int) -> None:
        """Move the chain's clock forward (development chains only: the embedded one and anvil)."""
        if self.url == "embedded":
            self.w3.provider.ethereum_tester.time_travel(self.timestamp() + seconds)
        else:
            self.w3.provider.make_request("evm_increaseTime", [seconds])
            self.w3.provider.make_request("evm_mine", [])

    def _nonce(self, address: str) -> int:
        if address not in self._nonces:
            self._nonces[address] = self.w3.eth.get_transaction_count(address, "pending")
        return self._nonces[address]

    # -- building, signing, sending -------------------------------------------
    def _fees(self, headroom: int = 2) -> dict:
        """EIP-1559 fees: a cap of ``headroom`` × the latest base fee + the tip (only base fee + tip is paid)."""
        base = self.w3.eth.get_block("latest").get("baseFeePerGas", 10**9)
        tip = 10**9
        return {"maxFeePerGas": headroom * base + tip, "maxPriorityFeePerGas": tip}

    def build(self, sender: LocalAccount, tx: dict) -> dict:
        tx = {"from": sender.address, "chainId": self.chain_id, "nonce": self._nonce(sender.address), **tx}
        if "maxFeePerGas" not in tx:  # a contract call built by web3 already carries its fees
            tx.update(self._fees())
        if "gas" not in tx:
            try:
                tx["gas"] = int(self.w3.eth.estimate_gas(tx) * 1.2) + 10_000
            except Exception as exc:
                raise ChainError(f"reverted: {_reason(exc)}") from None
        return tx

    def sign(self, sender: LocalAccount, tx: dict) -> bytes:
        """A raw signed transaction, made with ``sender``'s own key."""
        signed = sender.sign_transaction(self.build(sender, tx))
        self._nonces[sender.address] += 1
        return bytes(signed.raw_transaction)

    def submit_signed(self, raw: bytes) -> Sent:
        """Send a transaction signed by someone else (a relay never signs for them)."""
        try:
            h = self.w3.eth.send_raw_transaction(raw)
        except Exception as exc:
            self._nonces.clear()
            raise ChainError(f"refused: {_reason(exc)}") from None
        receipt = self.w3.eth.wait_for_transaction_receipt(h, timeout=60, poll_latency=0.005)
        self.tx_count += 1
        self._record(raw, receipt)
        if receipt["status"] != 1:
            raise ChainError(f"transaction {h.hex()} reverted")
        return Sent(dict(receipt), receipt["gasUsed"])

    def send(self, sender: LocalAccount, tx: dict) -> Sent:
        with self._lock:
            return self.submit_signed(self.sign(sender, tx))

    def transact(self, sender: LocalAccount, call, value: int = 0) -> Sent:
        """Sign and send a contract call as ``sender``."""
        with self._lock:
            return self._transact(sender, call, value)

    def _transact(self, sender: LocalAccount, call, value: int) -> Sent:
        try:  # build_transaction estimates gas, which is where a revert shows first
            tx = call.build_transaction({"from": sender.address, "value": value, "chainId": self.chain_id,
                                         "nonce": self._nonce(sender.address), **self._fees()})
        except Exception as exc:
            raise ChainError(f"reverted: {_reason(exc)}") from None
        tx.pop("from", None)
        sent = self.send(sender, tx)
        for hook in AFTER_TRANSACT:
            hook(call.fn_name)
        return sent

    def send_many(self, calls, batch: int = 500) -> list[Sent]:
        """Many participants' contract calls at once: ``calls`` of (sender, call) or (sender, call, value).

        Each is still signed with its own sender's key (``sign_many``), and the raw
        transactions go to the node together (``send_signed_many``); a reverted one
        raises ChainError. On the embedded chain the calls are sent one by one (it
        mines as it receives).
        """
        calls = [c if len(c) == 3 else (c[0], c[1], 0) for c in calls]
        if self.url == "embedded":
            return [self.transact(sender, call, value) for sender, call, value in calls]
        with self._lock:
            return self.send_signed_many(self.sign_many(calls, batch), batch)

    def sign_many(self, calls, batch: int = 500) -> list[bytes]:
        """Raw transactions of ``calls`` ((sender, call, value)), each signed with its own sender's key.

        What each sender would do on its own host, done for many at once: their
        nonces are read in JSON-RPC batches of ``batch``, and the gas of the first
        call of each function is estimated and reused (×1.3) for the others.
        """
        with self._lock:
            # A batch fills blocks, and each full block raises the base fee by 1/8: the cap leaves room for that.
            fees, gas, raws = self._fees(headroom=64), {}, []
            unknown = list(dict.fromkeys(sender.address for sender, _, _ in calls if sender.address not in self._nonces))
            for i in range(0, len(unknown), batch):
                answers = self.w3.provider.make_batch_request(
                    [("eth_getTransactionCount", [who, "pending"]) for who in unknown[i:i + batch]])
                for who, a in zip(unknown[i:i + batch], answers):
                    if "error" in a:
                        raise ChainError(f"nonce of {who}: {_reason(a['error'])}")
                    self._nonces[who] = int(a["result"], 16)
            for sender, call, value in calls:
                if call.fn_name not in gas:
                    try:
                        est = call.estimate_gas({"from": sender.address, "value": value})
                    except Exception as exc:
                        raise ChainError(f"reverted: {_reason(exc)}") from None
                    gas[call.fn_name] = int(est * 1.3) + 10_000
                tx = {"to": call.address, "data": call._encode_transaction_data(), "value": value,
                      "gas": gas[call.fn_name], "chainId": self.chain_id, **fees}
                raws.append(self.sign(sender, tx))
            return raws

    def send_signed_many(self, raws: list[bytes], batch: int = 500) -> list[Sent]:
        """Send raw signed transactions in JSON-RPC batches of ``batch``, then wait for every receipt."""
        with self._lock:
            hashes, first = [], self.w3.eth.block_number
            try:
                for i in range(0, len(raws), batch):  # web3's batches refuse sends: the provider's own batch call
                    answers = self.w3.provider.make_batch_request(
                        [("eth_sendRawTransaction", ["0x" + raw.hex()]) for raw in raws[i:i + batch]])
                    for a in answers:
                        if "error" in a:
                            raise ChainError(f"refused: {_reason(a['error'])}")
                        hashes.append(a["result"])
            except Exception as exc:
                self._nonces.clear()
                if isinstance(exc, ChainError):
                    raise
                raise ChainError(f"refused: {_reason(exc)}") from None
            receipts = self._receipts(hashes, batch, first)
            self.tx_count += len(receipts)
            bad = [r["transactionHash"].hex() for r in receipts if r["status"] != 1]
            if bad:
                raise ChainError(f"{len(bad)} of {len(receipts)} transactions reverted (first {bad[0]})")
            return [Sent(dict(r), r["gasUsed"]) for r in receipts]

    def _receipts(self, hashes: list[str], batch: int, from_block: int, timeout: float = 300) -> list[dict]:
        """Every transaction's receipt (raw JSON-RPC answers, status, gasUsed and blockNumber as ints).

        Read a block at a time (``eth_getBlockReceipts``) from ``from_block``, the
        last block before the first send: a node's lookup by hash can cost more the
        bigger the block (anvil took 57 s for the 10,000 receipts of one block, one
        by one). A node without that method is asked for each receipt, in batches.
        """
        import time

        from hexbytes import HexBytes

        def parsed(r: dict) -> dict:
            return {**r, "transactionHash": HexBytes(r["transactionHash"]), "status": int(r["status"], 16),
                    "gasUsed": int(r["gasUsed"], 16), "blockNumber": int(r["blockNumber"], 16)}

        got: dict[int, dict] = {}
        deadline = time.monotonic() + timeout
        want = {h.lower(): i for i, h in enumerate(hashes)}
        by_block, block = True, from_block
        while want:
            if by_block:
                latest = self.w3.eth.block_number
                while block <= latest and want:
                    answer = self.w3.provider.make_request("eth_getBlockReceipts", [hex(block)])
                    if "error" in answer:  # not offered by this node: one receipt at a time
                        by_block = False
                        break
                    for r in answer.get("result") or []:
                        i = want.pop(r["transactionHash"].lower(), None)
                        if i is not None:
                            got[i] = parsed(r)
                    block += 1
            if not by_block:
                todo = list(want.items())[:batch]
                answers = self.w3.provider.make_batch_request([("eth_getTransactionReceipt", [h]) for h, _ in todo])
                for (h, i), a in zip(todo, answers):
                    if a.get("result"):
                        got[i] = parsed(a["result"])
                        del want[h]
            if want:
                if time.monotonic() > deadline:
                    raise ChainError(f"{len(want)} transactions not mined in {timeout:g} s")
                time.sleep(0.02)
        return [got[i] for i in range(len(hashes))]

    # -- contracts -----------------------------------------------------------
    def contract(self, name, address: str) -> Contract:
        art = compile_contract(name) if isinstance(name, str) else name
        return self.w3.eth.contract(address=address, abi=art.abi)

    def deploy(self, sender: LocalAccount, name, *args, blueprint: bool = False) -> tuple[str, Sent]:
        """Deploy a contract (by name from contracts/, or a compiled Artifact) as ``sender``."""
        art = compile_contract(name) if isinstance(name, str) else name
        if blueprint:
            sent = self.send(sender, {"data": art.blueprint_bytecode})
        else:
            factory = self.w3.eth.contract(abi=art.abi, bytecode=art.bytecode)
            data = factory.constructor(*args).data_in_transaction
            sent = self.send(sender, {"data": data})
        return sent.receipt["contractAddress"], sent

    def events(self, contract: Contract, sent: Sent, event: str) -> list[dict]:
        """Decoded ``event`` logs of one transaction, from its receipt."""
        ev = getattr(contract.events, event)()
        return [dict(e["args"]) for e in ev.process_receipt(sent.receipt, errors=DISCARD)]

    def logs(self, contract: Contract, event: str, from_block: int, to_block: int | str = "latest",
             where: dict | None = None) -> list[dict]:
        """Decoded ``event`` logs of ``contract`` in a block range; ``where`` filters on indexed arguments.

        The node filters by the event's signature and ``where``'s topics; the answers
        are decoded straight with the ABI codec (web3's per-log decoding took 0.3 ms a
        log, most of an audit's signer check at 10,000 trainers).
        """
        abi = next(a for a in contract.abi if a.get("type") == "event" and a["name"] == event)
        inputs = abi["inputs"]
        sig = Web3.keccak(text=f"{event}({','.join(i['type'] for i in inputs)})").to_0x_hex()
        indexed = [i for i in inputs if i.get("indexed")]
        where = where or {}
        topics = [sig] + ["0x" + self.w3.codec.encode([i["type"]], [where[i["name"]]]).hex() if i["name"] in where
                          else None for i in indexed]  # a topic per indexed argument, up to the last one filtered on
        while topics[-1] is None:
            topics.pop()
        if self.url == "embedded":  # its provider takes and gives web3's formatted values
            raw = self.w3.eth.get_logs({"address": contract.address, "topics": topics, "fromBlock": from_block,
                                        "toBlock": to_block})
        else:  # a node's raw answer: no per-log formatting
            answer = self.w3.provider.make_request("eth_getLogs", [{
                "address": contract.address, "topics": topics, "fromBlock": hex(from_block),
                "toBlock": to_block if isinstance(to_block, str) else hex(to_block)}])
            if "error" in answer:
                raise ChainError(f"eth_getLogs {event}: {_reason(answer['error'])}")
            raw = answer["result"]
        plain = [i for i in inputs if not i.get("indexed")]
        plain_types = [i["type"] for i in plain]
        out = []
        for log in raw:
            values = {}
            for i, topic in zip(indexed, log["topics"][1:]):
                values[i["name"]] = self.w3.codec.decode([i["type"]], _raw(topic))[0]
            for i, v in zip(plain, self.w3.codec.decode(plain_types, _raw(log["data"]))):
                values[i["name"]] = v
            out.append({i["name"]: _checksummed(values[i["name"]], i["type"]) for i in inputs})
        return out
