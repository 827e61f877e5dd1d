"""Fence table policy and its crash-safe persistence."""

from __future__ import annotations

import json

import pytest

from gfspy.blockd.fence_table import FenceTable, FenceTableError


@pytest.mark.timeout(10)
def test_policy_fence_admit_unfence():
    table = FenceTable(None)
    assert table.may_connect("n1", None) == (True, "")
    table.fence("n1", 0xA, epoch=3)
    assert not table.may_connect("n1", 0xA)[0]
    # While a ban exists only an explicitly admitted incarnation gets in.
    assert not table.may_connect("n1", 0xB)[0]
    assert not table.may_connect("n1", None)[0]
    assert table.may_connect("n2", 0xA)[0]
    with pytest.raises(FenceTableError, match="stale epoch"):
        table.admit("n1", 0xB, epoch=2)
    with pytest.raises(FenceTableError, match="stays fenced"):
        table.admit("n1", 0xA, epoch=3)
    table.admit("n1", 0xB, epoch=3)
    assert table.may_connect("n1", 0xB)[0] and not table.may_connect("n1", 0xA)[0]
    # Fencing all incarnations revokes the admission too.
    table.fence("n1", None, epoch=4)
    assert not table.may_connect("n1", 0xB)[0]
    with pytest.raises(FenceTableError):
        table.unfence("n1", epoch=3)
    table.unfence("n1", epoch=None)  # operator override keeps the epoch
    assert table.nodes["n1"].epoch == 4
    assert table.may_connect("n1", 0xA)[0] and table.may_connect("n1", None)[0]


@pytest.mark.timeout(10)
def test_persistence_roundtrip_and_atomic_files(tmp_path):
    table = FenceTable(str(tmp_path))
    table.fence("n1", 0xFFFF_FFFF_FFFF_FFFF, epoch=9)
    table.fence("n2", None, epoch=1)
    table.save(table.serialize())
    assert [p.name for p in tmp_path.iterdir()] == ["fence-table.json"]  # no temp left
    again = FenceTable(str(tmp_path))
    again.load()
    assert again.to_json() == table.to_json()
    assert not again.may_connect("n1", 0xFFFF_FFFF_FFFF_FFFF)[0]
    assert not again.may_connect("n2", 5)[0]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "content",
    ["{not json", json.dumps({"version": 99, "nodes": {}}), json.dumps({"version": 1})],
)
def test_unreadable_table_is_an_error_not_an_empty_table(tmp_path, content):
    (tmp_path / "fence-table.json").write_text(content)
    with pytest.raises(FenceTableError):
        FenceTable(str(tmp_path)).load()
