"""The acquisition thread: `SafeMDAEngine` on the core's MDA runner, results to asyncio.

`Acquisition` runs the plan in a worker thread and hands each field's result to asyncio
through a bounded queue, so the acquisition waits when the consumer falls behind
(back-pressure) and memory stays bounded however long the scan.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import structlog
from pymmcore_plus import CMMCorePlus

from .plan import FieldOfView, check_against_limits, check_focus_plan, to_mda_sequence
from .safe_engine import AcquisitionConfig, FieldResult, RefocusConfig, SafeMDAEngine

log = structlog.get_logger("flakescan.acquisition")

__all__ = [
    "Acquisition",
    "AcquisitionConfig",
    "AcquisitionError",
    "FieldResult",
    "RefocusConfig",
    "SafeMDAEngine",
    "StageLimits",
]


@dataclass(frozen=True)
class StageLimits:
    """Where the stage and focus drive may go (the rig config's soft limits and safe Z)."""

    x_limits_um: tuple[float, float]
    y_limits_um: tuple[float, float]
    safe_z_um: float
    lower_z_um: float = float("-inf")


class AcquisitionError(RuntimeError):
    """The acquisition thread itself failed (not one field's hardware): the scan stopped."""


@dataclass(frozen=True, slots=True)
class _End:
    """The sentinel after the last result; carries the thread's error, if it failed."""

    error: BaseException | None = None


class Acquisition:
    """Scan `fields` in a worker thread and yield each field's result to asyncio, in order.

        async for result in Acquisition(core, fields, z_um=focus_map, queue_size=8).results():
            ...

    The queue holds at most `queue_size` results; when the consumer falls behind, the
    acquisition thread blocks with one more in hand, so memory stays bounded however long the
    scan. `cancel()` stops after the current field; the iterator then yields what was already
    acquired and ends. Leaving the `async for` early cancels too, dropping what was queued.
    A failure of the thread itself (not a field's hardware, which becomes a failed result)
    is raised from the iterator as AcquisitionError.

    An Acquisition runs once. The core's MDA engine is replaced for the run, then restored.
    """

    def __init__(
        self,
        core: CMMCorePlus,
        fields: Sequence[FieldOfView],
        *,
        z_um: Callable[[float, float], float] | None = None,
        config: AcquisitionConfig | None = None,
        queue_size: int = 8,
        limits: StageLimits | None = None,
        refocus: RefocusConfig | None = None,
    ) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        if limits is not None:
            # Refused here, before anything moves: a real stage has no soft limits of its own.
            check_against_limits(fields, limits.x_limits_um, limits.y_limits_um)
            if z_um is not None:
                check_focus_plan(fields, z_um, limits.safe_z_um, limits.lower_z_um)
        self.core = core
        self.fields = list(fields)
        self.z_um = z_um
        self.queue_size = queue_size
        #: results the acquisition thread has finished (consumed or not): progress reporting
        self.produced = 0
        self.thread: threading.Thread | None = None
        self.engine = SafeMDAEngine(
            core, config, on_field=self._hand_over, fields=self.fields, refocus=refocus
        )
        # Set when the consumer has gone, so a put that would wait for it forever gives up.
        self._abandoned: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[FieldResult | _End] | None = None

    def cancel(self) -> None:
        """Stop after the field in progress; safe from any thread, before or during the scan."""
        self.engine.request_stop()

    async def results(self) -> AsyncIterator[FieldResult]:
        if self.thread is not None:
            raise RuntimeError("an Acquisition runs once; make a new one to scan again")
        # Built here, not in the thread: a bad plan or focus map raises to the caller directly.
        sequence = to_mda_sequence(self.fields, self.z_um)
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        previous = self.core.mda.engine
        self.core.register_mda_engine(self.engine)  # refuses if another MDA is running
        self.thread = threading.Thread(
            target=self._work, args=(sequence,), name="flakescan-acquisition", daemon=True
        )
        self.thread.start()
        finished = False
        try:
            while not isinstance(item := await self._queue.get(), _End):
                yield item
            finished = True
            if item.error is not None:
                raise AcquisitionError(
                    f"the acquisition thread failed: {type(item.error).__name__}: {item.error}"
                ) from item.error
        finally:
            if not finished:  # the consumer left early: stop, and free a blocked hand-over
                self.cancel()
                self._abandoned.set_result(None)
            await asyncio.to_thread(self.thread.join)
            if previous is not None:
                self.core.register_mda_engine(previous)

    def _work(self, sequence: object) -> None:
        error: BaseException | None = None
        try:
            self.core.mda.run(sequence)  # type: ignore[arg-type]
        except BaseException as e:  # surfaced on the asyncio side, never lost in a thread
            error = e
            log.error("acquisition.thread_failed", error=repr(e))
        self._put(_End(error))

    def _hand_over(self, result: FieldResult) -> None:
        """Called in the acquisition thread for each field; blocks while the queue is full."""
        self.produced += 1
        self._put(result)

    def _put(self, item: FieldResult | _End) -> None:
        assert self._loop is not None and self._queue is not None
        if self._abandoned.done():  # no one will read it; the scan is stopping
            return
        try:
            put = asyncio.run_coroutine_threadsafe(self._queue.put(item), self._loop)
        except RuntimeError:  # the consumer's loop has closed: no one to tell
            log.warning("acquisition.loop_closed", item=type(item).__name__)
            return
        done, _ = concurrent.futures.wait(
            [put, self._abandoned], return_when=concurrent.futures.FIRST_COMPLETED
        )
        if put in done:
            put.result()  # re-raises if the put itself failed
        else:
            put.cancel()
