"""Ensemble wiring, described once as data and turned into Triton configs.

Every ensemble names its public inputs and outputs and lists :class:`Step`
objects that map model tensors to ensemble tensors. The dtype and dims of the
public tensors come from the model that consumes or produces them, so the
description never repeats a type. :func:`check_wiring` then verifies every
ensemble in a rendered repository independently of how it was generated.
"""

from __future__ import annotations

from dataclasses import dataclass

from tritonclient.grpc import model_config_pb2 as mc

from mmtriton import contract as c
from mmtriton.contract import CHAT_INPUTS, CHAT_OUTPUTS


@dataclass(frozen=True)
class Step:
    """One model call: ``inputs`` / ``outputs`` map model tensor -> ensemble tensor."""

    model: str
    inputs: dict[str, str]
    outputs: dict[str, str]


@dataclass(frozen=True)
class Ensemble:
    """An ensemble: the tensors it takes, its steps, and the tensors it returns."""

    name: str
    inputs: tuple[str, ...]
    steps: tuple[Step, ...]
    outputs: tuple[str, ...]


def image_steps(checked: bool) -> tuple[Step, ...]:
    """Raw image bytes -> ``image_embeddings``; ``checked`` puts ``image_check`` first."""
    raw = "_image_checked" if checked else "image"
    check = (Step("image_check", {"image": "image"}, {"checked": raw}),) if checked else ()
    return check + (
        Step("image_preprocess", {"image": raw}, {"pixel_values": "_pixel_values"}),
        Step("vision_encoder", {"pixel_values": "_pixel_values"}, {"embeddings": "image_embeddings"}),
    )


def audio_steps(checked: bool, source: str = "audio") -> tuple[Step, ...]:
    """Raw audio bytes (ensemble tensor ``source``) -> ``audio_embeddings``; ``checked`` puts ``audio_check`` first."""
    raw = "_audio_checked" if checked else source
    check = (Step("audio_check", {"audio": source}, {"checked": raw}),) if checked else ()
    return check + (
        Step("audio_preprocess", {"audio": raw}, {"mfcc": "_mfcc", "mfcc_length": "_mfcc_length"}),
        Step("audio_encoder", {"features": "_mfcc", "feature_length": "_mfcc_length"}, {"embeddings": "audio_embeddings"}),
    )


def image_then_audio_steps(checked: bool) -> tuple[Step, ...]:
    """The image chain, then ``audio_gate``, then the audio chain: one step in flight at a time.

    Triton 2.51's ensemble scheduler stops counting a request's steps once one of them
    has failed, so a failure (a bad payload, or a client that went away, which fails the
    next scheduled step) while a sibling step still runs leaves the request in flight
    forever, holding its tensors. Two parallel media chains reach that state; a chain
    where each step waits for the previous one cannot. ``audio_gate`` makes the audio
    chain wait for ``image_embeddings`` without reading them.
    """
    gate = Step("audio_gate", {"audio": "audio", "after": "image_embeddings"}, {"audio_out": "_audio_after_image"})
    return image_steps(checked) + (gate,) + audio_steps(checked, source="_audio_after_image")






