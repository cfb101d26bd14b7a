"""`make bench` (priors): sampling speed of the trained priors, as ratios measured in one run.

(a) GPT with its KV cache against the same GPT without it (same seeds: the same tokens, checked),
(b) MaskGIT at its trained decoding steps against GPT with the cache: whole images (token sampling
    plus the tokenizer's decode), images/s at one batch size.
Reads models/prior_gpt and models/prior_maskgit (a `make run` first); prints a Markdown table and
writes reports/bench_priors.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from components.generators import load_generator


def images_per_s(gen, labels: torch.Tensor, *, repeats: int, **options) -> tuple[float, torch.Tensor]:
    """Best of `repeats` timed batches (after one warm-up) and the last batch's images."""
    best, images = float("inf"), None
    for i in range(repeats + 1):
        g = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        images = gen.sample(labels, generator=g, **options)
        if i:  # the first call warms kernels and allocator up
            best = min(best, time.perf_counter() - start)
    return len(labels) / best, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("reports/bench_priors.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gpt = load_generator(args.models / "prior_gpt")
    maskgit = load_generator(args.models / "prior_maskgit")
    labels = torch.arange(args.batch) % gpt.num_classes
    cached, with_cache = images_per_s(gpt, labels, repeats=args.repeats, use_cache=True)
    uncached, without = images_per_s(gpt, labels, repeats=args.repeats, use_cache=False)
    if not torch.equal(with_cache, without):
        raise SystemExit("KV-cache and uncached sampling gave different images under the same seed")
    parallel, _ = images_per_s(maskgit, labels, repeats=args.repeats)
    rows = {
        "gpt_cached_images_per_s": cached,
        "gpt_uncached_images_per_s": uncached,
        "kv_cache_speedup": cached / uncached,
        "maskgit_images_per_s": parallel,
        "maskgit_steps": maskgit.default_options["steps"],
        "maskgit_over_gpt_cached": parallel / cached,
        "tokens_per_image": gpt.grid[0] * gpt.grid[1],
        "batch": args.batch,
        "threads": args.threads,
    }
    print("| sampler | images/s | ratio |\n|---|---:|---:|")
    print(f"| GPT, no cache | {uncached:.0f} | 1.00 |")
    print(f"| GPT, KV cache | {cached:.0f} | {cached / uncached:.2f} (vs no cache) |")
    print(
        f"| MaskGIT, {rows['maskgit_steps']} steps | {parallel:.0f} | {parallel / cached:.2f} (vs GPT with cache) |"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
