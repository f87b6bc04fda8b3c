"""The compiled RESP packer: byte for byte what hiredis.pack_command makes."""

from __future__ import annotations

from typing import Any

import hiredis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from caf_sharing.backends.redis._resp import pack_command

arguments = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=100),
    st.integers(),  # past 64 bits too: hiredis formats those
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)


@given(st.lists(arguments, max_size=40))
def test_same_bytes_as_hiredis(args: list[Any]) -> None:
    assert pack_command(tuple(args)) == hiredis.pack_command(tuple(args))
    assert pack_command(args) == hiredis.pack_command(tuple(args))  # a list is packed alike


@pytest.mark.parametrize("args", [
    (), ("",), (b"",), (0,), (-1,), (9,), (10,), (-(2**63),), (2**63 - 1,), (2**63,),
    (-(2**64),), ("é€😀",), ("EVALSHA", "a" * 40, 4, b"\r\n", -1, "SPUBLISH"),
])
def test_edges(args: tuple[Any, ...]) -> None:
    assert pack_command(args) == hiredis.pack_command(args)


@pytest.mark.parametrize("args", [(1.5,), ("x", 0.1), (memoryview(b"ab"),)])
def test_other_kinds_go_to_hiredis(args: tuple[Any, ...]) -> None:
    assert pack_command(args) == hiredis.pack_command(args)


@pytest.mark.parametrize("args", [(True,), (None,), ("x", object()), ([b"nested"],)])
def test_refused_as_hiredis_refuses(args: tuple[Any, ...]) -> None:
    with pytest.raises(TypeError) as ours:
        pack_command(args)
    with pytest.raises(TypeError) as theirs:
        hiredis.pack_command(args)
    assert str(ours.value) == str(theirs.value)
