"""The compiler's output is kept on disk: the same bytecode comes back, and a changed source is compiled again."""

import json

from tdml_core.chain import compile as comp


def test_a_kept_artifact_is_what_the_compiler_gives_and_a_changed_source_is_compiled_again(tmp_path, monkeypatch):
    monkeypatch.setenv("TDML_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "contracts"
    src.mkdir()
    (src / "Box.vy").write_text("# pragma version ~=0.4.0\nx: public(uint256)\n\n@external\ndef put(v: uint256):\n    self.x = v\n")

    first = comp.compile_contract.__wrapped__("Box", src)
    (kept,) = comp.cache_dir().glob("*.json")
    again = comp.compile_contract.__wrapped__("Box", src)
    assert again == first and first.bytecode.startswith("0x") and [f["name"] for f in first.abi] == ["put", "x"]

    doc = json.loads(kept.read_text())  # a damaged entry is compiled again, not trusted
    kept.write_text(json.dumps({**doc, "bytecode": "0x00"})[:-5])
    assert comp.compile_contract.__wrapped__("Box", src) == first

    (src / "Box.vy").write_text((src / "Box.vy").read_text().replace("put", "store"))
    changed = comp.compile_contract.__wrapped__("Box", src)
    assert [f["name"] for f in changed.abi] == ["store", "x"] and len(list(comp.cache_dir().glob("*.json"))) == 2
