import json

import pytest
from eth_account import Account

from tdml_core.chain import Chain
from tdml_core.chain.client import ChainError
from tdml_core.chain.market import MarketClient


def test_an_embedded_chain_reopens_from_its_journal(tmp_path):
    journal = tmp_path / "chain.jsonl"
    chain = Chain("embedded", journal=journal)
    client = Account.create()
    chain.fund(client.address, 10**18)
    market = MarketClient.deploy(chain, client)
    task_id, _ = market.publish_task(client, bytes(32), "job", 10**17, splits=2, stages=1, epochs=1,
                                     deadline=chain.timestamp() + 3600, pubkey=bytes(32))

    again = Chain("embedded", journal=journal)

    assert again.tx_count == chain.tx_count == len(journal.read_text().splitlines())
    assert MarketClient(again, market.address).task(task_id)["budget"] == 10**17
    assert again.balance(client.address) == chain.balance(client.address)


def test_rules_on_time_replay_as_they_ran(tmp_path):
    """A task settled by a stranger after its deadline re-executes the same way, whenever the journal is replayed."""
    journal = tmp_path / "chain.jsonl"
    chain = Chain("embedded", journal=journal)
    client, stranger = Account.create(), Account.create()
    for a in (client, stranger):
        chain.fund(a.address, 10**18)
    market = MarketClient.deploy(chain, client)
    task_id, _ = market.publish_task(client, bytes(32), "job", 10**17, splits=2, stages=1, epochs=1,
                                     deadline=chain.timestamp() + 3600, pubkey=bytes(32))
    with pytest.raises(ChainError, match="only the client before the deadline"):
        market.settle(stranger, task_id)
    chain.advance_time(7200)  # not a transaction: the journal does not hold it
    market.settle(stranger, task_id)  # expired: anyone may settle, the budget goes back
    times = [chain.w3.eth.get_block(n)["timestamp"] for n in range(chain.w3.eth.block_number + 1)]

    again = Chain("embedded", journal=journal)

    assert MarketClient(again, market.address).task(task_id)["settled"]
    assert again.balance(client.address) == chain.balance(client.address)
    replayed = {again.w3.eth.get_block(n)["timestamp"] for n in range(again.w3.eth.block_number + 1)}
    recorded = {json.loads(line)["ts"] for line in journal.read_text().splitlines()}
    assert recorded <= replayed and recorded <= set(times)


def test_an_altered_journal_does_not_reopen(tmp_path):
    journal = tmp_path / "chain.jsonl"
    chain = Chain("embedded", journal=journal)
    chain.fund(Account.create().address, 10**18)
    chain.fund(Account.create().address, 10**18)
    lines = journal.read_text().splitlines()
    entry = json.loads(lines[1])
    raw = bytearray.fromhex(entry["raw"])
    raw[-40] ^= 1  # inside the signature
    entry["raw"] = raw.hex()
    journal.write_text("\n".join([lines[0], json.dumps(entry)]) + "\n")

    with pytest.raises(ChainError, match="chain.jsonl:2"):
        Chain("embedded", journal=journal)
