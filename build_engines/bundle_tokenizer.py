"""The bundle's tokenizer: a byte-level BPE trained from a built-in corpus, or a saved one, and its chat template.

The locally trained tokenizer has the special tokens below and a chat template whose
image and audio content parts become the spec's placeholder tokens, which the serving
side expands into encoder embeddings. Deterministic: the corpus comes from ``spec.seed``.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from build_engines.bundle_compat import _make_tokenizer_portable
from build_engines.bundle_manifest import BundleError
from mmtriton.spec import ModelSpec

logger = logging.getLogger(__name__)

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"

# String content, or OpenAI-style content parts where image / audio parts become
# the placeholder token that the serving side expands into encoder embeddings.
CHAT_TEMPLATE_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ '__SYSTEM__' }}"
    "{%- elif message['role'] == 'user' %}{{ '__USER__' }}"
    "{%- elif message['role'] == 'assistant' %}{{ '__ASSISTANT__' }}"
    "{%- else %}{{ raise_exception('unsupported role: ' + message['role']) }}"
    "{%- endif %}"
    "{%- if message['content'] is string %}{{ message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{ part['text'] }}"
    "{%- elif part['type'] in ['image', 'image_url'] %}{{ '__IMAGE__' }}"
    "{%- elif part['type'] in ['audio', 'input_audio'] %}{{ '__AUDIO__' }}"
    "{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{ '__END__' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '__ASSISTANT__' }}{%- endif %}"
)

#: Files of a saved tokenizer (left out when a checkpoint's other files are linked in).
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
    }
)


def chat_template(image_token: str, audio_token: str) -> str:
    """The Jinja chat template of the locally trained tokenizer.

    Args:
        image_token: Placeholder emitted for image content parts.
        audio_token: Placeholder emitted for audio content parts.

    Returns:
        Template text for ``tokenizer.chat_template``.
    """
    replacements = {
        "__SYSTEM__": SYSTEM,
        "__USER__": USER,
        "__ASSISTANT__": ASSISTANT,
        "__END__": END,
        "__IMAGE__": image_token,
        "__AUDIO__": audio_token,
    }
    text = CHAT_TEMPLATE_TEMPLATE
    for key, value in replacements.items():
        text = text.replace(key, value)
    return text


def _corpus(seed: int, sentences: int = 400) -> list[str]:
    """A deterministic English corpus with some multi-byte UTF-8 words and emoji."""
    rng = random.Random(seed)
    subjects = [
        "The cat", "A small dog", "My neighbour", "The old farmer", "Our teacher", "The robot",
        "A young student", "The pilot", "Her brother", "The chef", "Every child", "The doctor",
        "A curious fox", "The musician", "Their grandmother", "The engineer", "A tired traveller",
    ]
    verbs = [
        "watched", "painted", "carried", "found", "described", "remembered", "photographed",
        "listened to", "cooked", "repaired", "discovered", "ordered", "counted", "followed",
        "explained", "visited", "measured", "translated", "recorded", "imagined",
    ]
    adjectives = [
        "red", "quiet", "enormous", "bright", "wooden", "broken", "beautiful", "strange",
        "little", "ancient", "noisy", "golden", "purple", "delicious", "careful", "naïve",
        "frozen", "gentle", "heavy", "shiny",
    ]
    objects = [
        "apple", "river", "mountain", "bicycle", "window", "garden", "picture", "song",
        "train", "letter", "bridge", "castle", "piano", "forest", "computer", "camera",
        "sandwich", "jalapeño", "café", "crème brûlée", "piñata", "résumé", "façade",
    ]
    places = [
        "in the park", "near the station", "at the market", "in Tokyo (東京)", "behind the school",
        "on the beach", "in a café in Paris", "under the bridge", "at home", "in the kitchen",
        "in Zürich", "in São Paulo", "in 日本", "by the lake", "on the roof",
    ]
    times = [
        "yesterday", "this morning", "last week", "every Sunday", "at noon", "in 1999",
        "on 12 March", "after dinner", "before sunrise", "twice a day",
    ]
    extras = [
        "It was great 😀.", "Nobody expected that! 🚀", "The price was €12.50.", "She said 日本語 is fun.",
        "Wow — what a day.", "That's über cool 🎉.", "He smiled 👍.", "We wrote 中文 and 한국어 too.",
        "The temperature was 21°C.", "Is it naïve to hope? Maybe.", "Thanks a lot! ❤️",
    ]
    lines = []
    for _ in range(sentences):
        sentence = (
            f"{rng.choice(subjects)} {rng.choice(verbs)} the {rng.choice(adjectives)} "
            f"{rng.choice(objects)} {rng.choice(places)} {rng.choice(times)}."
        )
        if rng.random() < 0.3:
            sentence += " " + rng.choice(extras)
        if rng.random() < 0.2:
            sentence += f" It cost {rng.randint(1, 999)} dollars and took {rng.randint(2, 59)} minutes."
        lines.append(sentence)
    lines.extend(extras)
    return lines


def _train_tokenizer(spec: ModelSpec) -> Tokenizer:
    specials = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END, spec.tokenizer.image_token, spec.tokenizer.audio_token]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.tokenizer.vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(spec.seed), trainer=trainer)
    return tokenizer


def build_tokenizer(spec: ModelSpec, llm_dir: Path) -> PreTrainedTokenizerFast:
    """Save the spec's tokenizer into ``llm_dir``: ``tokenizer.path`` loaded, or one trained here.

    A loaded tokenizer gets the image and audio placeholders as special tokens when it
    lacks them; either is saved so transformers 4.57 loads it too.

    Args:
        spec: The model spec (``tokenizer``, ``llm.max_position_embeddings``, ``seed``).
        llm_dir: The bundle's ``llm`` folder.

    Returns:
        The tokenizer.
    """
    tspec = spec.tokenizer
    if tspec.path:
        tokenizer = AutoTokenizer.from_pretrained(tspec.path)
        missing = [t for t in (tspec.image_token, tspec.audio_token) if t not in tokenizer.get_vocab()]
        if missing:
            logger.warning("tokenizer %s lacks %s; adding them as special tokens", tspec.path, missing)
            tokenizer.add_special_tokens(
                {"extra_special_tokens": [*tokenizer.extra_special_tokens, *missing]}
            )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        trained = _train_tokenizer(spec)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=trained,
            bos_token=BOS,
            eos_token=EOS,
            pad_token=PAD,
            extra_special_tokens=[SYSTEM, USER, ASSISTANT, END, tspec.image_token, tspec.audio_token],
            chat_template=chat_template(tspec.image_token, tspec.audio_token),
            clean_up_tokenization_spaces=False,
            model_max_length=spec.llm.max_position_embeddings,
        )
        if len(tokenizer) != tspec.vocab_size:
            logger.warning("trained tokenizer has %d tokens, spec asks for %d", len(tokenizer), tspec.vocab_size)
    tokenizer.save_pretrained(llm_dir)
    _make_tokenizer_portable(llm_dir)
    return tokenizer


def token_ids(spec: ModelSpec, tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The special token ids ``bundle.json`` records (``end`` only for the locally trained tokenizer).

    Args:
        spec: The model spec.
        tokenizer: The bundle's tokenizer.

    Returns:
        Ids of ``bos``, ``eos``, ``pad``, ``image``, ``audio`` (and ``end``).

    Raises:
        BundleError: The tokenizer has no id for one of them.
    """
    ids = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "image": tokenizer.convert_tokens_to_ids(spec.tokenizer.image_token),
        "audio": tokenizer.convert_tokens_to_ids(spec.tokenizer.audio_token),
    }
    if not spec.tokenizer.path:
        ids["end"] = tokenizer.convert_tokens_to_ids(END)
    unset = sorted(k for k, v in ids.items() if v is None or (k != "bos" and v == tokenizer.unk_token_id))
    if unset:
        raise BundleError(f"tokenizer has no id for {unset}")
    return ids

