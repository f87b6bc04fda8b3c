"""Type stub of ``caf_sharing.backends.redis._resp`` (see _resp.pyx)."""

from collections.abc import Sequence

def pack_command(command: Sequence[bytes | str | int | float | memoryview]) -> bytes:
    """``command`` as one RESP array of bulk strings, byte for byte as
    ``hiredis.pack_command`` makes it (to which other kinds of argument go)."""
