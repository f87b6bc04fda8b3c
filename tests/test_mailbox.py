"""The actor mailbox: a bounded FIFO with one reader."""

from __future__ import annotations

import asyncio

import pytest

from caf_sharing.mailbox import Mailbox


async def test_fifo_and_sizes() -> None:
    box: Mailbox[int] = Mailbox(3)
    assert box.empty() and box.qsize() == 0
    for i in range(3):
        box.put_nowait(i)
    assert box.qsize() == 3 and not box.empty()
    assert [await box.get(), box.get_nowait(), await box.get()] == [0, 1, 2]
    assert box.empty()


async def test_put_nowait_refuses_past_the_bound_and_keeps_what_it_holds() -> None:
    box: Mailbox[str] = Mailbox(1)
    box.put_nowait("a")
    with pytest.raises(asyncio.QueueFull):
        box.put_nowait("b")
    assert box.qsize() == 1 and box.get_nowait() == "a"


async def test_get_nowait_on_empty_raises() -> None:
    with pytest.raises(asyncio.QueueEmpty):
        Mailbox[int](1).get_nowait()


async def test_get_waits_for_an_item() -> None:
    box: Mailbox[int] = Mailbox(2)
    reader = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    assert not reader.done()
    box.put_nowait(7)
    assert await reader == 7


async def test_a_cancelled_reader_leaves_no_waiter_behind() -> None:
    box: Mailbox[int] = Mailbox(2)
    reader = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    box.put_nowait(1)  # must not touch the cancelled reader's future
    assert await box.get() == 1


async def test_put_waits_for_room_in_order() -> None:
    box: Mailbox[int] = Mailbox(1)
    box.put_nowait(0)
    first = asyncio.create_task(box.put(1))
    second = asyncio.create_task(box.put(2))
    await asyncio.sleep(0)
    assert not first.done() and not second.done()
    assert box.get_nowait() == 0
    await first
    assert not second.done()
    assert await box.get() == 1
    await second
    assert await box.get() == 2


async def test_a_writer_cancelled_after_being_woken_passes_the_room_on() -> None:
    box: Mailbox[int] = Mailbox(1)
    box.put_nowait(0)
    first = asyncio.create_task(box.put(1))
    second = asyncio.create_task(box.put(2))
    await asyncio.sleep(0)
    box.get_nowait()  # wakes the first writer...
    first.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    await second
    assert box.get_nowait() == 2 and box.empty()


async def test_parked_only_while_the_reader_waits_on_nothing() -> None:
    box: Mailbox[int] = Mailbox(2)
    assert not box.parked  # no reader
    reader = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    assert box.parked and box.front() is None
    box.put_nowait(1)
    assert not box.parked and box.front() == 1  # woken, not run yet
    assert await reader == 1
    assert not box.parked


async def test_put_front_goes_first_past_the_bound_and_wakes_the_reader() -> None:
    box: Mailbox[str] = Mailbox(1)
    reader = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    box.put_front("first")
    assert await reader == "first"
    box.put_nowait("queued")
    box.put_front("ahead")  # past the bound of 1
    assert box.qsize() == 2
    assert [box.get_nowait(), box.get_nowait()] == ["ahead", "queued"]


async def test_put_front_without_waking_leaves_the_reader_waiting_until_wake() -> None:
    box: Mailbox[str] = Mailbox(2)
    reader = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    box.put_front("later", wake=False)
    assert not box.parked  # something is queued: the actor is not idle
    await asyncio.sleep(0)
    assert not reader.done()
    box.wake()
    assert await reader == "later"


async def test_an_item_put_after_a_quiet_put_front_wakes_the_reader_for_both() -> None:
    box: Mailbox[str] = Mailbox(2)
    reader = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    box.put_front("first", wake=False)
    box.put_nowait("second")
    assert await reader == "first"
    assert box.get_nowait() == "second"


async def test_items_put_in_front_do_not_take_room() -> None:
    box: Mailbox[str] = Mailbox(1)
    box.put_front("ahead", wake=False)
    box.put_nowait("queued")  # the bound counts only items put at the back
    with pytest.raises(asyncio.QueueFull):
        box.put_nowait("one too many")
    writer = asyncio.create_task(box.put("waits"))
    await asyncio.sleep(0)
    assert box.get_nowait() == "ahead"
    await asyncio.sleep(0)
    assert not writer.done()  # taking the front item made no room
    assert box.get_nowait() == "queued"
    await writer
    assert box.get_nowait() == "waits"
