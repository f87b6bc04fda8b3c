"""ReliableChannel: a reliable one-way message channel over two SharedMaps.

Actor ``A`` sends to actor ``B`` through a pair of maps, with the schema of
Caf.js (so either side may be a Caf.js actor):

* A's map (writable by A, read by B) holds the messages not yet known to be
  received, per channel::

      "__ca_channels__": {"<channel>": {"contents": [msg, ...], "index": <int>}}

  ``index`` is the index of ``contents[0]``; the first message ever sent on a
  channel has index :data:`FIRST_INDEX` (0).
* B's map (writable by B, read by A) holds, per channel, the index of the last
  message B processed::

      "__ca_acks__": {"<channel>": <int>}

:func:`send` appends to A's map; :func:`receive` returns what B has not seen
yet and acks it in B's map; :func:`gc` lets A drop what B acked. Messages
survive crashes and are delivered once and in order as long as each side
commits its map (the sharing runtime does that at the end of each message).

Every function takes MapRefs and never mutates a stored value (those are
frozen): it builds new plain containers and ``set``\\s them, so the changes
become part of the caller's transaction. A function writes only when
something changes (Caf.js also creates both keys empty on every call; its
readers accept them missing, and :func:`init` still creates them on request).

Stored data comes from another actor's map, so it is checked: a malformed
channel or ack raises :class:`~caf_sharing.errors.ChannelError` naming the
channel, and so does an inconsistent pair (acks past the last message sent,
or messages dropped before being acked), before anything is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, TypeGuard

from ._fastmap import FrozenList, MapRef
from .errors import ChannelError, InvalidTypeError, InvalidValueError

__all__ = [
    "ACKS_KEY",
    "CHANNELS_KEY",
    "FIRST_INDEX",
    "UNKNOWN_ACK_INDEX",
    "Received",
    "all_channel_names",
    "delete_channel",
    "first_ack_index",
    "first_index",
    "gc",
    "init",
    "receive",
    "send",
]

CHANNELS_KEY = "__ca_channels__"
ACKS_KEY = "__ca_acks__"
#: Index of the first message sent on a channel.
FIRST_INDEX = 0
#: Ack index of a channel nothing was received from; also the ``index`` of an
#: empty :class:`Received`.
UNKNOWN_ACK_INDEX = -1


class Received(NamedTuple):
    """What :func:`receive` returns: the index of ``messages[0]`` (or
    :data:`UNKNOWN_ACK_INDEX` when ``messages`` is empty) and the messages."""

    # The Caf.js name, although it hides tuple.index.
    index: int  # type: ignore[assignment]
    messages: list[Any]


class _Channel(NamedTuple):
    first: int
    contents: list[Any]


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_channel_name(channel: object) -> str:
    if not isinstance(channel, str):
        raise InvalidTypeError(f"channel name must be a str, got {type(channel).__name__}")
    return channel


def _table(ref: MapRef, key: str) -> Mapping[str, Any]:
    """The ``key`` dict of ``ref`` ({} when absent)."""
    table = ref.get(key)
    if table is None:
        return {}
    if not isinstance(table, Mapping):
        raise ChannelError(f"{key!r} must hold a dict, found {type(table).__name__}")
    return table


def _channel(channels: Mapping[str, Any], channel: str) -> _Channel | None:
    entry = channels.get(channel)
    if entry is None:
        return None
    if not isinstance(entry, Mapping):
        raise ChannelError(
            f"channel {channel!r} in {CHANNELS_KEY!r} must be a dict, "
            f"found {type(entry).__name__}")
    index = entry.get("index")
    contents = entry.get("contents")
    if not _is_int(index) or index < FIRST_INDEX:
        raise ChannelError(
            f"channel {channel!r} in {CHANNELS_KEY!r}: 'index' must be an int >= "
            f"{FIRST_INDEX}, found {index!r}")
    if not isinstance(contents, list):
        raise ChannelError(
            f"channel {channel!r} in {CHANNELS_KEY!r}: 'contents' must be a list, "
            f"found {type(contents).__name__}")
    return _Channel(index, contents)


def _ack(acks: Mapping[str, Any], channel: str) -> int:
    ack = acks.get(channel, UNKNOWN_ACK_INDEX)
    if not _is_int(ack) or ack < UNKNOWN_ACK_INDEX:
        raise ChannelError(
            f"ack of channel {channel!r} in {ACKS_KEY!r} must be an int >= "
            f"{UNKNOWN_ACK_INDEX}, found {ack!r}")
    return ack


def _seen(channel: str, chan: _Channel, ack: int) -> int:
    """How many of ``chan.contents`` the ack covers, checking the two agree."""
    last = chan.first + len(chan.contents) - 1
    if ack > last:
        raise ChannelError(
            f"channel {channel!r}: ack {ack} is past the last message sent ({last}); "
            "was the channel deleted and created again on one side only?")
    return ack - chan.first + 1


def init(writer_ref: MapRef) -> None:
    """Create empty ``__ca_channels__`` and ``__ca_acks__`` in ``writer_ref``
    where they are missing (as Caf.js does; the other functions do not need it)."""
    for key in (CHANNELS_KEY, ACKS_KEY):
        if key not in writer_ref:
            writer_ref.set(key, {})


def send(writer_ref: MapRef, channel: str, messages: list[Any] | tuple[Any, ...]) -> int | None:
    """Append ``messages`` (JSON data) to ``channel``; return the index of the
    first one, or ``None`` (and write nothing) when ``messages`` is empty."""
    _check_channel_name(channel)
    if not isinstance(messages, list | tuple):
        raise InvalidTypeError(
            f"messages for channel {channel!r} must be a list or tuple, "
            f"got {type(messages).__name__}")
    if not messages:
        return None
    try:
        # Frozen once here, the messages are stored as they are (no copy).
        frozen = FrozenList(messages)
    except (InvalidTypeError, InvalidValueError) as exc:
        raise type(exc)(f"messages for channel {channel!r}: {exc}") from exc
    channels = _table(writer_ref, CHANNELS_KEY)
    chan = _channel(channels, channel)
    if chan is None:
        chan = _Channel(FIRST_INDEX, [])
    start = chan.first + len(chan.contents)
    entry = dict(channels.get(channel) or {})
    entry["index"] = chan.first
    entry["contents"] = [*chan.contents, *frozen]
    new_channels = dict(channels)
    new_channels[channel] = entry
    writer_ref.set(CHANNELS_KEY, new_channels)
    return start


def receive(writer_ref: MapRef, reader_ref: MapRef, channel: str) -> Received:
    """The messages of ``channel`` in ``reader_ref`` (the sender's map) not
    acked yet in ``writer_ref`` (the receiver's own map), acking them there.

    Calling it again before the sender's map changes returns nothing: already
    acked messages are never returned twice.
    """
    _check_channel_name(channel)
    chan = _channel(_table(reader_ref, CHANNELS_KEY), channel)
    acks = _table(writer_ref, ACKS_KEY)
    ack = _ack(acks, channel)
    if chan is None:
        return Received(UNKNOWN_ACK_INDEX, [])
    seen = _seen(channel, chan, ack)
    if seen < 0:
        raise ChannelError(
            f"channel {channel!r}: messages {ack + 1}..{chan.first - 1} were dropped "
            f"before being acked (ack {ack}, first message kept {chan.first})")
    if seen == len(chan.contents):
        return Received(UNKNOWN_ACK_INDEX, [])
    new_acks = dict(acks)
    new_acks[channel] = chan.first + len(chan.contents) - 1
    writer_ref.set(ACKS_KEY, new_acks)
    return Received(ack + 1, list(chan.contents[seen:]))


def gc(writer_ref: MapRef, reader_ref: MapRef) -> int:
    """Drop from ``writer_ref`` (the sender's map) every message acked in
    ``reader_ref`` (the receiver's map); return how many were dropped.

    The whole map is checked before anything changes: an ack past the last
    message sent raises :class:`ChannelError` and drops nothing.
    """
    channels = _table(writer_ref, CHANNELS_KEY)
    acks = _table(reader_ref, ACKS_KEY)
    dropped = 0
    new_channels: dict[str, Any] | None = None
    for channel in acks:
        chan = _channel(channels, channel)
        if chan is None:  # acks of channels from other senders
            continue
        seen = _seen(channel, chan, _ack(acks, channel))
        # seen < 0 only means this copy of the acks is older than the last gc.
        if seen <= 0:
            continue
        if new_channels is None:
            new_channels = dict(channels)
        entry = dict(channels[channel])
        entry["index"] = chan.first + seen
        entry["contents"] = chan.contents[seen:]
        new_channels[channel] = entry
        dropped += seen
    if new_channels is not None:
        writer_ref.set(CHANNELS_KEY, new_channels)
    return dropped


def first_index(writer_ref: MapRef, channel: str) -> int:
    """Index of the first message still held for ``channel`` in the sender's
    map (:data:`FIRST_INDEX` for an unknown channel)."""
    chan = _channel(_table(writer_ref, CHANNELS_KEY), _check_channel_name(channel))
    return FIRST_INDEX if chan is None else chan.first


def first_ack_index(acks_ref: MapRef, channel: str) -> int:
    """Index of the last message of ``channel`` acked in the receiver's map
    (:data:`UNKNOWN_ACK_INDEX` if none)."""
    return _ack(_table(acks_ref, ACKS_KEY), _check_channel_name(channel))


def all_channel_names(writer_ref: MapRef) -> list[str]:
    """The channels of the sender's map, in stored order ([] if none)."""
    return list(_table(writer_ref, CHANNELS_KEY))


def delete_channel(ref: MapRef, channel: str) -> None:
    """Forget ``channel`` in ``ref``: its messages and its ack, whichever the
    map holds. Each side calls it on its own map; a sender that deletes a
    channel and sends on it again restarts at :data:`FIRST_INDEX`, so the
    receiver must delete its ack too."""
    _check_channel_name(channel)
    tables = {key: _table(ref, key) for key in (CHANNELS_KEY, ACKS_KEY)}
    for key, table in tables.items():
        if channel in table:
            ref.set(key, {name: value for name, value in table.items() if name != channel})
