"""Stand-in Triton gRPC workers for the front door's balancing test (``tests/test_k8s.py``).

Each :class:`CountingWorker` is a real gRPC server speaking Triton's
``GRPCInferenceService.ModelStreamInfer``: it answers every streamed request
with Triton's empty final response and counts the requests it got. Several of
them listen on the same port of different loopback addresses (127.0.0.1,
127.0.0.2, ...), which is what a headless Service's DNS answer gives a client:
one port, one address per ready pod.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

LOGGER = logging.getLogger(__name__)


class _Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def ModelStreamInfer(  # noqa: N802 - the gRPC method's name
        self, request_iterator: Iterator[service_pb2.ModelInferRequest], context: grpc.ServicerContext
    ) -> Iterator[service_pb2.ModelStreamInferResponse]:
        for request in request_iterator:
            with self._lock:
                self.count += 1
            response = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
            response.parameters["triton_final_response"].bool_param = True
            yield service_pb2.ModelStreamInferResponse(infer_response=response)


class CountingWorker:
    """A gRPC server on ``address:port`` that counts streamed inference requests.

    Args:
        address: Loopback address to listen on.
        port: Port to listen on.
    """

    def __init__(self, address: str, port: int) -> None:
        self.address = address
        self.port = port
        self._servicer = _Servicer()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self._servicer, self._server)
        bound = self._server.add_insecure_port(f"{address}:{port}")
        if bound != port:
            raise OSError(f"cannot listen on {address}:{port}")
        self._server.start()
        LOGGER.info("counting worker on %s:%d", address, port)

    @property
    def count(self) -> int:
        """Requests received so far."""
        return self._servicer.count

    def stop(self) -> None:
        """Stop the server (bounded: 2 s grace)."""
        self._server.stop(grace=2).wait(timeout=5)


def start_workers(addresses: list[str], attempts: int = 20) -> list[CountingWorker]:
    """One :class:`CountingWorker` per address, all on one free port.

    Raises:
        OSError: No port was free on every address after ``attempts`` tries.
    """
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((addresses[0], 0))
            port = probe.getsockname()[1]
        started: list[CountingWorker] = []
        try:
            for address in addresses:
                started.append(CountingWorker(address, port))
            return started
        except (OSError, RuntimeError):
            for worker in started:
                worker.stop()
    raise OSError(f"no common free port on {addresses}")
