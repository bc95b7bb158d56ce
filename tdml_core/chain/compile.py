"""Compile TDML's Vyper contracts in-process, with the EVM version pinned."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

CONTRACTS_DIR = Path(__file__).resolve().parents[2] / "contracts"
EVM_VERSION = "cancun"


@dataclass(frozen=True)
class Artifact:
    name: str
    abi: list
    bytecode: str
    blueprint_bytecode: str


@functools.lru_cache(maxsize=None)
def compile_contract(name: str, directory: Path = CONTRACTS_DIR) -> Artifact:
    from vyper import compile_code
    from vyper.compiler.settings import Settings

    path = directory / f"{name}.vy"
    if not path.is_file():
        raise FileNotFoundError(f"contract source not found: {path}")
    out = compile_code(
        path.read_text(),
        contract_path=path.name,
        output_formats=["abi", "bytecode", "blueprint_bytecode"],
        settings=Settings(evm_version=EVM_VERSION),
    )
    return Artifact(name, out["abi"], out["bytecode"], out["blueprint_bytecode"])
