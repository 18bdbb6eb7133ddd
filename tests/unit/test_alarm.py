"""The alarm that starts tasks claimed ahead: never before its time, moved by a later `set`,
silent once closed; a timerfd on Linux, asyncio's call_at where there is none."""

import asyncio
import time

import pytest

from functions import alarm
from functions.alarm import Alarm


@pytest.fixture(params=["timerfd", "call_at"])
def kind_of_alarm(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "call_at":
        monkeypatch.setattr(alarm, "_LIBC", None)
    elif alarm._LIBC is None:
        pytest.skip("no timerfd here (not Linux)")
    return str(request.param)


async def test_it_rings_at_its_time_never_before(kind_of_alarm: str) -> None:
    loop = asyncio.get_running_loop()
    rang: list[float] = []
    ring = Alarm(loop, lambda: rang.append(time.monotonic()))
    assert (ring._fd >= 0) == (kind_of_alarm == "timerfd")
    late: list[float] = []
    for delay_s in (0.0005, 0.003, 0.011, 0.0):
        at = time.monotonic() + delay_s
        ring.set(at)
        while len(rang) == len(late):
            await asyncio.sleep(0)
        late.append(rang[-1] - at)
    ring.close()
    assert all(s >= 0 for s in late), late


async def test_a_later_set_moves_it_and_close_silences_it(kind_of_alarm: str) -> None:
    loop = asyncio.get_running_loop()
    rang: list[float] = []
    ring = Alarm(loop, lambda: rang.append(time.monotonic()))
    ring.set(time.monotonic() + 0.01)
    moved_to = time.monotonic() + 0.05
    ring.set(moved_to)
    await asyncio.sleep(0.03)
    assert rang == []
    await asyncio.sleep(0.05)
    assert len(rang) == 1 and rang[0] >= moved_to
    ring.set(time.monotonic() + 0.01)
    ring.close()
    await asyncio.sleep(0.05)
    assert len(rang) == 1
