"""TensorRT-LLM contract tensors -> prompts for an engine that takes token ids or embeddings.

The ``tensorrt_llm`` step receives what TensorRT-LLM's Triton backend receives:
``input_ids`` where ids below ``vocab_size`` are text tokens and the fake ids
``vocab_size + i`` select row ``i`` of the request's ``prompt_embedding_table``.
An engine that accepts prompt embeddings (vLLM's ``EmbedsPrompt``, key
``prompt_embeds``) needs one embedding per position instead, and one that only
takes ids (vLLM's ``TokensPrompt``, key ``prompt_token_ids``) is the fast path for
text-only requests.

:func:`build_prompts` turns a batch of requests into such prompts. Text-only
requests stay token ids. For the multimodal ones, every position of every request
is resolved in one gather on the embedding weight's device: text ids read the
model's input embedding, fake ids read the request's own table rows (concatenated
for the batch, with per-request offsets), so no host loop touches a hidden vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

TOKEN_IDS_KEY = "prompt_token_ids"  # vLLM TokensPrompt
EMBEDS_KEY = "prompt_embeds"  # vLLM EmbedsPrompt


class PromptError(ValueError):
    """A request's ids and prompt table do not fit together (names the request and the limit)."""


@dataclass(frozen=True)
class ContractRequest:
    """One request as the contract delivers it.

    Attributes:
        request_id: For error messages.
        input_ids: ``input_ids[:input_lengths]``.
        prompt_table: ``prompt_embedding_table`` as ``[rows, hidden]``, or None (text only).
    """

    request_id: str
    input_ids: Sequence[int]
    prompt_table: np.ndarray | torch.Tensor | None = None


def _check(request: ContractRequest, vocab_size: int, hidden: int) -> np.ndarray:
    ids = np.asarray(request.input_ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise PromptError(f"request {request.request_id!r}: empty input_ids")
    if (ids < 0).any():
        raise PromptError(f"request {request.request_id!r}: negative token id {int(ids.min())}")
    fake = ids >= vocab_size
    table = request.prompt_table
    rows = 0 if table is None else int(table.shape[0])
    if table is not None and (table.ndim != 2 or int(table.shape[1]) != hidden):
        raise PromptError(
            f"request {request.request_id!r}: prompt_embedding_table has shape {tuple(table.shape)}, "
            f"expected [rows, {hidden}]"
        )
    if fake.any() and int(ids[fake].max()) - vocab_size >= rows:
        raise PromptError(
            f"request {request.request_id!r}: id {int(ids[fake].max())} selects prompt-table row "
            f"{int(ids[fake].max()) - vocab_size}, but the table has {rows} rows"
        )
    return ids


def build_prompts(
    requests: Sequence[ContractRequest], vocab_size: int, embedding_weight: torch.Tensor
) -> list[dict[str, Any]]:
    """Prompts for a batch: token ids for text-only requests, embeddings where fake ids are.

    Args:
        requests: The batch, in order.
        vocab_size: Ids at or above this are prompt-table rows (``prompt_vocab_size``'s base).
        embedding_weight: The model's input embedding ``[vocab, hidden]``; its device and
            dtype are those of the returned embeddings.

    Returns:
        Per request, ``{"prompt_token_ids": [...]}`` or ``{"prompt_embeds": Tensor[len, hidden]}``.

    Raises:
        PromptError: A request has an empty or negative id, a fake id beyond its table, or a
            table whose width is not the model's hidden size.
    """
    hidden = int(embedding_weight.shape[1])
    checked = [_check(r, vocab_size, hidden) for r in requests]
    prompts: list[dict[str, Any] | None] = [None] * len(requests)
    media = [i for i, ids in enumerate(checked) if (ids >= vocab_size).any()]
    for i, ids in enumerate(checked):
        if i not in media:
            prompts[i] = {TOKEN_IDS_KEY: ids.tolist()}
    if not media:
        return prompts  # type: ignore[return-value]
    device, dtype = embedding_weight.device, embedding_weight.dtype
    # One table for the batch: each request's rows after the previous requests' rows.
    tables, offsets, start = [], [], 0
    for i in media:
        table = torch.as_tensor(requests[i].prompt_table).to(device=device, dtype=dtype)
        tables.append(table)
        offsets.append(start)
        start += int(table.shape[0])
    batch_table = torch.cat(tables)
    ids = torch.from_numpy(np.concatenate([checked[i] for i in media])).to(device)
    row_offset = torch.cat(
        [torch.full((len(checked[i]),), off, dtype=torch.int64) for i, off in zip(media, offsets)]
    ).to(device)
    is_fake = ids >= vocab_size
    text = embedding_weight[torch.where(is_fake, torch.zeros_like(ids), ids)]
    rows = batch_table[torch.where(is_fake, ids - vocab_size + row_offset, torch.zeros_like(ids))]
    embeds = torch.where(is_fake.unsqueeze(-1), rows, text)
    for i, part in zip(media, torch.split(embeds, [len(checked[i]) for i in media])):
        prompts[i] = {EMBEDS_KEY: part}
    return prompts  # type: ignore[return-value]