def llm_steps(image: bool, audio: bool) -> tuple[Step, ...]:
    """preprocessing -> tensorrt_llm -> postprocessing, fed by the media embeddings present.

    A text-only request never touches the prompt-table tensors: they are mapped
    only in ensembles that carry an image or audio clip, so no step ever waits
    for an input that was not sent.
    """
    pre_in = {
        "QUERY": "text_input",
        "MESSAGES": c.CHAT_MESSAGES,
        "REQUEST_OUTPUT_LEN": "max_tokens",
        "STOP_WORDS_DICT": "stop_words",
        "TEMPERATURE": "temperature",
        "TOP_K": "top_k",
        "TOP_P": "top_p",
        "IGNORE_EOS": "ignore_eos",
    }
    pre_out = {
        "INPUT_ID": "_INPUT_ID",
        "REQUEST_INPUT_LEN": "_REQUEST_INPUT_LEN",
        "OUT_REQUEST_OUTPUT_LEN": "_REQUEST_OUTPUT_LEN",
        "OUT_END_ID": "_END_ID",
        "OUT_PAD_ID": "_PAD_ID",
        "STOP_WORDS_IDS": "_STOP_WORDS_IDS",
        "RETURN_NUM_TOKENS": "_RETURN_NUM_TOKENS",
    }
    llm_in = {
        "input_ids": "_INPUT_ID",
        "input_lengths": "_REQUEST_INPUT_LEN",
        "request_output_len": "_REQUEST_OUTPUT_LEN",
        "end_id": "_END_ID",
        "pad_id": "_PAD_ID",
        "stop_words_list": "_STOP_WORDS_IDS",
        "streaming": "stream",
        "temperature": "temperature",
        "runtime_top_k": "top_k",
        "runtime_top_p": "top_p",
        "seed": "seed",
        "return_num_input_tokens": "_RETURN_NUM_TOKENS",
        "return_num_output_tokens": "_RETURN_NUM_TOKENS",
    }
    if image:
        pre_in["IMAGE_EMBEDDINGS"] = "image_embeddings"
    if audio:
        pre_in["AUDIO_EMBEDDINGS"] = "audio_embeddings"
    if image or audio:
        pre_out.update({"PROMPT_EMBEDDING_TABLE": "_PROMPT_EMBEDDING_TABLE", "PROMPT_VOCAB_SIZE": "_PROMPT_VOCAB_SIZE"})
        llm_in.update({"prompt_embedding_table": "_PROMPT_EMBEDDING_TABLE", "prompt_vocab_size": "_PROMPT_VOCAB_SIZE"})
    return (
        Step("preprocessing", pre_in, pre_out),
        Step(
            c.LLM_MODEL,
            llm_in,
            {
                "output_ids": "output_ids",
                "sequence_length": "_SEQUENCE_LENGTH",
                "num_input_tokens": "num_input_tokens",
                "num_output_tokens": "num_output_tokens",
            },
        ),
        Step(
            "postprocessing",
            {"TOKENS_BATCH": "output_ids", "SEQUENCE_LENGTH": "_SEQUENCE_LENGTH", "NUM_OUTPUT_TOKENS": "num_output_tokens"},
            {"OUTPUT": "text_output"},
        ),
    )


def all_ensembles(checked: bool = False) -> tuple[Ensemble, ...]:
    """Every ensemble of the repository.

    ``embed_*``: raw bytes in, prompt-table rows out (the preprocessing + encoder stage
    on its own). ``chat_*``: text in (plus raw image and/or audio bytes), streamed text
    out. One ensemble per input combination: Triton ensembles cannot skip a step, so the
    media chains exist only where the media is a required input.

    Args:
        checked: Put the ``image_check`` / ``audio_check`` models in front of the media chains.
    """
    image, audio, both = image_steps(checked), audio_steps(checked), image_then_audio_steps(checked)
    return (
        Ensemble(c.EMBED_IMAGE, (c.IMAGE,), image, (c.IMAGE_EMBEDDINGS,)),
        Ensemble(c.EMBED_AUDIO, (c.AUDIO,), audio, (c.AUDIO_EMBEDDINGS,)),
        Ensemble(c.EMBED_IMAGE_AUDIO, (c.IMAGE, c.AUDIO), both, (c.IMAGE_EMBEDDINGS, c.AUDIO_EMBEDDINGS)),
        Ensemble(c.CHAT_TEXT, CHAT_INPUTS, llm_steps(False, False), CHAT_OUTPUTS),
        Ensemble(c.CHAT_IMAGE, (c.IMAGE, *CHAT_INPUTS), image + llm_steps(True, False), CHAT_OUTPUTS),
        Ensemble(c.CHAT_AUDIO, (c.AUDIO, *CHAT_INPUTS), audio + llm_steps(False, True), CHAT_OUTPUTS),
        Ensemble(
            c.CHAT_IMAGE_AUDIO, (c.IMAGE, c.AUDIO, *CHAT_INPUTS), both + llm_steps(True, True), CHAT_OUTPUTS
        ),
    )


