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
    task_id, _ = market.publish_task(client, "job", 10**17, 1, 1, 2)

    again = Chain("embedded", journal=journal)

    assert again.tx_count == chain.tx_count == len(journal.read_text().splitlines())
    assert MarketClient(again, market.address).task(task_id)["budget"] == 10**17
    assert again.balance(client.address) == chain.balance(client.address)


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
