"""Against the real tritonserver: raw bytes over gRPC through the embedding ensembles."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from mmtriton.spec import ModelSpec
from clients.embed import embed
from clients.errors import InvalidInputError
from mmtriton.encoders.batching import encode_audio as run_audio_encoder
from mmtriton.encoders.batching import encode_images
from mmtriton.encoders.onnx_runtime import OnnxEncoder
from mmtriton.media.preprocess import AudioPreprocessor, ImagePreprocessor
from mmtriton.media.samples import encode_audio, encode_image, synthetic_audio, synthetic_image
from mmtriton.serving.server import ServerError, TritonServer
from tests.helpers.servers import make_server
from tests.bad_inputs import bad_audio, bad_images
from tests.conftest import ROOT


class InProcess:
    """The same pipeline definitions and ONNX files, run without a server."""

    def __init__(self, repo: Path, image_pre: ImagePreprocessor, audio_pre: AudioPreprocessor) -> None:
        self.image_pre = image_pre
        self.audio_pre = audio_pre
        self.vision = OnnxEncoder(repo / "vision_encoder" / "1" / "model.onnx")
        self.audio = OnnxEncoder(repo / "audio_encoder" / "1" / "model.onnx")

    def image(self, data: bytes) -> np.ndarray:
        ((pixels,),) = self.image_pre([np.frombuffer(data, np.uint8)])
        return encode_images(self.vision, [pixels])[0]

    def audio_clip(self, data: bytes) -> np.ndarray:
        ((frames, length),) = self.audio_pre([np.frombuffer(data, np.uint8)])
        return run_audio_encoder(self.audio, [frames], [int(length[0])])[0]


@pytest.fixture(scope="module")
def local(cpu_repo: Path, image_pre: ImagePreprocessor, audio_pre: AudioPreprocessor) -> InProcess:
    return InProcess(cpu_repo, image_pre, audio_pre)


# FP16 outputs of the same ONNX graph; batch composition can change the float summation order.
ATOL = 2e-3


@pytest.mark.parametrize(
    ("image_fmt", "audio_fmt", "audio_rate"),
    [("JPEG", "WAV", 16000), ("PNG", "FLAC", 44100), ("WEBP", "WAV", 48000)],
)
def test_ensemble_matches_in_process(
    grpc_url: str, local: InProcess, spec: ModelSpec, image_fmt: str, audio_fmt: str, audio_rate: int
) -> None:
    image = encode_image(synthetic_image(320, 240, seed=3), image_fmt)
    audio = encode_audio(synthetic_audio(audio_rate, 2.5, 2, seed=4), audio_rate, audio_fmt)
    result = embed(grpc_url, image=image, audio=audio)
    img, aud = result["image_embeddings"], result["audio_embeddings"]
    assert img.dtype == np.float16 and img.shape == (spec.vision.tokens_per_image, 64)
    assert aud.dtype == np.float16 and aud.shape == (spec.audio.tokens(spec.audio.frames(40000)), 64)
    np.testing.assert_allclose(img.astype(np.float32), local.image(image).astype(np.float32), atol=ATOL, rtol=0)
    np.testing.assert_allclose(aud.astype(np.float32), local.audio_clip(audio).astype(np.float32), atol=ATOL, rtol=0)


def test_single_modality_ensembles(grpc_url: str, local: InProcess) -> None:
    image = encode_image(synthetic_image(200, 300, seed=5), "PNG", "RGBA")
    audio = encode_audio(synthetic_audio(16000, 1.0, seed=6), 16000, "FLAC")
    np.testing.assert_allclose(
        embed(grpc_url, image=image)["image_embeddings"].astype(np.float32), local.image(image).astype(np.float32), atol=ATOL
    )
    np.testing.assert_allclose(
        embed(grpc_url, audio=audio)["audio_embeddings"].astype(np.float32),
        local.audio_clip(audio).astype(np.float32),
        atol=ATOL,
    )


def test_bad_images_get_invalid_argument_naming_the_input(grpc_url: str, spec: ModelSpec) -> None:
    for name, (payload, expected) in bad_images(spec).items():
        with pytest.raises(InvalidInputError) as err:
            embed(grpc_url, image=payload)
        assert expected in str(err.value), f"{name}: {err.value}"


def test_bad_audio_gets_invalid_argument_naming_the_input(grpc_url: str, spec: ModelSpec) -> None:
    for name, (payload, expected) in bad_audio(spec).items():
        with pytest.raises(InvalidInputError) as err:
            embed(grpc_url, audio=payload)
        assert expected in str(err.value), f"{name}: {err.value}"


def test_bad_request_among_concurrent_good_ones(grpc_url: str, local: InProcess, spec: ModelSpec, server: TritonServer) -> None:
    goods = [encode_image(synthetic_image(150 + 20 * i, 120, seed=10 + i), "JPEG") for i in range(7)]
    bad = bad_images(spec)["corrupt_png_data"][0]
    payloads = goods[:3] + [bad] + goods[3:]

    def call(data: bytes) -> np.ndarray | Exception:
        try:
            return embed(grpc_url, image=data)["image_embeddings"]
        except InvalidInputError as err:
            return err

    with ThreadPoolExecutor(max_workers=len(payloads)) as pool:
        results = list(pool.map(call, payloads))
    assert isinstance(results[3], InvalidInputError)
    assert "could not decode the PNG data" in str(results[3])
    for got, data in zip(results[:3] + results[4:], goods):
        assert isinstance(got, np.ndarray), got
        np.testing.assert_allclose(got.astype(np.float32), local.image(data).astype(np.float32), atol=ATOL)
    # The server is still up and serving.
    with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=5) as resp:
        assert resp.status == 200
    assert embed(grpc_url, image=goods[0])["image_embeddings"].shape[0] == spec.vision.tokens_per_image


def test_cli_one_liner(grpc_url: str, tmp_path: Path) -> None:
    """The README's client call: python -m clients.embed --image ... --audio ..."""
    from mmtriton.media.samples import write_samples

    image, audio = write_samples(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "clients.embed", "--url", grpc_url, "--image", str(image), "--audio", str(audio)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "image_embeddings: shape [64, 64] float16" in out.stdout
    assert "audio_embeddings: shape [" in out.stdout


def test_launcher_reports_a_broken_repository(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "config.pbtxt").write_text('name: "broken"\nbackend: "no_such_backend"\nmax_batch_size: 0\n')
    server = make_server(repo, tmp_path / "work", ready_timeout_s=60)
    with pytest.raises(ServerError) as err:
        server.start()
    assert "no_such_backend" in str(err.value)
    assert server.process is None


def test_gpu_trtllm_profile_input_checks_on_the_real_server(bundle_dir: Path, tmp_path: Path, spec: ModelSpec) -> None:
    """image_check / audio_check (python models of the gpu-trtllm profile) run on the CPU server by themselves."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from build_engines.render import render_repository

    repo = render_repository(bundle_dir, tmp_path / "repo-gpu", "gpu-trtllm", engines_dir=tmp_path / "engines")
    server = make_server(
        repo, tmp_path / "server", extra_args=["--model-control-mode=explicit", "--load-model=image_check", "--load-model=audio_check"]
    )
    cases = [
        ("image_check", "image", bad_images(spec)["truncated_jpeg"]),
        ("audio_check", "audio", bad_audio(spec)["truncated_flac"]),
    ]
    good = {
        "image_check": encode_image(synthetic_image(64, 48), "JPEG"),
        "audio_check": encode_audio(synthetic_audio(16000, 0.5), 16000, "FLAC"),
    }
    with server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        for model, name, (payload, expected) in cases:
            tensor = grpcclient.InferInput(name, [1, len(payload)], "UINT8")
            tensor.set_data_from_numpy(np.frombuffer(payload, np.uint8).reshape(1, -1))
            with pytest.raises(InferenceServerException) as err:
                client.infer(model, [tensor])
            assert "INVALID_ARGUMENT" in str(err.value.status()) and expected.split(": ", 1)[-1] in str(err.value)
            data = good[model]
            tensor = grpcclient.InferInput(name, [1, len(data)], "UINT8")
            tensor.set_data_from_numpy(np.frombuffer(data, np.uint8).reshape(1, -1))
            assert client.infer(model, [tensor]).as_numpy("checked").tobytes() == data
        client.close()
