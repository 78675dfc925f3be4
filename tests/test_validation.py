"""Bad payloads in-process: each gets its named error in words, and good payloads batched with them survive."""

from __future__ import annotations


import numpy as np
import pytest

from mmtriton.spec import ModelSpec
from mmtriton.media.preprocess import AudioPreprocessor, ImagePreprocessor
from mmtriton.media.samples import encode_audio, encode_image, synthetic_audio, synthetic_image
from mmtriton.contract import InputError
from tests.bad_inputs import bad_audio, bad_images


def _u8(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


def test_each_bad_image_gets_its_error(image_pre: ImagePreprocessor, spec: ModelSpec) -> None:
    for name, (payload, expected) in bad_images(spec).items():
        (result,) = image_pre([_u8(payload)])
        assert isinstance(result, InputError), f"{name}: accepted"
        assert result.input_name == "image"
        assert expected in str(result), f"{name}: {result}"


def test_each_bad_audio_gets_its_error(audio_pre: AudioPreprocessor, spec: ModelSpec) -> None:
    for name, (payload, expected) in bad_audio(spec).items():
        (result,) = audio_pre([_u8(payload)])
        assert isinstance(result, InputError), f"{name}: accepted"
        assert result.input_name == "audio"
        assert expected in str(result), f"{name}: {result}"


def test_bad_image_in_a_batch_leaves_the_good_ones_intact(image_pre: ImagePreprocessor, spec: ModelSpec) -> None:
    good = [encode_image(synthetic_image(100 + 13 * i, 80 + 7 * i, seed=i), "JPEG") for i in range(4)]
    alone = [image_pre([_u8(g)])[0][0] for g in good]
    truncated = bad_images(spec)["corrupt_png_data"][0]
    rebuilds = image_pre.runner.rebuilds
    mixed = image_pre([_u8(good[0]), _u8(truncated), _u8(good[1]), _u8(good[2]), _u8(good[3])])
    assert isinstance(mixed[1], InputError)
    # The corrupt PNG passes every header check, so DALI itself failed the batch and was rebuilt.
    assert image_pre.runner.rebuilds > rebuilds
    for got, want in zip([mixed[0], mixed[2], mixed[3], mixed[4]], alone):
        assert not isinstance(got, Exception)
        np.testing.assert_array_equal(got[0], want)
    # The rebuilt pipeline keeps working for the next full batch.
    again = image_pre([_u8(g) for g in good])
    for got, want in zip(again, alone):
        np.testing.assert_array_equal(got[0], want)


def test_bad_audio_in_a_batch_leaves_the_good_ones_intact(audio_pre: AudioPreprocessor, spec: ModelSpec) -> None:
    good = [encode_audio(synthetic_audio(16000, 0.5 + 0.3 * i, seed=i), 16000, "FLAC") for i in range(3)]
    alone = [audio_pre([_u8(g)])[0][0] for g in good]
    truncated = bad_audio(spec)["truncated_flac"][0]
    mixed = audio_pre([_u8(truncated), _u8(good[0]), _u8(good[1]), _u8(good[2])])
    assert isinstance(mixed[0], InputError)
    for got, want in zip(mixed[1:], alone):
        assert not isinstance(got, Exception)
        np.testing.assert_array_equal(got[0], want)


def test_more_payloads_than_the_pipeline_batch(image_pre: ImagePreprocessor) -> None:
    """Requests beyond the pipeline's batch size are processed in further DALI batches."""
    n = image_pre.runner.batch_size + 3
    payloads = [_u8(encode_image(synthetic_image(64 + i, 64, seed=i), "PNG")) for i in range(n)]
    results = image_pre(payloads)
    assert len(results) == n and not any(isinstance(r, Exception) for r in results)


def test_full_decode_catches_what_headers_do_not(spec: ModelSpec) -> None:
    """The gpu-trtllm profile's audio_check decodes FLAC/OGG once: a truncated FLAC fails there, not in DALI."""
    from mmtriton.media.validation import check_audio

    payload, _ = bad_audio(spec)["truncated_flac"]
    limits = {"max_bytes": spec.audio.max_bytes, "max_seconds": spec.audio.max_seconds}
    assert check_audio(payload, **limits).format == "FLAC"  # the header alone looks fine
    with pytest.raises(InputError, match=r"input 'audio': could not decode the FLAC data \(corrupt or truncated\)"):
        check_audio(payload, **limits, full_decode=True)
    good = encode_audio(synthetic_audio(16000, 0.5), 16000, "FLAC")
    assert check_audio(good, **limits, full_decode=True).frames == 8000


def test_no_message_shows_a_python_object(
    image_pre: ImagePreprocessor, audio_pre: AudioPreprocessor, spec: ModelSpec
) -> None:
    """Every bad case's message is words for a client: no object repr, no memory address."""
    from mmtriton.media.validation import check_audio

    messages = {f"image/{name}": str(image_pre([_u8(p)])[0]) for name, (p, _) in bad_images(spec).items()}
    messages |= {f"audio/{name}": str(audio_pre([_u8(p)])[0]) for name, (p, _) in bad_audio(spec).items()}
    limits = {"max_bytes": spec.audio.max_bytes, "max_seconds": spec.audio.max_seconds}
    for name, (payload, _) in bad_audio(spec).items():
        with pytest.raises(InputError) as err:
            check_audio(payload, **limits, full_decode=True)
        messages[f"audio-full-decode/{name}"] = str(err.value)
    assert len(messages) == 2 * len(bad_audio(spec)) + len(bad_images(spec))
    for name, message in messages.items():
        assert message.startswith(("input 'image': ", "input 'audio': ")), f"{name}: {message}"
        for fragment in (" at 0x", "<_io", "object at", "BytesIO"):
            assert fragment not in message, f"{name}: {message}"


def test_png_signature_then_garbage_is_a_corrupt_header(spec: ModelSpec) -> None:
    """Not "truncated": what is broken is the header right after the signature, even when IEND follows."""
    from mmtriton.media.validation import check_image

    png = encode_image(synthetic_image(40, 30), "PNG")
    limits = {"max_bytes": spec.vision.max_bytes, "max_pixels": spec.vision.max_pixels}
    assert check_image(png, **limits).width == 40
    for payload in (png[:8] + b"\x00" * 64, png[:8] + b"junk" * 20 + png[-12:], png[:16]):
        with pytest.raises(InputError) as err:
            check_image(payload, **limits)
        assert str(err.value) == "input 'image': corrupt PNG header: the IHDR chunk is missing or damaged"


def test_library_reason_drops_object_reprs() -> None:
    from mmtriton.media.validation import library_reason

    raw = RuntimeError(
        "Error opening <_io.BytesIO object at 0x7fe9a1b2c3d0>: Error in WAV file. No 'data' chunk marker."
    )
    assert library_reason(raw) == "Error in WAV file. No 'data' chunk marker."
    assert library_reason(OSError("cannot identify image file <_io.BytesIO object at 0x7f0000000000>")) == ""
    assert library_reason(RuntimeError("Error : flac decoder lost sync.")) == "flac decoder lost sync."


def test_the_resize_bound_lets_long_strips_within_it_through(image_pre: ImagePreprocessor, spec: ModelSpec) -> None:
    """The aspect-ratio refusal is the resize's pixel count, not a fixed ratio: a strip whose resized
    image fits the limit decodes (and equals PIL's own crop of it), one just over it is refused."""
    from mmtriton.media.validation import resized_size
    from tests.bad_inputs import strip_png

    size, limit = spec.vision.image_size, spec.vision.max_pixels
    longest_ok = limit // (size * size)  # resized pixels = size * round(long * size / short)
    ok, over = strip_png(longest_ok, 1), strip_png(longest_ok + 2, 1)
    (result,) = image_pre([_u8(ok)])
    assert not isinstance(result, Exception), result
    assert result[0].shape == (3, size, size)
    rw, rh = resized_size(longest_ok + 2, 1, size)
    assert rw * rh > limit >= size * size * longest_ok
    (refused,) = image_pre([_u8(over)])
    assert isinstance(refused, InputError)
    assert f"over the limit of {limit} pixels" in str(refused)


@pytest.mark.parametrize("case", ["truncated_wav_refused_by_check", "truncated_flac_refused_by_dali", "corrupt_png_data_refused_by_dali"])
def test_a_refused_payload_is_freed_without_the_garbage_collector(
    image_pre: ImagePreprocessor, audio_pre: AudioPreprocessor, spec: ModelSpec, case: str
) -> None:
    """Nothing of a refused request outlives it: with the cyclic collector off, the payload array is
    freed as soon as the caller drops it and the error (a stored exception's traceback kept every
    frame's locals, the payload among them, in a cycle with the results list)."""
    import gc
    import weakref

    class Payload(np.ndarray):
        """A subclass only so that the array can be weakly referenced."""

    name = case.split("_refused")[0]
    payload = (bad_audio(spec) | bad_images(spec))[name][0]
    pre = image_pre if name.startswith("corrupt_png") else audio_pre
    good = encode_image(synthetic_image(48, 40), "PNG") if pre is image_pre else encode_audio(synthetic_audio(16000, 0.3), 16000)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        arrays = [np.frombuffer(payload, dtype=np.uint8).copy().view(Payload), _u8(good).copy().view(Payload)]
        refs = [weakref.ref(a) for a in arrays]
        results = pre(arrays)
        assert isinstance(results[0], InputError) and not isinstance(results[1], Exception)
        del arrays, results
        assert [r() is None for r in refs] == [True, True]
    finally:
        if was_enabled:
            gc.enable()
