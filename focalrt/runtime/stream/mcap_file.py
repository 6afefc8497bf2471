"""An MCAP output file that stays readable by the standard `mcap` reader when the writer is killed.

An MCAP file is only complete once its writer closes it: the footer at the end says where the summary is,
and the standard (seeking) reader starts there. A writer killed before that leaves no footer, and a writer
that buffers a whole chunk in memory leaves nothing at all.

foxglove-sdk's writer accepts a file-like object, so focalrt hands it this one. Each time the writer is
flushed (every chunk is closed and flushed at least once a second, see FoxgloveSink), the chunk is written
with a provisional end behind it, in one system call: DataEnd, a Footer with no summary, and the magic. That is a
whole MCAP file; the standard reader finds no summary and reads the records in order. The next chunk
overwrites the provisional end, and the writer's own close replaces it with the full summary.

So a SIGKILL loses at most the messages of the last interval. (A kill that lands inside that one write call
may cut it short, between pages: then the standard reader refuses the file, and the `mcap` library's
NonSeekingReader, or the `mcap recover` command, reads every whole chunk before it.)
A failed write (full disk) is cut back to the last whole chunk and given the provisional end
again by `restore`.
"""

from __future__ import annotations

import os
from pathlib import Path

from mcap.data_stream import RecordBuilder
from mcap.records import DataEnd, Footer
from mcap.writer import MCAP0_MAGIC


def provisional_end() -> bytes:
    """DataEnd + Footer (no summary, no CRCs) + magic: the bytes that make the data before them a whole file."""
    builder = RecordBuilder()
    DataEnd(data_section_crc=0).write(builder)
    Footer(summary_start=0, summary_offset_start=0, summary_crc=0).write(builder)
    builder.write(MCAP0_MAGIC)
    return builder.end()


class McapFile:
    """The file-like object foxglove's MCAP writer writes to (write, seek, tell, flush). Writes are held in
    memory until the writer flushes (it holds a whole chunk in memory anyway); `flush` then writes them and
    the provisional end behind them in one system call, so the file's old end is replaced by a new whole file
    at once. `good_end` is where the data of the last successful flush ends."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self._end = provisional_end()
        self._pending = bytearray()  # written by the writer since the last flush, to go at good_end
        self._pos = 0  # the writer's position
        self.good_end = 0  # bytes of whole records on disk, followed by the provisional end
        self.error: OSError | None = None  # the last failed write, for the message (the writer drops errno)
        self.finishing = False  # set before the writer's own close: its footer needs no provisional end

    def write(self, data: bytes) -> int:
        start = self._pos - self.good_end
        if start < 0:  # the writer went back into data already on disk (not seen with foxglove-sdk 0.30)
            self._pwrite(bytes(data), self._pos)
        else:
            if start > len(self._pending):
                self._pending.extend(bytes(start - len(self._pending)))
            self._pending[start:start + len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            self._pos = offset
        elif whence == os.SEEK_CUR:
            self._pos += offset
        else:
            self._pos = self.good_end + len(self._pending) + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        """The writer has just finished a chunk (or the file): the pending bytes are whole records. Write them
        with the provisional end behind them, in one call."""
        if not self._pending and self.good_end:
            return
        data = bytes(self._pending) if self.finishing else bytes(self._pending) + self._end
        self._pwrite(data, self.good_end)
        self.good_end += len(self._pending)
        self._pending.clear()

    def _pwrite(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        try:
            while view:  # a write may be short (a signal, a nearly full disk); the rest follows
                done = os.pwrite(self._fd, view, offset)
                view, offset = view[done:], offset + done
        except OSError as e:
            self.error = e
            raise

    def reason(self, writer_error: BaseException) -> str:
        """Why writing failed, in the OS's words when a write of ours failed (the writer's error only says
        "I/O error"), else the writer's own message."""
        if self.error is not None:
            return self.error.strerror or str(self.error)
        text = str(writer_error)
        return text.split("MCAP error: ", 1)[-1]

    def restore(self) -> None:
        """After a failed write: cut the file back to its last whole chunk and give it the provisional end
        again (best effort: if even that cannot be written, the NonSeekingReader still reads the chunks)."""
        self._pending.clear()
        try:
            os.ftruncate(self._fd, self.good_end)
            if self.good_end:
                os.pwrite(self._fd, self._end, self.good_end)
        except OSError:
            pass

    def close(self, complete: bool = True) -> None:
        """Close; a completed file gets what the writer wrote last and ends at its own footer. Raises OSError
        (and stays open for `restore`) if that last write fails."""
        if self._fd < 0:
            return
        if complete:
            self.finishing = True
            self.flush()
            os.ftruncate(self._fd, self.good_end)
        os.close(self._fd)
        self._fd = -1

    @property
    def closed(self) -> bool:
        return self._fd < 0
