"""Serve the gpu-trtllm repository with TensorRT-LLM engines over several GPUs (leader mode).

One ``tritonserver`` process per GPU, started by one ``mpirun`` (MPMD: one app
context per rank, separated by ``:``). Rank 0 serves every model and leads the
TensorRT-LLM ranks; rank 1.. load only ``tensorrt_llm`` and never finish
starting (their model instance never returns from initialization), so only
rank 0 answers on the HTTP/gRPC/metrics ports. Facts from TensorRT-LLM's
``triton_backend/scripts/launch_triton_server.py`` and the tensorrtllm_backend
README "Leader Mode":

- every rank: ``--disable-auto-complete-config`` and its own python-backend shared
  memory prefix ``--backend-config=python,shm-region-prefix-name=prefix<rank>_``;
- rank >= 1: ``--model-control-mode=explicit --load-model=tensorrt_llm``;
- rank 0: ``--cuda-memory-pool-byte-size=0:<bytes>``, the pool Triton uses to pass
  GPU tensors between models (DALI output, encoder embeddings, prompt tables);
- ``mpirun --allow-run-as-root`` (containers run as root);
- ``PMIX_MCA_gds=hash`` in the environment avoids an MPI start-up hang
  (tensorrtllm_backend docs/multimodal.md: errors around ``MPI_Init_thread``).

The world size is read from the engine the repository's ``tensorrt_llm`` model
points at (``gpt_model_path``), and a mismatch with the GPUs given (``--gpus``
or ``CUDA_VISIBLE_DEVICES``) is an error before anything starts. The launcher
waits for ``/v2/health/ready`` while watching ``mpirun``, shows the log and exits
non-zero if a rank dies, and stops the job by its own pid.

    python -m mmtriton.tp_launcher --model-repository build/repo-gpu-trtllm-tiny-mm --gpus 0,1
    python -m mmtriton.tp_launcher --model-repository build/repo-gpu-trtllm-tiny-mm --gpus 0,1 --print-command
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mmtriton.contract import LLM_MODEL
from mmtriton.serving.engine_folder import EngineConfigError, EngineMapping, read_engine_mapping
from mmtriton.serving.server import ServerError, TritonServer, serve_until_stopped

LOGGER = logging.getLogger(__name__)

#: The model every rank loads; the other models live on rank 0 only.
#: Default of launch_triton_server.py --tritonserver.
TRITONSERVER = "/opt/tritonserver/bin/tritonserver"
#: tensorrtllm_backend docs/multimodal.md launches multimodal ensembles with
#: --multimodal_gpu0_cuda_mem_pool_bytes 300000000.
DEFAULT_CUDA_POOL_BYTES = 300_000_000
MPI_ENV = {"PMIX_MCA_gds": "hash"}


class LaunchError(RuntimeError):
    """The launch cannot start: GPUs and engine disagree, or the engine cannot be found."""


def rank_args(
    rank: int,
    *,
    tritonserver: str,
    model_repository: Path,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    cuda_memory_pool_bytes: int,
    exit_timeout_s: int,
    extra_args: list[str] | None = None,
) -> list[str]:
    """The ``tritonserver`` command line of one rank."""
    args = [
        tritonserver,
        f"--model-repository={model_repository}",
        f"--http-port={http_port}",
        f"--grpc-port={grpc_port}",
        f"--metrics-port={metrics_port}",
        # Every config is rendered in full; auto-complete must not fill gaps per rank.
        "--disable-auto-complete-config",
        # Each rank's python-backend stubs need their own shared-memory regions.
        f"--backend-config=python,shm-region-prefix-name=prefix{rank}_",
        f"--exit-timeout-secs={exit_timeout_s}",
    ]
    if rank == 0:
        args.append(f"--cuda-memory-pool-byte-size=0:{cuda_memory_pool_bytes}")
        args.extend(extra_args or [])
    else:
        args += ["--model-control-mode=explicit", f"--load-model={LLM_MODEL}"]
    return args


def leader_mode_command(
    world_size: int,
    *,
    mpirun: str = "mpirun",
    tritonserver: str = TRITONSERVER,
    model_repository: Path,
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    cuda_memory_pool_bytes: int = DEFAULT_CUDA_POOL_BYTES,
    exit_timeout_s: int = 30,
    extra_args: list[str] | None = None,
) -> list[str]:
    """The ``mpirun`` command line that starts one ``tritonserver`` per rank.

    Args:
        world_size: Ranks (= GPUs) of the TensorRT-LLM engine.
        mpirun: The ``mpirun`` binary.
        tritonserver: The ``tritonserver`` binary.
        model_repository: Rendered gpu-trtllm repository.
        http_port, grpc_port, metrics_port: Ports rank 0 serves on (given to every
            rank like upstream; only rank 0 finishes starting and binds them).
        cuda_memory_pool_bytes: Rank 0's CUDA memory pool on GPU 0.
        exit_timeout_s: ``--exit-timeout-secs`` of every rank.
        extra_args: More rank-0 ``tritonserver`` arguments.

    Returns:
        The argv.
    """
    if world_size < 1:
        raise LaunchError(f"world size must be at least 1, got {world_size}")
    argv = [mpirun, "--allow-run-as-root"]
    for rank in range(world_size):
        if rank:
            argv.append(":")
        argv += [
            "-n",
            "1",
            *rank_args(
                rank,
                tritonserver=tritonserver,
                model_repository=model_repository,
                http_port=http_port,
                grpc_port=grpc_port,
                metrics_port=metrics_port,
                cuda_memory_pool_bytes=cuda_memory_pool_bytes,
                exit_timeout_s=exit_timeout_s,
                extra_args=extra_args,
            ),
        ]
    return argv


def given_gpus(gpus: str | None, env: Mapping[str, str] | None = None) -> list[str] | None:
    """GPU ids from ``--gpus`` or else ``CUDA_VISIBLE_DEVICES``; None when neither says."""
    environ: Mapping[str, str] = os.environ if env is None else env
    text = gpus if gpus is not None else environ.get("CUDA_VISIBLE_DEVICES")
    if text is None or not text.strip():
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


def engine_dir_of(model_repository: Path) -> Path:
    """The engine folder the repository's ``tensorrt_llm`` model loads (its ``gpt_model_path``).

    Raises:
        LaunchError: No ``tensorrt_llm/config.pbtxt`` or no ``gpt_model_path`` in it.
    """
    from mmtriton.serving.triton_config import ModelConfigError, parse_model_config

    config_path = model_repository / LLM_MODEL / "config.pbtxt"
    if not config_path.is_file():
        raise LaunchError(f"{config_path} not found: is {model_repository} a rendered gpu-trtllm repository?")
    try:
        config = parse_model_config(config_path.read_text(), str(config_path))
    except ModelConfigError as err:
        raise LaunchError(str(err)) from None
    if "gpt_model_path" not in config.parameters:
        raise LaunchError(f"{config_path}: no gpt_model_path parameter; pass --engine-dir")
    return Path(config.parameters["gpt_model_path"].string_value)


def check_world_size(mapping: EngineMapping, gpus: list[str] | None, engine_dir: Path) -> None:
    """Refuse to start when the GPUs given do not match the engine's world size.

    Raises:
        LaunchError: No GPUs were named, or their number differs from the world size.
    """
    shape = f"tp_size {mapping.tp_size} x pp_size {mapping.pp_size}" + (
        f" x cp_size {mapping.cp_size}" if mapping.cp_size > 1 else ""
    )
    if gpus is None:
        raise LaunchError(
            f"engine {engine_dir} needs {mapping.world_size} GPUs ({shape}); say which with "
            f"--gpus 0,1 or CUDA_VISIBLE_DEVICES"
        )
    if len(gpus) != mapping.world_size:
        raise LaunchError(
            f"engine {engine_dir} was built for world size {mapping.world_size} ({shape}) but "
            f"{len(gpus)} GPU(s) were given ({','.join(gpus)}): give {mapping.world_size} GPUs or rebuild "
            f"the engine with python -m build_engines.trtllm_build --tp-size {len(gpus)}"
        )


@dataclass
class LeaderModeServer(TritonServer):
    """``mpirun`` + one ``tritonserver`` per rank, managed like :class:`TritonServer`.

    Readiness polling, log tail and stop-by-own-pid come from :class:`TritonServer`;
    this class supplies the ``mpirun`` command line and the MPI environment.

    Attributes:
        world_size: Ranks of the engine (checked against ``gpus`` before start).
        gpus: GPU ids; exported as ``CUDA_VISIBLE_DEVICES`` to every rank.
        mpirun: The ``mpirun`` binary.
        tritonserver: The ``tritonserver`` binary.
        cuda_memory_pool_bytes: Rank 0's CUDA memory pool on GPU 0.
    """

    world_size: int = 2
    gpus: list[str] = field(default_factory=list)
    mpirun: str = "mpirun"
    tritonserver: str = TRITONSERVER
    cuda_memory_pool_bytes: int = DEFAULT_CUDA_POOL_BYTES

    def command(self) -> list[str]:
        """The full ``mpirun`` command line."""
        return leader_mode_command(
            self.world_size,
            mpirun=self.mpirun,
            tritonserver=self.tritonserver,
            model_repository=Path(self.model_repository).resolve(),
            http_port=self.http_port,
            grpc_port=self.grpc_port,
            metrics_port=self.metrics_port,
            cuda_memory_pool_bytes=self.cuda_memory_pool_bytes,
            exit_timeout_s=self.exit_timeout_s,
            extra_args=self.extra_args,
        )

    def launch_env(self) -> dict[str, str]:
        """Only what the job needs on top of the current environment."""
        env = dict(MPI_ENV)
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        return env

    def start(self) -> LeaderModeServer:
        """Start the job and block until rank 0 is ready.

        Raises:
            LaunchError: The GPUs given do not match ``world_size`` (nothing is started).
            ServerError: ``mpirun`` exited (a rank died) or rank 0 was not ready in time;
                the message ends with the log tail.
        """
        if len(self.gpus) != self.world_size:
            raise LaunchError(f"{len(self.gpus)} GPU(s) given for world size {self.world_size}")
        LOGGER.info("mpirun environment: %s", " ".join(f"{k}={v}" for k, v in self.launch_env().items()))
        super().start()
        return self

    def environment(self) -> dict[str, str]:
        """The current environment plus :meth:`launch_env` (MPI settings, visible GPUs)."""
        return {**os.environ, **self.launch_env()}


def main(argv: list[str] | None = None) -> int:
    """Run the launcher; returns the exit code (2: refused before starting, 1: the job failed)."""
    parser = argparse.ArgumentParser(prog="python -m mmtriton.tp_launcher", description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, required=True, help="rendered gpu-trtllm repository")
    parser.add_argument("--engine-dir", type=Path, default=None, help="default: gpt_model_path of tensorrt_llm")
    parser.add_argument("--gpus", default=None, help="GPU ids, e.g. 0,1 (default: CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--work-dir", type=Path, default=Path("build/server-gpu"), help="log folder")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--cuda-memory-pool-bytes", type=int, default=DEFAULT_CUDA_POOL_BYTES)
    parser.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for readiness")
    parser.add_argument("--exit-timeout", type=int, default=30, help="--exit-timeout-secs of every rank")
    parser.add_argument("--mpirun", default="mpirun")
    parser.add_argument("--tritonserver", default=TRITONSERVER)
    parser.add_argument("--print-command", action="store_true", help="print the command line and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        engine_dir = args.engine_dir or engine_dir_of(args.model_repository)
        mapping = read_engine_mapping(engine_dir)
        gpus = given_gpus(args.gpus)
        check_world_size(mapping, gpus, engine_dir)
    except (LaunchError, EngineConfigError) as err:
        LOGGER.error("not starting: %s", err)
        return 2
    assert gpus is not None
    server = LeaderModeServer(
        model_repository=args.model_repository,
        work_dir=args.work_dir,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        ready_timeout_s=args.ready_timeout,
        exit_timeout_s=args.exit_timeout,
        world_size=mapping.world_size,
        gpus=gpus,
        mpirun=args.mpirun,
        tritonserver=args.tritonserver,
        cuda_memory_pool_bytes=args.cuda_memory_pool_bytes,
    )
    if args.print_command:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in server.launch_env().items())
        print(f"env {env} {shlex.join(server.command())}")
        return 0
    try:
        server.start()
    except (ServerError, LaunchError, OSError) as err:
        LOGGER.error("%s", err)
        return 1
    LOGGER.info("serving %s on %d GPUs (log: %s)", args.model_repository, mapping.world_size, server.log_path)
    # mpirun exiting means a rank died: serve_until_stopped reports it with the log and returns 1.
    return serve_until_stopped(server, "mpirun (a rank died)", poll_s=1.0, tail_lines=200)


if __name__ == "__main__":
    sys.exit(main())
