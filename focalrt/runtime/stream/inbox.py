"""What the frame lane waits on: the frames of one or several sources, and the description lane's results.

`SourceSet` is several sources read as one stream of frames, each frame tagged with its source's place
(`Frame.source`; left None when there is only one, so one-source events stay as they were). Iterated
directly (lock-step) it takes the sources in turn on the calling thread, the same order every run.
In real time `Inbox` gives every source a thread that hands its frames over one at a time, and wakes the
frame lane for whatever comes first: a frame of any source, or finished descriptions. A live source's frame
waiting there is replaced by a newer one (the frame lane always gets the present, as the source's own capture
thread does); any other source's reader waits until its frame was taken, so none is lost.

A source that fails (`SourceError`) is recorded in `SourceSet.lost` and the others go on; with a single
source the error ends the run, as it always did.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence

from focalrt.runtime.stream.sources import Frame, SourceError


class SourceSet:
    """Several frame sources as one stream; `lost` maps a source's place to why it stopped."""

    def __init__(self, sources: Sequence[Iterable[Frame]], names: Sequence[str] | None = None):
        if not sources:
            raise ValueError("a SourceSet needs at least one source")
        self.sources = list(sources)
        self.names = list(names) if names else [getattr(s, "name", f"source {i}") for i, s in enumerate(self.sources)]
        self.lost: dict[int, str] = {}
        self.replaced = [0] * len(self.sources)  # live frames a newer one replaced before the frame lane took them

    def stats(self, index: int) -> dict[str, int]:
        """A FrameSource's counts as the frame lane saw them: frames replaced while waiting are dropped, not
        yielded."""
        stats = dict(getattr(self.sources[index], "stats", {}))
        if self.replaced[index] and "frames_dropped" in stats:
            stats["frames_dropped"] += self.replaced[index]
            stats["frames_yielded"] -= self.replaced[index]
        return stats

    def __len__(self) -> int:
        return len(self.sources)

    def tag(self, frame: Frame, index: int) -> Frame:
        frame.source = index if len(self.sources) > 1 else None
        return frame

    def fail(self, index: int, error: BaseException) -> None:
        """A source stopped with `error`: raise it when it ends the run (the only source, or not a source
        error), else remember it as lost."""
        if len(self.sources) == 1 or not isinstance(error, SourceError):
            raise error
        self.lost[index] = str(error)

    def __iter__(self) -> Iterator[Frame]:
        """Lock-step: one frame of each source in turn, skipping those that ended or were lost."""
        iterators = [iter(s) for s in self.sources]
        active = list(range(len(iterators)))
        while active:
            for i in list(active):
                try:
                    frame = next(iterators[i])
                except StopIteration:
                    active.remove(i)
                    continue
                except SourceError as e:
                    self.fail(i, e)
                    active.remove(i)
                    continue
                yield self.tag(frame, i)

    def close(self) -> None:
        for source in self.sources:
            close = getattr(source, "close", None)
            if close is not None:
                close()


class Inbox:
    """Real time: one reading thread per source, each handing over a frame at a time; iterating yields the
    next frame (the source that has waited longest first) or None when only descriptions are ready, and ends
    when every source has ended."""

    def __init__(self, sources: SourceSet):
        self.sources = sources
        n = len(sources)
        self.cond = threading.Condition()
        self.slots: list[Frame | None] = [None] * n
        self.arrival = [0] * n  # when each slot was filled, to serve the longest-waiting source first
        self.count = 0
        self.reading = n  # threads still reading
        self.errors: list[tuple[int, BaseException]] = []
        self.woken = False
        self.closed = False
        self.threads = [threading.Thread(target=self._read, args=(i, s), name=f"focalrt source {i}", daemon=True)
                        for i, s in enumerate(sources.sources)]

    def start(self) -> Inbox:
        for thread in self.threads:
            thread.start()
        return self

    def _read(self, index: int, source: Iterable[Frame]) -> None:
        live = bool(getattr(source, "live", False))
        try:
            for frame in source:
                with self.cond:
                    if live and self.slots[index] is not None:  # newest frame wins
                        self.sources.replaced[index] += 1
                    while not live and self.slots[index] is not None and not self.closed:
                        self.cond.wait()
                    if self.closed:
                        return
                    self.count += 1
                    self.slots[index], self.arrival[index] = self.sources.tag(frame, index), self.count
                    self.cond.notify_all()
        except BaseException as e:  # raised (or recorded as lost) on the frame lane's thread
            with self.cond:
                self.errors.append((index, e))
        finally:
            with self.cond:
                self.reading -= 1
                self.cond.notify_all()

    def wake(self) -> None:
        """Descriptions are ready: let the frame lane emit them without waiting for a frame."""
        with self.cond:
            self.woken = True
            self.cond.notify_all()

    def __iter__(self) -> Iterator[Frame | None]:
        while True:
            with self.cond:
                while True:
                    while self.errors:
                        self.sources.fail(*self.errors.pop(0))
                    ready = [i for i, frame in enumerate(self.slots) if frame is not None]
                    if ready or self.woken or not self.reading:
                        break
                    self.cond.wait()
                woken, self.woken = self.woken, False
                if ready:
                    i = min(ready, key=self.arrival.__getitem__)
                    frame, self.slots[i] = self.slots[i], None
                    self.cond.notify_all()
                elif woken:
                    frame = None
                else:
                    return  # every reader has ended
            yield frame

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop handing frames over. A file's reader may be decoding a frame: wait for it (up to `timeout_s`),
        so the file can be closed safely after. A live source's reader may wait for its next frame for as
        long as the camera takes; closing the source ends that wait, so it is not waited for here."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        for thread, source in zip(self.threads, self.sources.sources, strict=True):
            if thread.is_alive() and not getattr(source, "live", False):
                thread.join(timeout=timeout_s)
