"""Run by ``tests/test_streaming.py`` in a subprocess: prune a checkpoint folder with streaming and, after
block ``STOP_AFTER`` is written to the partial folder, stop and wait to be killed (the test sends SIGKILL).

Usage: ``python streaming_worker.py SOURCE OUTPUT STOP_AFTER``; the configuration and the calibration ids
are the test's (:func:`test_streaming.run_config`, :func:`conftest.calibration_ids`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from conftest import calibration_ids
from test_streaming import run_config

from optimum_maiht import MAIHTPruner
from optimum_maiht.streaming import StreamingStore


def main() -> None:
    source, output, stop_after = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    done = StreamingStore.done

    def done_then_wait(self, index, block, record):
        done(self, index, block, record)
        if index == stop_after:
            time.sleep(600)  # killed here, with blocks 0..stop_after in the partial folder

    StreamingStore.done = done_then_wait
    MAIHTPruner.prune_to_folder(source, output, run_config(), calibration_ids(), progress=False)


if __name__ == "__main__":
    main()
