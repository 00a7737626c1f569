"""What the farm's driver and its tasks share: where the per-job files live, how an attempt's exit
is read (which exits are retried, what each means), and the JSON files themselves."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any, Dict, Optional

from tokenflow.config import Ranged, Rule
from tokenflow.errors import EXIT_CODES, ConfigError, Interrupted, InterruptedWithCheckpoint, LockedError, TokenFlowError
from tokenflow.io.outputs import atomic_file

REPORT_SCHEMA_VERSION = 1
FARM_DIR = "_farm"            # under the checkpoint root; job names cannot start with "_"
DEFAULT_GRACE_S = 120.0       # how long a retry waits for the previous attempt's child to save and exit
GRACE_ENV = "TOKENFLOW_FARM_GRACE"   # ... unless this says otherwise (seconds)
GRACE = Ranged(GRACE_ENV, float, Rule(minimum=0, maximum=86400, unit="seconds"))
# interrupted (with or without a checkpoint): the job is run again; death by a signal is retried too
RETRIED_EXIT_CODES = (InterruptedWithCheckpoint.exit_code, Interrupted.exit_code)
LOCKED_EXIT_CODE = LockedError.exit_code
FAILED_EXIT_CODE = TokenFlowError.exit_code   # a job that failed without an exit code of its own (internal error)


def grace_seconds() -> float:
    """``$TOKENFLOW_FARM_GRACE`` (seconds) or the default; a ConfigError naming it when it is no number
    in GRACE's range (nan, inf, a typo). The driver checks it before submitting; its workers inherit it."""
    raw = os.environ.get(GRACE_ENV, "").strip()
    if not raw:
        return DEFAULT_GRACE_S
    try:
        return GRACE(raw)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; unset it for the default ({DEFAULT_GRACE_S:g} s)") from None


def has_checkpoint(folder: Optional[str]) -> bool:
    return bool(folder) and any(Path(folder, name).is_file() for name in ("inversion.pt", "edit.pt"))


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def describe_exit(code: Optional[int]) -> str:
    if code is None:
        return "the child's exit status is unknown"
    if code < 0:
        return f"the job's process was killed by {signal_name(-code)}"
    return f"exit {code}: {EXIT_CODES.get(code, 'unknown exit code')}"


def read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json_atomic(path: str, data: Any) -> None:
    with atomic_file(path, durable=True, make_parents=True) as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")