ENSEMBLES: tuple[Ensemble, ...] = all_ensembles()


def _tensor(config: mc.ModelConfig, name: str, kind: str) -> mc.ModelInput | mc.ModelOutput | None:
    for tensor in getattr(config, kind):
        if tensor.name == name:
            return tensor
    return None


def build_ensemble(ensemble: Ensemble, models: dict[str, mc.ModelConfig], max_batch_size: int) -> mc.ModelConfig:
    """Turn an ensemble description into a full ``ModelConfig``.

    Args:
        ensemble: The description.
        models: Configs of the composing models, by name.
        max_batch_size: The ensemble's ``max_batch_size``.

    Returns:
        The ensemble config (platform ``ensemble``).

    Raises:
        KeyError: A step names a model or tensor the configs do not have, or
            consumes a tensor that is neither a declared input nor produced.
    """
    config = mc.ModelConfig(name=ensemble.name, platform="ensemble", max_batch_size=max_batch_size)
    produced = {tensor for step in ensemble.steps for tensor in step.outputs.values()}
    seen: set[str] = set()
    for step in ensemble.steps:
        model = models[step.model]
        for model_input, tensor in step.inputs.items():
            if tensor in produced or tensor in seen:
                continue
            if tensor not in ensemble.inputs:
                raise KeyError(f"{ensemble.name}: {step.model}.{model_input} reads {tensor!r}, which no step produces")
            source = _tensor(model, model_input, "input")
            if source is None:
                raise KeyError(f"{ensemble.name}: {step.model} has no input {model_input!r}")
            seen.add(tensor)
            config.input.add(name=tensor, data_type=source.data_type, dims=list(source.dims), optional=source.optional)
        for model_output, tensor in step.outputs.items():
            if tensor not in ensemble.outputs:
                continue
            source = _tensor(model, model_output, "output")
            if source is None:
                raise KeyError(f"{ensemble.name}: {step.model} has no output {model_output!r}")
            config.output.add(name=tensor, data_type=source.data_type, dims=list(source.dims))
        config.ensemble_scheduling.step.add(
            model_name=step.model, model_version=-1, input_map=step.inputs, output_map=step.outputs
        )
    return config


def _dims_compatible(a: list[int], b: list[int]) -> bool:
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b))


def _dtype(value: int) -> str:
    return mc.DataType.Name(value)


