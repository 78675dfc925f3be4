"""The serving contract, defined once: ensemble names and the tensors clients exchange.

The renderer (``build_engines/ensembles.py``), the clients (``clients/``), the probe,
the python models and the tests import these names, so a renamed ensemble or tensor
fails at import or render time instead of at the first request. The standard library
(and numpy, inside one helper): clients import this module and nothing else of the project.
"""

from __future__ import annotations

import re

# Ensembles, one per input combination (a Triton ensemble cannot skip a step).
EMBED_IMAGE = "embed_image"
EMBED_AUDIO = "embed_audio"
EMBED_IMAGE_AUDIO = "embed_image_audio"
CHAT_TEXT = "chat_text"
CHAT_IMAGE = "chat_image"
CHAT_AUDIO = "chat_audio"
CHAT_IMAGE_AUDIO = "chat_image_audio"

# Raw media inputs (encoded bytes, UINT8 [-1]) and the embeddings the embed ensembles return.
IMAGE = "image"
AUDIO = "audio"
IMAGE_EMBEDDINGS = "image_embeddings"
AUDIO_EMBEDDINGS = "audio_embeddings"

# Public inputs of every chat ensemble besides the media: the user-facing names of
# TensorRT-LLM's "ensemble" model.
TEXT_INPUT = "text_input"
#: The optional alternative to ``text_input``: a whole conversation as UTF-8 JSON
#: (``{"messages": [{"role": ..., "content": str | [parts]}], "enable_thinking": bool}``;
#: media parts are ``{"type": "image"}`` / ``{"type": "audio"}``), rendered once with the
#: tokenizer's chat template by the ``preprocessing`` model (``mmtriton.llm.prompting``).
CHAT_MESSAGES = "messages"
MAX_TOKENS = "max_tokens"
TEMPERATURE = "temperature"
TOP_K = "top_k"
TOP_P = "top_p"
SEED = "seed"
STREAM = "stream"
STOP_WORDS = "stop_words"
IGNORE_EOS = "ignore_eos"
CHAT_INPUTS = (TEXT_INPUT, CHAT_MESSAGES, MAX_TOKENS, TEMPERATURE, TOP_K, TOP_P, SEED, STREAM, STOP_WORDS, IGNORE_EOS)
# What every chat ensemble answers with.
TEXT_OUTPUT = "text_output"
OUTPUT_IDS = "output_ids"
NUM_INPUT_TOKENS = "num_input_tokens"
NUM_OUTPUT_TOKENS = "num_output_tokens"
CHAT_OUTPUTS = (TEXT_OUTPUT, OUTPUT_IDS, NUM_INPUT_TOKENS, NUM_OUTPUT_TOKENS)

# The LLM step (TensorRT-LLM 1.2.1's Triton contract) and the inputs of its ``stop``
# request, which cancels the running request with the same request id.
LLM_MODEL = "tensorrt_llm"


def stop_request_values() -> dict:
    """The inputs of a ``stop=true`` request to :data:`LLM_MODEL` (numpy arrays, batch dim 1).

    The model's required inputs are sent with placeholder values; ``stop`` makes the
    backend end the running request whose request id the stop request carries.
    """
    import numpy as np

    return {
        "input_ids": np.zeros((1, 1), dtype=np.int32),
        "input_lengths": np.ones((1, 1), dtype=np.int32),
        "request_output_len": np.ones((1, 1), dtype=np.int32),
        "stop": np.ones((1, 1), dtype=bool),
    }


def chat_ensemble(has_image: bool, has_audio: bool) -> str:
    """Name of the chat ensemble that takes exactly these media inputs."""
    return {
        (False, False): CHAT_TEXT,
        (True, False): CHAT_IMAGE,
        (False, True): CHAT_AUDIO,
        (True, True): CHAT_IMAGE_AUDIO,
    }[(bool(has_image), bool(has_audio))]


def embed_ensemble(has_image: bool, has_audio: bool) -> str:
    """Name of the embed ensemble for these media inputs.

    Raises:
        ValueError: Neither an image nor an audio clip.
    """
    if not (has_image or has_audio):
        raise ValueError("an embed request needs an image, an audio clip or both")
    return {(True, False): EMBED_IMAGE, (False, True): EMBED_AUDIO}.get((bool(has_image), bool(has_audio)), EMBED_IMAGE_AUDIO)


class InputError(ValueError):
    """A request input is unusable; the message is meant for the client.

    Its text always begins ``input '<name>': `` (see :func:`input_error_in`), which is how
    a client tells the client's fault from the server's when no status code comes with it.

    Attributes:
        input_name: The request input the error is about.
    """

    def __init__(self, input_name: str, message: str) -> None:
        super().__init__(f"input '{input_name}': {message}")
        self.input_name = input_name

    def detached(self) -> InputError:
        """This error without its traceback and chained exceptions, for keeping after the ``except``.

        A caught exception's traceback holds the frames it passed through, and with them
        every local of those frames: the payload being checked, and the list the error is
        then stored in. Kept as it is, the error and that list form a reference cycle that
        keeps a refused request's payload (and its Triton input buffers) alive until the
        cyclic garbage collector happens to run, which large byte arrays never trigger.
        """
        self.__traceback__ = None
        self.__context__ = None
        self.__cause__ = None
        return self


#: Where an :class:`InputError`'s text begins in a message: Triton may put the ensemble step
#: (``in ensemble 'chat_image', ``) or a request id (``[request id: 7] ``) in front of it.
_INPUT_ERROR_TEXT = re.compile(r"(?:^|(?<=[\s:\]]))input '([^']+)': ")


def input_error_in(message: str) -> tuple[str, str] | None:
    """The input an error message of this server blames, and the message from that point on.

    The one reader of :class:`InputError` text, for every client (the client library, the
    front door) that gets a message without a status code.

    Returns:
        ``(input name, "input '<name>': ...")``, or None when the message is not an input error.
    """
    match = _INPUT_ERROR_TEXT.search(message)
    if match is None:
        return None
    return match.group(1), message[match.start() :]
