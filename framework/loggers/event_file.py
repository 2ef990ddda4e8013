"""A TensorBoard event file written on the calling thread, for the records Kiln itself logs.

torch's ``SummaryWriter`` hands every event to a background thread. Waking that thread on each logging
step cost the tiny-MLP overhead benchmark about 8 % per step on a 2-core machine (the GIL changes hands
twice per event), so ``TensorBoardLogger`` writes its scalars and hyperparameter records through this
writer and creates a ``SummaryWriter`` only when user code asks for ``logger.experiment``. TensorBoard
reads every ``*tfevents*`` file of a run directory, so the two files show as one run.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from typing import Any

_FILE_NUMBER = itertools.count()


class EventFile:
    """Appends TensorBoard events to a new file in ``log_dir``; flushed every ``flush_secs`` and on ``flush``."""

    def __init__(self, log_dir: str, flush_secs: float = 120.0, filename_suffix: str = "",
                 purge_step: int | None = None) -> None:
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        os.makedirs(log_dir, exist_ok=True)
        name = (f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}."
                f"{next(_FILE_NUMBER)}{filename_suffix}")
        self.path = os.path.join(log_dir, name)
        self._file = open(self.path, "ab")  # noqa: SIM115 - closed by close()
        self._records = RecordWriter(self._file)
        self._event = event_pb2.Event
        self._flush_secs = float(flush_secs)
        self._next_flush = 0.0
        if purge_step is None:
            self._write(file_version="brain.Event:2")
        else:  # as SummaryWriter(purge_step=): TensorBoard drops the older run's events from this step on
            from tensorboard.compat.proto.event_pb2 import SessionLog

            self._write(file_version="brain.Event:2", step=int(purge_step))
            self._write(session_log=SessionLog(status=SessionLog.START), step=int(purge_step))
        self.flush()

    def add_summary(self, summary: Any, step: int | None = None) -> None:
        """Write one ``Summary`` protobuf (scalars, hparams records) at ``step``."""
        if step is None:
            self._write(summary=summary)
        else:
            self._write(summary=summary, step=int(step))

    def _write(self, **fields: Any) -> None:
        self._records.write(self._event(wall_time=time.time(), **fields).SerializeToString())
        if time.monotonic() >= self._next_flush:
            self.flush()

    def flush(self) -> None:
        self._file.flush()
        self._next_flush = time.monotonic() + self._flush_secs

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()
