"""Turning a client that went away into a stopped generation.

Why this exists (Triton 2.51, core ``r24.10``): when a gRPC stream is cancelled or
an HTTP connection closes, Triton cancels the *ensemble* request, and the ensemble
scheduler marks every step it schedules from then on as cancelled. A step that was
already running when the client left (the decoupled ``tensorrt_llm`` step, which
streams for the whole answer) is never told. The first place that learns of the
cancellation is therefore the next ``postprocessing`` step: its request arrives with
``is_cancelled()`` true. :class:`StopForwarder` takes those request ids and, once
per id and off the model's execute thread, sends ``tensorrt_llm`` the TensorRT-LLM
contract's own ``stop`` request for that id, which ends the generation and frees
its slot within an engine step or two.

A cancelled step must still *succeed*: in that Triton version a failed step while
another step of the same request is in flight (here: ``tensorrt_llm``) leaves the
ensemble request in flight forever (``EnsembleContext::PrepareSteps`` stops counting
the other step's completion once the ensemble status is an error). For the same
reason ``postprocessing`` has no dynamic batcher: the batcher rejects cancelled
requests with an error, the default scheduler hands them to the model.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable

LOGGER = logging.getLogger(__name__)


class StopForwarder:
    """Sends one stop per cancelled request id, on a background thread.

    Args:
        send_stop: Called with a request id; must end that request's generation.
        capacity: How many recently stopped ids are remembered (so the many
            cancelled chunks of one answer cause a single stop).
    """

    def __init__(self, send_stop: Callable[[str], None], capacity: int = 4096) -> None:
        self._send_stop = send_stop
        self._capacity = capacity
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="stop-forwarder", daemon=True)
        self._thread.start()
        self.sent = 0

    def cancelled(self, request_id: str) -> bool:
        """Record that ``request_id``'s client is gone.

        Returns:
            True when this call queued a stop (the first time the id is seen).
        """
        if not request_id:
            return False
        with self._lock:
            if request_id in self._seen:
                self._seen.move_to_end(request_id)
                return False
            self._seen[request_id] = None
            while len(self._seen) > self._capacity:
                self._seen.popitem(last=False)
        self._queue.put(request_id)
        return True

    def _run(self) -> None:
        while True:
            request_id = self._queue.get()
            if request_id is None:
                return
            try:
                self._send_stop(request_id)
                self.sent += 1
            except Exception:  # noqa: BLE001 - a failed stop must not end the thread
                LOGGER.exception("could not stop request %s", request_id)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the background thread after the queued stops are sent."""
        self._queue.put(None)
        self._thread.join(timeout)
