"""ReliableChannel helpers over real SharedMaps (and replicas fed change sets)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
import pytest

from caf_sharing import SharedMap, channel
from caf_sharing.channel import (
    ACKS_KEY,
    CHANNELS_KEY,
    FIRST_INDEX,
    UNKNOWN_ACK_INDEX,
    Received,
)
from caf_sharing.errors import ChannelError, InvalidTypeError, ReadOnlyError

T = TypeVar("T")


def tx(shared: SharedMap, action: Callable[[Any], T]) -> tuple[T, dict[str, Any] | None]:
    """Run ``action(ref)`` as one transaction on ``shared``; return its result
    and the change set committed (None when it wrote nothing)."""
    ref = shared.ref()
    result = action(ref)
    if not ref.has_changed:
        return result, None
    changes = ref.prepare()
    shared.commit(ref)
    return result, dict(changes)


def holding(**values: Any) -> SharedMap:
    shared = SharedMap()
    if values:
        tx(shared, lambda ref: [ref.set(k, v) for k, v in values.items()])
    return shared


def assert_refused(ref: Any, error: type[Exception] | tuple[type[Exception], ...], match: str,
                   action: Callable[[], object]) -> None:
    before = ref.to_dict()
    with pytest.raises(error, match=match):
        action()
    assert not ref.has_changed
    assert ref.to_dict() == before


# -- send -------------------------------------------------------------------------


def test_send_uses_the_caf_js_schema() -> None:
    a = SharedMap()
    first, _ = tx(a, lambda ref: channel.send(ref, "foo", [1, 2, 3]))
    assert first == FIRST_INDEX == 0
    second, _ = tx(a, lambda ref: channel.send(ref, "foo", ("four", {"five": [5]})))
    assert second == 3
    assert a.ref().to_dict() == {
        CHANNELS_KEY: {"foo": {"contents": [1, 2, 3, "four", {"five": [5]}], "index": 0}},
    }
    assert orjson.loads(orjson.dumps(a.ref().get(CHANNELS_KEY))) == {
        "foo": {"contents": [1, 2, 3, "four", {"five": [5]}], "index": 0}}


def test_send_nothing_writes_nothing() -> None:
    a = SharedMap()
    result, changes = tx(a, lambda ref: channel.send(ref, "foo", []))
    assert result is None
    assert changes is None
    assert a.version == 0


def test_channels_are_independent() -> None:
    a = SharedMap()
    tx(a, lambda ref: channel.send(ref, "x", [1]))
    assert tx(a, lambda ref: channel.send(ref, "y", [1, 2]))[0] == 0
    assert tx(a, lambda ref: channel.send(ref, "x", [2]))[0] == 1
    ref = a.ref()
    assert channel.all_channel_names(ref) == ["x", "y"]
    assert ref.get(CHANNELS_KEY)["y"] == {"contents": [1, 2], "index": 0}


def test_init_creates_both_keys_once() -> None:
    a = SharedMap()
    _, changes = tx(a, channel.init)
    assert changes is not None
    assert a.ref().to_dict() == {CHANNELS_KEY: {}, ACKS_KEY: {}}
    _, changes = tx(a, channel.init)
    assert changes is None  # already there: nothing to write
    tx(a, lambda ref: channel.send(ref, "foo", [1]))
    tx(a, channel.init)
    assert a.ref().get(CHANNELS_KEY) == {"foo": {"contents": [1], "index": 0}}


# -- receive, ack, gc -----------------------------------------------------------


def test_receive_acks_and_ignores_duplicates() -> None:
    a, b = SharedMap(), SharedMap()
    tx(a, lambda ref: channel.send(ref, "foo", ["m0", "m1", "m2"]))
    got, changes = tx(b, lambda ref: channel.receive(ref, a.ref(), "foo"))
    assert got == Received(0, ["m0", "m1", "m2"])
    assert isinstance(got, Received)
    assert (got.index, got.messages) == (0, ["m0", "m1", "m2"])
    assert changes is not None
    assert b.ref().to_dict() == {ACKS_KEY: {"foo": 2}}
    assert channel.first_ack_index(b.ref(), "foo") == 2

    again, changes = tx(b, lambda ref: channel.receive(ref, a.ref(), "foo"))
    assert again == Received(UNKNOWN_ACK_INDEX, [])
    assert changes is None

    tx(a, lambda ref: channel.send(ref, "foo", ["m3"]))
    assert tx(b, lambda ref: channel.receive(ref, a.ref(), "foo"))[0] == Received(3, ["m3"])
    assert channel.first_ack_index(b.ref(), "foo") == 3


def test_receive_from_unknown_channel_or_empty_map() -> None:
    a, b = SharedMap(), SharedMap()
    assert tx(b, lambda ref: channel.receive(ref, a.ref(), "foo")) == (
        Received(UNKNOWN_ACK_INDEX, []), None)
    tx(a, lambda ref: channel.send(ref, "other", [1]))
    assert tx(b, lambda ref: channel.receive(ref, a.ref(), "foo")) == (
        Received(UNKNOWN_ACK_INDEX, []), None)


def test_gc_drops_acked_messages_only() -> None:
    a, b = SharedMap(), SharedMap()
    tx(a, lambda ref: channel.send(ref, "foo", [0, 1, 2]))
    assert tx(a, lambda ref: channel.gc(ref, b.ref())) == (0, None)  # nothing acked yet
    tx(b, lambda ref: channel.receive(ref, a.ref(), "foo"))
    tx(a, lambda ref: channel.send(ref, "foo", [3, 4]))
    dropped, changes = tx(a, lambda ref: channel.gc(ref, b.ref()))
    assert dropped == 3
    assert changes is not None
    assert a.ref().get(CHANNELS_KEY) == {"foo": {"contents": [3, 4], "index": 3}}
    assert channel.first_index(a.ref(), "foo") == 3
    assert tx(a, lambda ref: channel.gc(ref, b.ref())) == (0, None)  # idempotent
    # the receiver carries on where it was
    assert tx(b, lambda ref: channel.receive(ref, a.ref(), "foo"))[0] == Received(3, [3, 4])
    assert tx(a, lambda ref: channel.gc(ref, b.ref()))[0] == 2
    assert a.ref().get(CHANNELS_KEY) == {"foo": {"contents": [], "index": 5}}
    assert tx(a, lambda ref: channel.send(ref, "foo", [5]))[0] == 5


def test_gc_ignores_acks_of_other_senders_channels() -> None:
    a = holding(**{CHANNELS_KEY: {"foo": {"contents": [1], "index": 0}}})
    b = holding(**{ACKS_KEY: {"elsewhere": 41, "broken": "not an int", "foo": -1}})
    assert tx(a, lambda ref: channel.gc(ref, b.ref())) == (0, None)


def test_gc_with_older_acks_drops_less() -> None:
    """A's copy of B's acks may lag: it only means less is dropped."""
    a = holding(**{CHANNELS_KEY: {"foo": {"contents": [5, 6], "index": 5}}})
    b = holding(**{ACKS_KEY: {"foo": 2}})
    assert tx(a, lambda ref: channel.gc(ref, b.ref())) == (0, None)


def test_caf_js_random_interleaving() -> None:
    """The Caf.js test: send / receive / gc in random orders, one commit each."""
    rng = random.Random(20240611)
    total = 3000
    source, destination = SharedMap(), SharedMap()
    pending = list(range(total))
    received: list[int] = []
    last_index = UNKNOWN_ACK_INDEX

    def send() -> None:
        batch = [pending.pop(0) for _ in range(min(rng.randint(1, 10), len(pending)))]
        tx(source, lambda ref: channel.send(ref, "foo", batch))

    def receive() -> None:
        nonlocal last_index
        got, _ = tx(destination, lambda ref: channel.receive(ref, source.ref(), "foo"))
        if got.messages:
            assert got.index > last_index
            assert got.index == len(received)
            last_index = got.index
        received.extend(got.messages)

    def collect() -> None:
        tx(source, lambda ref: channel.gc(ref, destination.ref()))

    while pending:
        steps = [send, receive, collect]
        rng.shuffle(steps)
        for step in steps:
            step()
    receive()
    collect()

    assert received == list(range(total))
    assert source.ref().get(CHANNELS_KEY)["foo"] == {"contents": [], "index": total}
    assert destination.ref().get(ACKS_KEY)["foo"] == total - 1


def test_round_trip_over_replicas_with_lost_order_and_duplicates() -> None:
    """A and B each own a map; each reads a replica of the other's, fed with
    the change sets the owner committed (through JSON, late, and twice)."""
    rng = random.Random(7)
    a_map, b_map = SharedMap(), SharedMap()
    a_replica, b_replica = SharedMap(), SharedMap()  # a_replica lives with B
    to_b: list[bytes] = []  # change sets of A's map on their way to B
    to_a: list[bytes] = []

    def deliver(queue: list[bytes], replica: SharedMap, everything: bool = False) -> None:
        count = len(queue) if everything else rng.randint(0, len(queue))
        for data in queue[:count]:
            replica.apply_changes(orjson.loads(data))
            replica.apply_changes(orjson.loads(data))  # duplicates are ignored
        del queue[:count]

    sent = 0
    received: list[Any] = []
    for _ in range(300):
        batch = [{"n": sent + i, "text": f"msg {sent + i}"} for i in range(rng.randint(0, 4))]
        sent += len(batch)
        _, changes = tx(a_map, lambda ref, batch=batch: (
            channel.send(ref, "a->b", batch), channel.gc(ref, b_replica.ref(read_only=True))))
        if changes:
            to_b.append(orjson.dumps(changes))
        deliver(to_b, a_replica)
        got, changes = tx(b_map, lambda ref: channel.receive(
            ref, a_replica.ref(read_only=True), "a->b"))
        if got.messages:
            assert got.index == len(received)
        received.extend(got.messages)
        if changes:
            to_a.append(orjson.dumps(changes))
        deliver(to_a, b_replica)

    deliver(to_b, a_replica, everything=True)
    got, changes = tx(b_map, lambda ref: channel.receive(ref, a_replica.ref(), "a->b"))
    received.extend(got.messages)
    if changes:
        to_a.append(orjson.dumps(changes))
    deliver(to_a, b_replica, everything=True)
    tx(a_map, lambda ref: channel.gc(ref, b_replica.ref(read_only=True)))

    assert [m["n"] for m in received] == list(range(sent))
    assert sent > 100
    assert a_map.ref().get(CHANNELS_KEY)["a->b"] == {"contents": [], "index": sent}
    assert channel.first_ack_index(b_map.ref(), "a->b") == sent - 1


# -- names, indexes, deletion ------------------------------------------------------


def test_indexes_and_names_of_an_empty_map() -> None:
    ref = SharedMap().ref()
    assert channel.all_channel_names(ref) == []
    assert channel.first_index(ref, "foo") == FIRST_INDEX
    assert channel.first_ack_index(ref, "foo") == UNKNOWN_ACK_INDEX


@pytest.mark.parametrize("name", [
    "", "with space", "ünïcödé", "a.b-c/d:e", "__ca_version__", "💥", "{0.__class__}",
    "line\nbreak", "x" * 1000, "__ca_channels__",
])
def test_channel_names_with_odd_characters(name: str) -> None:
    a, b = SharedMap(), SharedMap()
    tx(a, lambda ref: channel.send(ref, name, ["hi", "there"]))
    tx(a, lambda ref: channel.send(ref, "plain", [0]))
    assert channel.all_channel_names(a.ref()) == [name, "plain"]
    got, _ = tx(b, lambda ref: channel.receive(ref, a.ref(), name))
    assert got == Received(0, ["hi", "there"])
    assert tx(a, lambda ref: channel.gc(ref, b.ref()))[0] == 2
    assert channel.first_index(a.ref(), name) == 2
    assert channel.first_index(a.ref(), "plain") == 0
    tx(b, lambda ref: channel.delete_channel(ref, name))
    assert channel.first_ack_index(b.ref(), name) == UNKNOWN_ACK_INDEX


def test_delete_channel_on_each_side() -> None:
    a, b = SharedMap(), SharedMap()
    tx(a, lambda ref: (channel.send(ref, "foo", [1, 2]), channel.send(ref, "bar", [3])))
    tx(b, lambda ref: (channel.receive(ref, a.ref(), "foo"), channel.receive(ref, a.ref(), "bar")))
    tx(a, lambda ref: channel.delete_channel(ref, "foo"))
    assert channel.all_channel_names(a.ref()) == ["bar"]
    tx(b, lambda ref: channel.delete_channel(ref, "foo"))
    assert b.ref().get(ACKS_KEY) == {"bar": 0}
    # deleting what is not there writes nothing
    assert tx(a, lambda ref: channel.delete_channel(ref, "foo")) == (None, None)
    assert tx(b, lambda ref: channel.delete_channel(ref, "nothing")) == (None, None)
    # deleted on both sides: the channel starts afresh
    assert tx(a, lambda ref: channel.send(ref, "foo", ["new"]))[0] == FIRST_INDEX
    assert tx(b, lambda ref: channel.receive(ref, a.ref(), "foo"))[0] == Received(0, ["new"])


def test_delete_channel_removes_both_keys_of_one_map() -> None:
    """A map can send on a channel and ack one with the same name."""
    both = holding(**{CHANNELS_KEY: {"foo": {"contents": [1], "index": 0}, "bar": {
        "contents": [], "index": 0}}, ACKS_KEY: {"foo": 3, "bar": 1}})
    tx(both, lambda ref: channel.delete_channel(ref, "foo"))
    assert both.ref().to_dict() == {CHANNELS_KEY: {"bar": {"contents": [], "index": 0}},
                                    ACKS_KEY: {"bar": 1}}


# -- bad input and corrupt data ---------------------------------------------------


@pytest.mark.parametrize("messages", ["abc", b"abc", {"a": 1}, None, 5, {1, 2}, iter([1])])
def test_messages_must_be_a_list(messages: Any) -> None:
    ref = holding(**{CHANNELS_KEY: {"foo": {"contents": [1], "index": 0}}}).ref()
    assert_refused(ref, TypeError, "messages for channel 'foo' must be a list or tuple",
                   lambda: channel.send(ref, "foo", messages))
    with pytest.raises(InvalidTypeError):
        channel.send(ref, "foo", messages)


@pytest.mark.parametrize("bad", [object(), float("nan"), {1: "x"}, [b"bytes"], 2**64])
def test_messages_must_be_json_data(bad: Any) -> None:
    ref = holding(**{CHANNELS_KEY: {"foo": {"contents": [1], "index": 0}}}).ref()
    assert_refused(ref, (TypeError, ValueError), r"messages for channel 'foo': .* at \[1\]",
                   lambda: channel.send(ref, "foo", [1, bad]))


@pytest.mark.parametrize("name", [None, 3, b"foo", ("foo",)])
def test_channel_name_must_be_a_str(name: Any) -> None:
    a = holding(**{CHANNELS_KEY: {"foo": {"contents": [1], "index": 0}}})
    ref = a.ref()
    for action in (lambda: channel.send(ref, name, [1]),
                   lambda: channel.receive(ref, a.ref(), name),
                   lambda: channel.delete_channel(ref, name),
                   lambda: channel.first_index(ref, name),
                   lambda: channel.first_ack_index(ref, name)):
        assert_refused(ref, InvalidTypeError, "channel name must be a str", action)


def test_read_only_refs_are_refused() -> None:
    a = SharedMap()
    tx(a, lambda ref: channel.send(ref, "foo", [1]))
    ref = a.ref(read_only=True)
    with pytest.raises(ReadOnlyError):
        channel.send(ref, "foo", [2])
    with pytest.raises(ReadOnlyError):
        channel.receive(ref, a.ref(), "foo")
    assert a.ref().get(CHANNELS_KEY) == {"foo": {"contents": [1], "index": 0}}


@pytest.mark.parametrize(("channels", "match"), [
    ("not a dict", "'__ca_channels__' must hold a dict"),
    ([1, 2], "'__ca_channels__' must hold a dict"),
    ({"foo": [1]}, "channel 'foo' in '__ca_channels__' must be a dict"),
    ({"foo": {"contents": [1]}}, "channel 'foo' .*'index' must be an int >= 0, found None"),
    ({"foo": {"contents": [1], "index": "0"}}, "'index' must be an int >= 0, found '0'"),
    ({"foo": {"contents": [1], "index": 1.0}}, "'index' must be an int >= 0, found 1.0"),
    ({"foo": {"contents": [1], "index": True}}, "'index' must be an int >= 0, found True"),
    ({"foo": {"contents": [1], "index": -1}}, "'index' must be an int >= 0, found -1"),
    ({"foo": {"contents": "abc", "index": 0}}, "'contents' must be a list, found str"),
    ({"foo": {"index": 0}}, "'contents' must be a list, found NoneType"),
])
def test_corrupt_channels_are_reported(channels: Any, match: str) -> None:
    a = holding(**{CHANNELS_KEY: channels})
    b = holding(**{ACKS_KEY: {"foo": 0}})
    a_ref, b_ref = a.ref(), b.ref()
    assert_refused(a_ref, ChannelError, match, lambda: channel.send(a_ref, "foo", [1]))
    assert_refused(a_ref, ChannelError, match, lambda: channel.gc(a_ref, b.ref()))
    assert_refused(a_ref, ChannelError, match, lambda: channel.first_index(a_ref, "foo"))
    assert_refused(b_ref, ChannelError, match, lambda: channel.receive(b_ref, a.ref(), "foo"))


@pytest.mark.parametrize(("acks", "match"), [
    ("not a dict", "'__ca_acks__' must hold a dict"),
    ({"foo": "1"}, "ack of channel 'foo' in '__ca_acks__' must be an int >= -1, found '1'"),
    ({"foo": 1.5}, "ack of channel 'foo' .* found 1.5"),
    ({"foo": False}, "ack of channel 'foo' .* found False"),
    ({"foo": -2}, "ack of channel 'foo' .* found -2"),
    ({"foo": None}, "ack of channel 'foo' .* found None"),
    ({"foo": [1]}, r"ack of channel 'foo' .* found \[1\]"),
])
def test_corrupt_acks_are_reported(acks: Any, match: str) -> None:
    a = holding(**{CHANNELS_KEY: {"foo": {"contents": [1, 2], "index": 0}}})
    b = holding(**{ACKS_KEY: acks})
    a_ref, b_ref = a.ref(), b.ref()
    assert_refused(a_ref, ChannelError, match, lambda: channel.gc(a_ref, b.ref()))
    assert_refused(b_ref, ChannelError, match, lambda: channel.receive(b_ref, a.ref(), "foo"))
    assert_refused(b_ref, ChannelError, match, lambda: channel.first_ack_index(b_ref, "foo"))


def test_ack_past_the_end_stops_gc_before_any_change() -> None:
    a = holding(**{CHANNELS_KEY: {
        "good": {"contents": [1, 2, 3], "index": 0},
        "bad": {"contents": [1], "index": 4},
    }})
    b = holding(**{ACKS_KEY: {"good": 2, "bad": 9}})
    a_ref = a.ref()
    assert_refused(a_ref, ChannelError,
                   r"channel 'bad': ack 9 is past the last message sent \(4\)",
                   lambda: channel.gc(a_ref, b.ref()))
    assert a.ref().get(CHANNELS_KEY)["good"] == {"contents": [1, 2, 3], "index": 0}


def test_ack_past_the_end_of_an_emptied_channel() -> None:
    a = holding(**{CHANNELS_KEY: {"foo": {"contents": [], "index": 3}}})
    b = holding(**{ACKS_KEY: {"foo": 5}})
    a_ref, b_ref = a.ref(), b.ref()
    assert_refused(a_ref, ChannelError, "ack 5 is past the last message sent \\(2\\)",
                   lambda: channel.gc(a_ref, b.ref()))
    assert_refused(b_ref, ChannelError, "ack 5 is past the last message sent",
                   lambda: channel.receive(b_ref, a.ref(), "foo"))


def test_receive_detects_messages_dropped_before_their_ack() -> None:
    a = holding(**{CHANNELS_KEY: {"foo": {"contents": ["m5"], "index": 5}}})
    b = holding(**{ACKS_KEY: {"foo": 2}})
    b_ref = b.ref()
    assert_refused(b_ref, ChannelError, "messages 3..4 were dropped before being acked",
                   lambda: channel.receive(b_ref, a.ref(), "foo"))
    fresh = SharedMap().ref()  # never acked anything
    assert_refused(fresh, ChannelError, "messages 0..4 were dropped",
                   lambda: channel.receive(fresh, a.ref(), "foo"))


def test_stored_values_are_never_mutated() -> None:
    a, b = SharedMap(), SharedMap()
    tx(a, lambda ref: channel.send(ref, "foo", [1, 2]))
    old_channels = a.ref().get(CHANNELS_KEY)
    tx(a, lambda ref: channel.send(ref, "foo", [3]))
    tx(b, lambda ref: channel.receive(ref, a.ref(), "foo"))
    old_acks = b.ref().get(ACKS_KEY)
    tx(a, lambda ref: channel.gc(ref, b.ref()))
    tx(a, lambda ref: channel.send(ref, "foo", [4]))
    tx(b, lambda ref: channel.receive(ref, a.ref(), "foo"))
    assert old_channels == {"foo": {"contents": [1, 2], "index": 0}}
    assert old_acks == {"foo": 2}
