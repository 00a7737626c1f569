"""A farm job's child process: ``python -c CHILD_CODE run JOB --resume ...``, that is
``tokenflow run`` with one job, after ``die_with_parent``.

The child is a separate program (the CLI), started by ``task.JobAttempts``; the code that starts
it is a string, not an import of ``tokenflow.app.cli`` from here.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

from tokenflow.errors import Interrupted

PARENT_ENV = "TOKENFLOW_FARM_PARENT"   # the pid of the Ray worker that started the child
CHILD_CODE = ("import sys; from tokenflow.app.farm.child import die_with_parent; die_with_parent(); "
              "from tokenflow.app.cli import main; sys.exit(main(sys.argv[1:]))")


def die_with_parent() -> None:
    """Die (SIGTERM: save a checkpoint, exit 75) when the Ray worker dies; exit 130 at once if it
    already has."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)   # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    parent = os.environ.pop(PARENT_ENV, None)
    if parent and parent.isdigit() and os.getppid() != int(parent):
        sys.exit(Interrupted.exit_code)   # the worker died while this process started: nothing was done
