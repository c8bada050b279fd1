"""The task runtime on every backend: task groups, cancel scopes and deadlines, Event, Queue, Lock, tasks, signals.

On the blocking backend every task is an OS thread, on the others one thread runs them all; the same tests must pass
on both kinds of driver. Wall-clock bounds are generous (a loaded 2-core CI machine) but still fail a serial run.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import types

import pytest

import iokit
from iokit import (Cancelled, CancelScope, Event, Lock, Queue, TaskGroup, WouldBlock, fail_after, move_on_after, ops,
                   perform, sleep, sleep_forever)

from iokit.runtime import set_current_task

from conftest import require_backend
from test_conformance import tcp_pair

LOCALHOST = "127.0.0.1"


# --- task groups ------------------------------------------------------------------------------------------------------

def test_task_group_runs_children_concurrently(run):
    async def main():
        started = time.monotonic()
        async with TaskGroup() as group:
            tasks = [group.spawn(sleep, 0.3) for _ in range(10)]
        return time.monotonic() - started, [task.finished for task in tasks]

    elapsed, finished = run(main)
    assert all(finished)
    assert 0.29 <= elapsed < 1.5, f"10 concurrent sleeps of 0.3 s took {elapsed:.2f} s"


def test_task_results_and_wait(run):
    async def double(value, delay):
        await sleep(delay)
        return value * 2

    async def main():
        async with TaskGroup() as group:
            slow = group.spawn(double, 21, 0.1, name="slow")
            quick = group.spawn(double, 5, 0)
            with pytest.raises(RuntimeError):
                slow.result()  # not finished yet
            await slow.wait()
            assert slow.finished
            await slow.wait()  # waiting again on a finished task returns at once
        return slow.result(), quick.result(), slow.name

    assert run(main) == (42, 10, "slow")


def test_error_in_a_child_cancels_siblings_and_is_raised(run):
    state = {}

    async def sibling():
        try:
            await sleep_forever()
        except Cancelled:
            state["sibling"] = "cancelled"
            raise

    async def failing():
        await sleep(0.05)
        raise ValueError("boom")

    async def main():
        started = time.monotonic()
        with pytest.raises(ValueError, match="boom"):
            async with TaskGroup() as group:
                group.spawn(sibling)
                group.spawn(sibling)
                group.spawn(failing)
                await sleep_forever()  # the body is cancelled too
        return time.monotonic() - started

    assert run(main) < 3
    assert state == {"sibling": "cancelled"}


def test_several_errors_become_an_exception_group(run):
    async def fail():
        await sleep(0.05)
        raise KeyError("a")

    async def fail_when_cancelled():
        try:
            await sleep_forever()
        except Cancelled:
            raise IndexError("b") from None  # a cleanup that fails: a second error

    async def main():
        try:
            async with TaskGroup() as group:
                group.spawn(fail)
                group.spawn(fail_when_cancelled)
        except BaseExceptionGroup as group_error:
            return sorted(type(exc).__name__ for exc in group_error.exceptions)

    assert run(main) == ["IndexError", "KeyError"]


def test_error_in_the_group_body_cancels_children(run):
    async def main():
        async with TaskGroup() as group:
            child = group.spawn(sleep_forever)
            await sleep(0.05)
            raise LookupError("body failed")

    started = time.monotonic()
    with pytest.raises(LookupError):
        run(main)
    assert time.monotonic() - started < 3


def test_spawn_needs_an_entered_group(run):
    async def main():
        with pytest.raises(RuntimeError):
            TaskGroup().spawn(sleep, 0)

    run(main)


def test_task_cancel_cancels_only_that_task(run):
    async def main():
        async with TaskGroup() as group:
            victim = group.spawn(sleep_forever)
            survivor = group.spawn(sleep, 0.2)
            await sleep(0.05)
            victim.cancel()
            await victim.wait()
            assert not survivor.finished
        with pytest.raises(Cancelled):
            victim.result()
        return survivor.result()

    assert run(main) is None


# --- cancel scopes and deadlines ------------------------------------------------------------------------------------

def test_move_on_after_and_fail_after(run):
    async def main():
        started = time.monotonic()
        with move_on_after(0.1) as scope:
            await sleep(10)
        moved = time.monotonic() - started
        with move_on_after(5) as relaxed:
            await sleep(0.01)
        with pytest.raises(TimeoutError):
            with fail_after(0.1):
                await sleep(10)
        with fail_after(5):
            await sleep(0.01)
        return scope.cancelled_caught, relaxed.cancelled_caught, moved

    caught, relaxed_caught, moved = run(main)
    assert caught and not relaxed_caught
    assert 0.09 <= moved < 2


def test_nested_scopes_inner_deadline_first(run):
    async def main():
        trace = []
        with move_on_after(1.0) as outer:
            with move_on_after(0.1) as inner:
                await sleep(10)
            trace.append(("inner", inner.cancelled_caught))
            await sleep(0.01)
            trace.append(("after inner", outer.cancel_called))
        trace.append(("outer", outer.cancelled_caught))
        return trace

    assert run(main) == [("inner", True), ("after inner", False), ("outer", False)]


def test_outer_deadline_passes_through_an_inner_scope(run):
    async def main():
        started = time.monotonic()
        with move_on_after(0.1) as outer:
            with move_on_after(10) as inner:
                await sleep(10)
        return outer.cancelled_caught, inner.cancelled_caught, time.monotonic() - started

    outer_caught, inner_caught, elapsed = run(main)
    assert (outer_caught, inner_caught) == (True, False)
    assert elapsed < 2


def test_outer_cancel_reaches_children_of_nested_groups(run):
    cancelled = []

    async def worker(name):
        try:
            await sleep_forever()
        except Cancelled:
            cancelled.append(name)
            raise

    async def middle():
        async with TaskGroup() as group:
            group.spawn(worker, "grandchild-1")
            group.spawn(worker, "grandchild-2")
            await worker("middle")

    async def main():
        with CancelScope() as scope:
            async with TaskGroup() as group:
                group.spawn(middle)
                group.spawn(worker, "child")
                await sleep(0.1)
                scope.cancel()
                await sleep_forever()
        return scope.cancelled_caught

    assert run(main) is True
    assert sorted(cancelled) == ["child", "grandchild-1", "grandchild-2", "middle"]


def test_shield_protects_from_outer_cancel(run):
    async def main():
        trace = []
        with move_on_after(0.05) as outer:
            with CancelScope(shield=True):
                await sleep(0.2)
                trace.append("shielded sleep finished")
            await sleep(0)  # the first checkpoint outside the shield sees the cancel
            trace.append("not reached")
        trace.append(outer.cancelled_caught)
        return trace

    assert run(main) == ["shielded sleep finished", True]


def test_shielded_scope_still_honours_its_own_deadline(run):
    async def main():
        with move_on_after(5):
            with CancelScope(shield=True, deadline=iokit.current_time() + 0.1) as scope:
                await sleep(10)
        return scope.cancelled_caught

    assert run(main) is True


def test_a_deadline_reaches_a_task_that_only_checkpoints(run):
    """A busy task that never waits, only checkpoints, is still cut short by its deadline."""
    async def main():
        started = time.monotonic()
        rounds = 0
        with move_on_after(0.1) as scope:
            while time.monotonic() - started < 2:
                rounds += 1
                await iokit.checkpoint()
        return scope.cancelled_caught, time.monotonic() - started

    caught, elapsed = run(main)
    assert caught and elapsed < 1, (caught, elapsed)


def test_a_busy_task_that_checkpoints_does_not_starve_the_others(run):
    async def main():
        done = Event()

        async def sleeper():
            await sleep(0.05)
            done.set()

        started = time.monotonic()
        async with TaskGroup() as group:
            group.spawn(sleeper)
            while not done.is_set() and time.monotonic() - started < 2:
                await iokit.checkpoint()
        return done.is_set(), time.monotonic() - started

    woke, elapsed = run(main)
    assert woke and elapsed < 1, (woke, elapsed)


def test_deadline_can_be_moved(run):
    async def main():
        started = time.monotonic()
        with CancelScope() as scope:
            scope.deadline = iokit.current_time() + 0.1
            await sleep(10)
        return scope.cancelled_caught, time.monotonic() - started

    caught, elapsed = run(main)
    assert caught and 0.09 <= elapsed < 2


def test_scopes_that_end_before_their_deadline_leave_no_timers_behind(run):
    # A server wraps each request in scopes with timeouts it rarely reaches. 20,000 such scopes, each ended long
    # before its deadline, must not leave 20,000 entries in the loop driver's deadline heap; and a deadline still
    # live among them must still fire.
    async def main():
        driver = iokit.runtime.current_task().runtime
        with CancelScope(deadline=iokit.current_time() + 0.3) as live:
            for _ in range(20_000):
                with CancelScope(deadline=iokit.current_time() + 60):
                    pass
            heap_size = len(getattr(driver, "_deadlines", ()))   # the blocking driver keeps none
            await sleep(10)
        return heap_size, live.cancelled_caught

    heap_size, caught = run(main)
    assert caught, "the live deadline did not fire"
    assert heap_size <= 3000, f"{heap_size} deadline entries kept for 1 live scope"


def test_cancelled_scope_raises_at_the_next_checkpoint(run):
    async def main():
        with CancelScope() as scope:
            scope.cancel()
            await iokit.checkpoint()
            return "not reached"
        return scope.cancelled_caught

    assert run(main) is True


def test_sleep_until_and_current_time(run):
    async def main():
        start = iokit.current_time()
        await iokit.sleep_until(start + 0.1)
        return iokit.current_time() - start

    assert 0.09 <= run(main) < 2


# --- Event -----------------------------------------------------------------------------------------------------------

def test_event_set_before_and_after_wait_with_many_waiters(run):
    async def main():
        already = Event()
        already.set()
        await already.wait()  # returns at once

        event = Event()
        woken = []

        async def waiter(index):
            await event.wait()
            woken.append(index)

        async with TaskGroup() as group:
            for index in range(20):
                group.spawn(waiter, index)
            await sleep(0.05)
            assert woken == [] and not event.is_set()
            event.set()
        event.clear()
        assert not event.is_set()
        return sorted(woken)

    assert run(main) == list(range(20))


def test_event_wait_can_be_cancelled_and_the_event_still_works(run):
    async def main():
        event = Event()
        with move_on_after(0.05) as scope:
            await event.wait()
        assert scope.cancelled_caught
        got = []

        async def waiter():
            await event.wait()
            got.append(True)

        async with TaskGroup() as group:
            group.spawn(waiter)
            await sleep(0.02)
            event.set()
        return got

    assert run(main) == [True]


# --- Queue -------------------------------------------------------------------------------------------------------------

def test_queue_producer_consumer_preserves_order_and_count(run):
    async def main():
        queue = Queue(4)
        received = []

        async def producer(base):
            for index in range(100):
                await queue.put((base, index))
            await queue.put((base, None))

        async def consumer():
            finished = 0
            while finished < 3:
                base, index = await queue.get()
                if index is None:
                    finished += 1
                else:
                    received.append((base, index))

        async with TaskGroup() as group:
            group.spawn(consumer)
            for base in range(3):
                group.spawn(producer, base)
        return received

    received = run(main)
    assert len(received) == 300
    for base in range(3):
        assert [index for b, index in received if b == base] == list(range(100))


def test_queue_put_blocks_when_full_and_nowait_raise(run):
    async def main():
        queue = Queue(2)
        with pytest.raises(WouldBlock):
            queue.get_nowait()
        queue.put_nowait("a")
        await queue.put("b")
        assert queue.full() and queue.qsize() == 2
        with pytest.raises(WouldBlock):
            queue.put_nowait("c")
        with move_on_after(0.1) as scope:
            await queue.put("c")  # blocks: full
        assert scope.cancelled_caught

        async def late_put():
            await queue.put("d")

        async with TaskGroup() as group:
            putter = group.spawn(late_put)
            await sleep(0.05)
            assert not putter.finished  # still blocked
            assert queue.get_nowait() == "a"
        items = [queue.get_nowait(), queue.get_nowait()]
        assert queue.empty()
        return items

    assert run(main) == ["b", "d"]


def test_queue_refuses_a_size_below_one():
    with pytest.raises(ValueError):
        Queue(0)


def test_cancelled_get_loses_no_item(run):
    async def main():
        queue = Queue(10)
        got = []

        async def getter():
            got.append(await queue.get())

        async with TaskGroup() as group:
            victim = group.spawn(getter)
            other = group.spawn(getter)
            await sleep(0.05)
            victim.cancel()
            await victim.wait()
            queue.put_nowait("only item")
            await other.wait()
        return got, queue.qsize()

    assert run(main) == (["only item"], 0)


def test_cancelled_put_does_not_insert(run):
    async def main():
        queue = Queue(1)
        queue.put_nowait(1)
        with move_on_after(0.05):
            await queue.put(2)
        items = [queue.get_nowait()]
        await queue.put(3)
        items.append(queue.get_nowait())
        return items, queue.qsize()

    assert run(main) == ([1, 3], 0)


# --- Lock --------------------------------------------------------------------------------------------------------------

def test_lock_mutual_exclusion(run):
    async def main():
        lock = Lock()
        state = {"counter": 0, "inside": 0, "max_inside": 0}

        async def worker():
            for _ in range(10):
                async with lock:
                    state["inside"] += 1
                    state["max_inside"] = max(state["max_inside"], state["inside"])
                    value = state["counter"]
                    await sleep(0.0005)
                    state["counter"] = value + 1
                    state["inside"] -= 1

        async with TaskGroup() as group:
            for _ in range(20):
                group.spawn(worker)
        return state["counter"], state["max_inside"], lock.locked()

    assert run(main) == (200, 1, False)


def test_lock_is_fifo(run):
    async def main():
        lock = Lock()
        order = []

        async def waiter(index):
            async with lock:
                order.append(index)

        await lock.acquire()
        async with TaskGroup() as group:
            for index in range(10):
                group.spawn(waiter, index)
                # Queue them in a known order: wait until this one is parked (on blocking it is a new thread).
                with fail_after(5):
                    while len(lock._waiters) < index + 1:
                        await sleep(0.001)
            lock.release()
        return order

    assert run(main) == list(range(10))


def test_lock_misuse(run):
    async def main():
        lock = Lock()
        with pytest.raises(RuntimeError):
            lock.release()
        async with lock:
            with pytest.raises(RuntimeError):
                await lock.acquire()
        return lock.locked()

    assert run(main) is False


def test_cancelled_acquire_leaves_the_lock_usable(run):
    async def main():
        lock = Lock()
        await lock.acquire()

        async def contender():
            async with lock:
                return "got it"

        async with TaskGroup() as group:
            victim = group.spawn(contender)
            after = group.spawn(contender)
            await sleep(0.05)
            victim.cancel()
            await victim.wait()
            lock.release()
        with pytest.raises(Cancelled):
            victim.result()
        with fail_after(2):
            async with lock:
                pass
        return after.result(), lock.locked()

    assert run(main) == ("got it", False)


# --- runtime plumbing ---------------------------------------------------------------------------------------------------

def test_run_returns_the_result_and_passes_arguments(run):
    async def main(a, b):
        await sleep(0)
        return a + b, iokit.current_backend().name

    assert run(main, 2, 3) == (5, run.name)


def test_run_refuses_a_plain_function(run):
    with pytest.raises(TypeError):
        run(lambda: None)


def test_an_error_from_submit_is_raised_in_the_task(run):
    """An op used twice is refused by the backend with ValueError; the task sees it and can carry on."""
    async def main():
        op = ops.nop()
        await perform(op)
        with pytest.raises(ValueError):
            await perform(op)
        await sleep(0.01)
        return "carried on"

    assert run(main) == "carried on"


def test_perform_in_a_cancelled_scope_raises_cancelled_without_submitting(run):
    async def main():
        op = ops.nop()
        with CancelScope() as scope:
            scope.cancel()
            await perform(op)
        return scope.cancelled_caught, op.state.name

    assert run(main) == (True, "NEW")


def test_current_task_outside_run_raises():
    with pytest.raises(RuntimeError):
        iokit.current_task()


@types.coroutine
def _yield_as_is(thing):
    return (yield thing)


def test_awaiting_what_is_not_an_iokit_trap_raises_in_that_task_and_the_runtime_goes_on(run):
    # What an awaitable of another event loop does (an asyncio Future yields itself): no driver knows what it is.
    async def main():
        with pytest.raises(RuntimeError, match="not an iokit trap"):
            await _yield_as_is("a string")
        await sleep(0.01)
        return "went on"

    assert run(main) == "went on"


@pytest.mark.parametrize("engine_backend", ["epoll", "uring"])
def test_an_engine_trap_of_a_coroutine_stepped_by_hand_is_started_by_the_engine(engine_backend):
    # The HTTP core runs a handler at once and, when it waits, hands the trap it yielded to the driver's _handle as
    # the task's own (iokit/http/connection.py). On epoll and uring that trap may be the engine's (the handler awaits
    # a stream): the engine must start it and resume the task with what it received.
    require_backend(engine_backend)

    async def receive(stream):
        return await stream.receive_some()

    async def main():
        client, server = await tcp_pair()
        async with client, server:
            driver = iokit.current_task().runtime
            task = driver.new_task(receive, (server,), "stepped by hand", None, driver.root_scope, start=False)
            previous = iokit.current_task()
            set_current_task(task)
            try:
                trap = task.coro.send(None)
            finally:
                set_current_task(previous)
            driver._handle(task, trap)
            await client.sendall(b"hello")
            with fail_after(5):
                await task.wait()
            return type(trap).__name__, task.result()

    assert iokit.run(main, backend=engine_backend) == ("Trap", b"hello")


@pytest.mark.parametrize("backend_without_engine", ["blocking", "threads"])
def test_a_stream_awaited_outside_the_runtime_whose_engine_made_it_fails_in_the_task(backend_without_engine):
    # A listener made on epoll holds that runtime's engine, and its accept is an engine Trap, which no Python driver
    # can run: the task gets a RuntimeError saying so (this used to end run() itself, with an AttributeError on
    # threads and a TypeError on blocking).
    require_backend("epoll")

    async def make():
        return await iokit.open_tcp_listener(LOCALHOST, 0)

    async def main(listener):
        with pytest.raises(RuntimeError, match="another runtime"):
            await listener.accept()
        await sleep(0.01)
        return "went on"

    listener = iokit.run(make, backend="epoll")
    try:
        assert iokit.run(main, listener, backend=backend_without_engine) == "went on"
    finally:
        listener.socket.close()


# --- signals -----------------------------------------------------------------------------------------------------------

@pytest.mark.timeout(20)
@pytest.mark.parametrize("sender", ["task", "thread"])
def test_signal_event(run, sender):
    previous = signal.getsignal(signal.SIGUSR1)

    async def main():
        event = iokit.signal_event(signal.SIGUSR1)
        assert not event.is_set()
        if sender == "task":
            async def send():
                await sleep(0.05)
                os.kill(os.getpid(), signal.SIGUSR1)
            async with TaskGroup() as group:
                group.spawn(send)
                with fail_after(5):
                    await event.wait()
        else:
            thread = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1))
            thread.start()
            try:
                with fail_after(5):
                    await event.wait()
            finally:
                thread.join()
        return event.is_set()

    assert run(main) is True
    assert signal.getsignal(signal.SIGUSR1) is previous, "the previous handler must come back after run()"


# --- the same program everywhere ------------------------------------------------------------------------------------------

async def _example_program(path: str) -> list:
    """A small program touching every part of the runtime; its transcript must not depend on the backend."""
    transcript = []
    queue = Queue(2)
    lock = Lock()
    done = Event()
    async with await iokit.open_tcp_listener(LOCALHOST, 0) as listener:
        async def server():
            async with await listener.accept() as stream:
                while data := await stream.receive_some(1024):
                    await stream.sendall(data.upper())

        async def producer():
            for word in ("alpha", "beta", "gamma", "delta"):
                await queue.put(word)
            await queue.put(None)

        async def consumer():
            async with await iokit.connect_tcp(LOCALHOST, listener.address[1]) as client:
                async with await iokit.open_file(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600) as file:
                    offset = 0
                    while (word := await queue.get()) is not None:
                        await client.sendall(word.encode())
                        echoed = b""
                        while len(echoed) < len(word):
                            echoed += await client.receive_some(1024)
                        async with lock:
                            offset += await file.write_at(echoed + b"\n", offset)
                        transcript.append(echoed.decode())
                    await file.fsync()
                    transcript.append((await file.read_at(100, 0)).decode())
            done.set()

        async with TaskGroup() as group:
            group.spawn(server)
            group.spawn(producer)
            group.spawn(consumer)
            with move_on_after(0.05) as scope:
                await sleep_forever()
            transcript.append(f"timeout caught: {scope.cancelled_caught}")
            await done.wait()
    return transcript


EXPECTED_TRANSCRIPT = ["ALPHA", "BETA", "GAMMA", "DELTA", "ALPHA\nBETA\nGAMMA\nDELTA\n"]


def test_the_same_program_gives_the_same_output_on_every_backend(backend_name, tmp_path):
    # iokit.run by name, as a user would run it: the runtime opens and closes the backend itself.
    transcript = iokit.run(_example_program, str(tmp_path / "out"), backend=backend_name)
    timeout_line = "timeout caught: True"
    assert timeout_line in transcript
    transcript.remove(timeout_line)
    assert transcript == EXPECTED_TRANSCRIPT


@pytest.mark.timeout(90)
def test_200_concurrent_echo_connections(run):
    connections = 200
    message_size = 4096

    async def main():
        async with await iokit.open_tcp_listener(LOCALHOST, 0) as listener:
            served = []

            async def handle(stream):
                async with stream:
                    total = 0
                    while data := await stream.receive_some(65536):
                        await stream.sendall(data)
                        total += len(data)
                    served.append(total)

            async def serve(group):
                for _ in range(connections):
                    group.spawn(handle, await listener.accept())

            async def client(index, results):
                payload = bytes([index % 256]) * message_size
                async with await iokit.connect_tcp(LOCALHOST, listener.address[1]) as stream:
                    await stream.sendall(payload)
                    await stream.shutdown_write()
                    echoed = bytearray()
                    while data := await stream.receive_some(65536):
                        echoed += data
                results[index] = bytes(echoed) == payload

            results = {}
            with fail_after(60):
                async with TaskGroup() as servers:
                    servers.spawn(serve, servers)
                    async with TaskGroup() as clients:
                        for index in range(connections):
                            clients.spawn(client, index, results)
        return results, served

    # The threads backend holds a worker per waiting op (its documented limit): 200 clients and 200 handlers may all
    # wait at once, so give it room for them. The other backends ignore the option.
    results, served = run(main, max_workers=4 * connections)
    assert len(results) == connections and all(results.values())
    assert sorted(served) == [message_size] * connections
