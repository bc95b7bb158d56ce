"""The chain: a web3 client with local signing, and typed calls on TDML's contracts."""

from tdml_core.chain.client import Chain, ChainError, Sent
from tdml_core.chain.market import SERVER, TRAINER, LedgerClient, MarketClient

__all__ = ["SERVER", "TRAINER", "Chain", "ChainError", "LedgerClient", "MarketClient", "Sent"]
