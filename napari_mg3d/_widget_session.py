"""The MG-3D panel's run session: the Predictor it reuses, the worker thread it runs on, cancelling. No Qt
widgets; torch and the model are imported only when a run starts."""

from __future__ import annotations

import threading
from collections.abc import Callable


class RunSession:
    """One job at a time off the GUI thread; a heat-map request made while a job runs waits (latest only)."""

    def __init__(self) -> None:
        self.predictor = None
        self._key: tuple[str, str] | None = None
        self.worker = None
        self.cancel_event = threading.Event()
        self._pending: tuple | None = None

    @property
    def busy(self) -> bool:
        return self.worker is not None

    def predictor_for(self, bundle: str, device: str):
        """The Predictor of ``bundle`` on ``device``, loaded once and kept while neither changes."""
        from .inference import Predictor

        if self.predictor is None or (bundle, device) != self._key:
            self.predictor = Predictor(bundle or None, device=device)
            self._key = (bundle, device)
        return self.predictor

    def start(self, job: Callable, on_result: Callable, on_error: Callable, on_finished: Callable) -> None:
        """Run ``job`` in a napari worker; errors go to ``on_error``, never into the Qt event loop."""
        from napari.qt.threading import create_worker

        # The session forgets the worker first; then the panel's bound method runs (Qt drops that connection
        # when the panel is deleted, so a run that ends after its window closed touches no deleted widget).
        self.worker = create_worker(job, _start_thread=False, _connect={
            "returned": on_result, "errored": on_error, "finished": [self._forget_worker, on_finished]})
        self.worker.start()

    def _forget_worker(self) -> None:
        self.worker = None

    def defer(self, request: tuple) -> None:
        self._pending = request

    def take_pending(self) -> tuple | None:
        pending, self._pending = self._pending, None
        return pending

    def cancel(self) -> None:
        self.cancel_event.set()

    def close(self) -> None:
        self.cancel_event.set()
        if self.worker is not None:
            self.worker.quit()
