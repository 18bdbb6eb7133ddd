"""The bench's kind for start lateness: its line is the time it started, by the clock of the
machine it runs on. On the bench's one machine that is the database's clock too, so the
bench reads how late each task's code really started, beside the `started_at` its claim
recorded (queries.CLAIM_DUE says what that is). Loaded with TASKRUNNER_KINDS."""

from __future__ import annotations

import time

from functions.kinds import Context, kind


@kind("clocked")
def clocked(ctx: Context) -> str:
    return repr(time.time())
