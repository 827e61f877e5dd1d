"""mount.gfspy's -o parsing: what mount(8) and fstab hand a helper, and typos refused."""

from __future__ import annotations

import pytest

from gfspy.fuse.options import OptionError, parse_options


@pytest.mark.timeout(10)
def test_mount8_style_lists_are_accepted() -> None:
    opts = parse_options(
        ["rw,defaults,noatime,nosuid,_netdev,x-systemd.automount", "commit=5,lockproto=lock_nolock"]
    )
    assert not opts.readonly and opts.commit_interval == 5.0
    assert opts.lockproto == "lock_nolock"
    assert opts.vfs_flags == ["noatime", "nosuid"]


@pytest.mark.timeout(10)
def test_later_options_win_and_hostdata_sets_the_journal() -> None:
    opts = parse_options(["ro,debug,allow_other", "rw,hostdata=jid=3,errors=withdraw"])
    assert not opts.readonly and opts.debug and opts.allow_other and opts.jid == 3


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "bad",
    ["bogus", "commit=0", "commit=-1", "commit=x", "errors=panic", "lockproto=lock_gulm",
     "hostdata=locktable=a:b", "noatime=1"],
)  # fmt: skip
def test_bad_options_are_refused_with_a_reason(bad: str) -> None:
    with pytest.raises(OptionError) as info:
        parse_options([bad])
    assert bad.split("=")[0] in str(info.value)
