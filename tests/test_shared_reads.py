"""SharedReads: one read per cold adapter file at a time on a replica (deployments/shared_reads.py).
The replica-level effect is tested end to end in test_flux_serving.py."""

import asyncio
import threading

import pytest

from deployments.shared_reads import SharedReads


class Reader:
    """A read that blocks in its worker thread until released, and counts its runs."""

    def __init__(self, result="prepared", error: Exception | None = None):
        self.result, self.error = result, error
        self.runs = 0
        self.release = threading.Event()

    def __call__(self):
        self.runs += 1
        self.release.wait(10)
        if self.error is not None:
            raise self.error
        return self.result


async def holders(reads: SharedReads, key: str, read, count: int, hold_until: asyncio.Event):
    """`count` requests that each hold `key`'s read until `hold_until` is set."""
    results = []

    async def request():
        async with reads.hold(key, read) as result:
            results.append(result)
            await hold_until.wait()

    tasks = [asyncio.ensure_future(request()) for _ in range(count)]
    await asyncio.sleep(0.05)  # every request has joined before the read ends
    return tasks, results


def test_requests_for_one_key_share_one_read_and_one_result():
    async def main():
        reads, read, done = SharedReads(), Reader(result=object()), asyncio.Event()
        tasks, results = await holders(reads, "a@1", read, 5, done)
        read.release.set()
        await asyncio.sleep(0.05)
        assert len(results) == 5 and all(r is read.result for r in results)
        # A request arriving while others still hold the result joins it too.
        async with reads.hold("a@1", Reader()) as late:
            assert late is read.result
        assert (read.runs, reads.started, reads.joined, reads.held()) == (1, 1, 5, 1)
        done.set()
        await asyncio.gather(*tasks)
        assert reads.held() == 0  # dropped with its last holder
        fresh = Reader(result="again")
        fresh.release.set()
        async with reads.hold("a@1", fresh) as result:
            assert result == "again" and fresh.runs == 1

    asyncio.run(main())


def test_keys_are_read_apart():
    async def main():
        reads, first, second = SharedReads(), Reader(result=1), Reader(result=2)
        first.release.set()
        second.release.set()
        async with reads.hold("a@1", first) as one, reads.hold("a@2", second) as two:
            assert (one, two) == (1, 2)
        assert (reads.started, reads.joined) == (2, 0)

    asyncio.run(main())


def test_callbacks_follow_the_counts():
    async def main():
        counted = []
        reads, read, done = (
            SharedReads(
                on_start=lambda: counted.append("start"), on_join=lambda: counted.append("join")
            ),
            Reader(),
            asyncio.Event(),
        )
        tasks, _ = await holders(reads, "a@1", read, 3, done)
        read.release.set()
        done.set()
        await asyncio.gather(*tasks)
        assert (reads.started, reads.joined) == (1, 2)
        assert counted == ["start", "join", "join"]

    asyncio.run(main())


def test_a_failed_read_fails_its_holders_and_the_next_request_reads_again():
    async def main():
        reads, done = SharedReads(), asyncio.Event()
        failing = Reader(error=FileNotFoundError("gone"))
        tasks, _ = await holders(reads, "a@1", failing, 3, done)
        failing.release.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert [type(o) for o in outcomes] == [FileNotFoundError] * 3
        assert failing.runs == 1 and reads.held() == 0
        retry = Reader(result="found")
        retry.release.set()
        async with reads.hold("a@1", retry) as result:
            assert result == "found"

    asyncio.run(main())


def test_a_request_that_goes_away_leaves_the_read_to_the_others():
    async def main():
        reads, read, done = SharedReads(), Reader(), asyncio.Event()
        tasks, results = await holders(reads, "a@1", read, 3, done)
        tasks[0].cancel()
        await asyncio.sleep(0.01)
        read.release.set()
        done.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(outcomes[0], asyncio.CancelledError)
        assert outcomes[1:] == [None, None] and results == ["prepared", "prepared"]
        assert read.runs == 1 and reads.held() == 0

    asyncio.run(main())


def test_every_holder_gone_before_the_read_ends_leaves_nothing_held():
    async def main():
        reads, read, done = SharedReads(), Reader(), asyncio.Event()
        tasks, _ = await holders(reads, "a@1", read, 2, done)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert reads.held() == 0
        read.release.set()  # the orphaned read ends in its thread; nobody waits for it
        await asyncio.sleep(0.05)
        assert reads.held() == 0

    asyncio.run(main())


@pytest.mark.parametrize("count", [1, 8])
def test_counters_count_reads_and_joins(count):
    async def main():
        reads, read, done = SharedReads(), Reader(), asyncio.Event()
        tasks, _ = await holders(reads, "a@1", read, count, done)
        read.release.set()
        done.set()
        await asyncio.gather(*tasks)
        assert (reads.started, reads.joined) == (1, count - 1)

    asyncio.run(main())
