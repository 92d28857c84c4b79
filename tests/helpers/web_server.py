"""A web app (the web worklist) served by uvicorn in a thread of the test process."""

from __future__ import annotations

import threading
from typing import Any

from tests.helpers.ports import free_port, wait_for_port


class Served:
    """A uvicorn server in a thread (the web worklist), stopped by ``stop``."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for_port(self.port)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