def check_wiring(configs: dict[str, mc.ModelConfig]) -> list[str]:
    """Check every ensemble in a repository against the models it calls.

    Checks: each step's model exists; each mapped tensor exists in that model;
    every required model input is fed; each ensemble tensor has one producer,
    and the producer's dtype and dims match every consumer; every ensemble
    output is produced with the declared dtype and dims; batching agrees.

    Args:
        configs: Every model config of the repository, by name.

    Returns:
        Human-readable problems; empty when the wiring is sound.
    """
    problems: list[str] = []
    for ens in configs.values():
        if ens.platform != "ensemble":
            continue
        where = f"ensemble {ens.name!r}"
        # tensor name -> (dtype, dims, who)
        sources: dict[str, tuple[int, list[int], str]] = {
            t.name: (t.data_type, list(t.dims), "ensemble input") for t in ens.input
        }
        steps = list(ens.ensemble_scheduling.step)
        for step in steps:
            model = configs.get(step.model_name)
            if model is None:
                problems.append(f"{where}: step model {step.model_name!r} is not in the repository")
                continue
            if (model.max_batch_size > 0) != (ens.max_batch_size > 0):
                problems.append(
                    f"{where}: max_batch_size {ens.max_batch_size} but step {model.name!r} has {model.max_batch_size}"
                )
            for model_output, tensor in step.output_map.items():
                out = _tensor(model, model_output, "output")
                if out is None:
                    problems.append(f"{where}: {model.name!r} has no output {model_output!r}")
                    continue
                if tensor in sources:
                    problems.append(f"{where}: tensor {tensor!r} is produced twice ({sources[tensor][2]} and {model.name!r})")
                sources[tensor] = (out.data_type, list(out.dims), f"{model.name}.{model_output}")
        consumed: set[str] = set()
        for step in steps:
            model = configs.get(step.model_name)
            if model is None:
                continue
            for model_input, tensor in step.input_map.items():
                consumed.add(tensor)
                inp = _tensor(model, model_input, "input")
                if inp is None:
                    problems.append(f"{where}: {model.name!r} has no input {model_input!r} (mapped from {tensor!r})")
                    continue
                if tensor not in sources:
                    problems.append(f"{where}: tensor {tensor!r} feeding {model.name}.{model_input} is never produced")
                    continue
                dtype, dims, who = sources[tensor]
                if dtype != inp.data_type:
                    problems.append(
                        f"{where}: {who} is {_dtype(dtype)} but {model.name}.{model_input} expects {_dtype(inp.data_type)}"
                    )
                if not _dims_compatible(dims, list(inp.dims)):
                    problems.append(f"{where}: {who} has dims {dims} but {model.name}.{model_input} expects {list(inp.dims)}")
            for inp in model.input:
                if not inp.optional and inp.name not in step.input_map:
                    problems.append(f"{where}: required input {model.name}.{inp.name} is not fed")
        for out in ens.output:
            if out.name not in sources:
                problems.append(f"{where}: output {out.name!r} is never produced")
                continue
            dtype, dims, who = sources[out.name]
            if dtype != out.data_type or not _dims_compatible(dims, list(out.dims)):
                problems.append(
                    f"{where}: output {out.name!r} is declared {_dtype(out.data_type)} {list(out.dims)} "
                    f"but {who} gives {_dtype(dtype)} {dims}"
                )
        for tensor, (_, _, who) in sources.items():
            if who != "ensemble input" and tensor not in consumed and tensor not in {o.name for o in ens.output}:
                problems.append(f"{where}: {who} goes to {tensor!r}, which nothing reads")
        for inp in ens.input:
            if inp.name not in consumed:
                problems.append(f"{where}: input {inp.name!r} is not used by any step")
        problems.extend(f"{where}: {p}" for p in concurrent_steps(steps))
    return problems


def concurrent_steps(steps: list[mc.ModelEnsembling.Step]) -> list[str]:
    """Pairs of steps that can be in flight at the same time for one request.

    Triton 2.51's ensemble scheduler stops counting a request's steps once one has
    failed, so a failure while another step of the same request runs leaves the
    request in flight forever. Every pair of steps must therefore be ordered by
    their data: one of the two consumes, directly or through others, what the
    other produces. (A decoupled step and the steps fed by its responses do
    overlap; those are ordered too, and the later ones never fail: see
    ``mmtriton/backend/cancellation.py``.)

    Args:
        steps: The ensemble's steps.

    Returns:
        One message per unordered pair.
    """
    producer = {tensor: i for i, step in enumerate(steps) for tensor in step.output_map.values()}
    after: list[set[int]] = [{producer[t] for t in step.input_map.values() if t in producer} for step in steps]
    changed = True
    while changed:  # transitive closure; ensembles have a handful of steps
        changed = False
        for deps in after:
            grown = set().union(deps, *(after[d] for d in deps))
            if grown != deps:
                deps |= grown
                changed = True
    problems = []
    for i in range(len(steps)):
        for j in range(i + 1, len(steps)):
            if i not in after[j] and j not in after[i]:
                problems.append(
                    f"steps {steps[i].model_name!r} and {steps[j].model_name!r} can run at the same time "
                    "(a failure in one would strand the request in Triton 2.51); order them"
                )
    return problems
