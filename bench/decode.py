"""Decode step time at batch 1 against the weight-read floor, on one GPU.

Every decode step reads all weights once, so ``weight bytes / device-to-device
copy bandwidth`` (read + write counted, as the copy itself does) is the least a
step can take. This measures both on the same GPU, plus the model-bandwidth
utilization ``weight bytes x steps/s / bandwidth`` of plain eager decoding.

Example::

    python -m bench.decode --llm build/bundles/glm4-9b-shape/llm --out results/decode
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def copy_bandwidth(gib: float = 2.0, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    import torch

    n = int(gib * (1 << 30))
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * n * repeats / (start.elapsed_time(end) / 1000.0)


def decode_step_ms(llm_dir: Path, prompt_len: int = 512, steps: int = 64) -> tuple[float, int]:
    """Mean eager decode step time at batch 1 (ms) after a ``prompt_len`` prefill, and weight bytes."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.bfloat16, device_map="cuda").eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    vocab = min(model.config.vocab_size, 500)  # ids the small local tokenizer could produce
    ids = torch.randint(0, vocab, (1, prompt_len), device="cuda")
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(4):  # warm-up steps
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000.0 / steps, weight_bytes


def main(argv: list[str] | None = None) -> int:
    """Measure and write ``decode.json`` / ``decode.md``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", type=Path, required=True, help="Hugging Face model folder (the bundle's llm/)")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    import torch

    bandwidth = copy_bandwidth()
    step_ms, weight_bytes = decode_step_ms(args.llm, args.prompt_len, args.steps)
    floor_ms = weight_bytes / bandwidth * 1000.0
    result = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "copy_bandwidth_TBps": bandwidth / 1e12,
        "weight_bytes": weight_bytes,
        "floor_ms": floor_ms,
        "eager_step_ms_batch1": step_ms,
        "step_over_floor": step_ms / floor_ms,
        "model_bandwidth_utilization": floor_ms / step_ms,
        "prompt_len": args.prompt_len,
        "steps": args.steps,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode.json").write_text(json.dumps(result, indent=2) + "\n")
    table = "\n".join(
        [
            "| what | figure |",
            "|---|---|",
            f"| GPU | {result['gpu']} (torch {result['torch']}) |",
            f"| device-to-device copy bandwidth (read + write) | {result['copy_bandwidth_TBps']:.2f} TB/s |",
            f"| weight bytes | {weight_bytes / 1e9:.1f} GB |",
            f"| weight-read floor per decode step | {floor_ms:.2f} ms |",
            f"| eager HF decode step, batch 1, after a {args.prompt_len}-token prompt | {step_ms:.2f} ms "
            f"({result['step_over_floor']:.1f}x the floor, MBU {result['model_bandwidth_utilization'] * 100:.0f}%) |",
        ]
    )
    (args.out / "decode.md").write_text(table + "\n")
    print(table)  # noqa: T201 - CLI output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
