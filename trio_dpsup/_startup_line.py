"""The CLI's startup line: on a terminal, while ranks start, one line below the log updated
in place (``3/8 ranks ready after 42s; waiting for 2, 5, 6, 7``), erased once every rank is
ready or shutdown begins.

Only the CLI draws it, and only where stderr is a terminal and records are text: a library
embedding the supervisor owns its terminal, and a JSON log must stay one object per line.
Without a terminal, the supervisor's progress records (`--progress-log-interval`) say the
same in the log. How records and rank lines keep above the line: `_output.log_format.TerminalLine`.
"""

from __future__ import annotations

import trio

from ._config.enums import LogFormat
from ._output.log_format import TerminalLine
from ._ranks.prober import startup_progress
from ._supervisor import SupervisorHandle

__all__ = ["REDRAW_INTERVAL", "run_startup_line"]

#: How often the line is drawn again: its seconds count moves, and ranks become ready.
REDRAW_INTERVAL = 0.5
#: How long erasing the line may take at the end (a terminal stopped with Ctrl-S blocks).
_ERASE_TIMEOUT = 1.0


async def run_startup_line(
    log_format: LogFormat, handle: SupervisorHandle, since: float, fd: int = 2
) -> None:
    """Draw the line on `fd` every REDRAW_INTERVAL, and at once at each change of state,
    until every rank has been ready or shutdown has begun, then erase it; `since` is when
    the start began (trio's clock). Where a record is logged, the line below it is computed
    afresh (`TerminalLine.refresh`): it never shows a count older than the record.
    Returns at once where `fd` is not a terminal, or records are JSON.

    The writes happen in a worker thread: a terminal that blocks never blocks the event
    loop. **Cancellation**: prompt; the line is erased, within _ERASE_TIMEOUT.
    """
    if log_format is not LogFormat.TEXT or not TerminalLine.usable(fd):
        return
    line = TerminalLine(fd)
    line.refresh = lambda: startup_progress(handle.status(), trio.current_time() - since)
    try:
        while True:
            status = handle.status()
            if status.started or status.stopping:
                return
            text = startup_progress(status, trio.current_time() - since)
            await trio.to_thread.run_sync(line.show, text, abandon_on_cancel=True)
            # Drawn again at once at a change of state, not up to REDRAW_INTERVAL later.
            with trio.move_on_after(REDRAW_INTERVAL):
                await handle.wait_changed()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(_ERASE_TIMEOUT):
            await trio.to_thread.run_sync(line.close, abandon_on_cancel=True)
