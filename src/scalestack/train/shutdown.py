"""``end_worker()``: how a torchrun worker ends once its work is done.

A worker that returns normally runs the interpreter's teardown with gloo's threads still alive: models under
``fully_shard`` are freed only there (their hooks tie them to their parameters), and with them the process
groups they hold. That teardown has aborted a worker after a complete run (SIGABRT, "terminate called without
an active exception"; seen in about one CI run in three, never in isolation), which torchrun reports as a
failed job. So a finished worker waits for its checkpoint writes, meets the other ranks at a barrier (no
collective of theirs still needs it), flushes its output and leaves without the teardown.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

import torch.distributed as dist


def end_worker(code: int = 0) -> NoReturn:
    """Exit this process with ``code`` once every rank is done: call it last, on every rank."""
    from ..checkpoint.save import wait_pending

    wait_pending()
    if dist.is_initialized():
        dist.barrier()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
