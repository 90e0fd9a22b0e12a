"""How should a new request join a running batch? Two ways, timed on the real model:

  merge:      prefill the newcomer alone, then left-pad and concatenate its KV cache into
              the batch's (what tunesmith.generate.engine does, with generate/batch.py's join);
  re-prefill: run a fresh prefill over every running row's tokens plus the newcomer.

    .venv/bin/python bench/serve_join.py --threads 1
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--running", type=int, default=15, help="Rows already generating.")
    ap.add_argument("--context", type=int, default=100, help="Tokens each running row holds.")
    ap.add_argument("--prompt", type=int, default=40, help="Tokens of the newcomer's prompt.")
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from transformers import DynamicCache

    from tunesmith.models.inference import load_for_inference

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_for_inference(args.model).model
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    running = torch.randint(100, vocab, (args.running, args.context), generator=gen)
    newcomer = torch.randint(100, vocab, (1, args.prompt), generator=gen)

    def prefill(ids: torch.Tensor, mask: torch.Tensor) -> DynamicCache:
        cache = DynamicCache(config=model.config)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
              logits_to_keep=1)
        return cache

    with torch.inference_mode():
        batch_cache = prefill(running, torch.ones_like(running))

        def merge() -> None:
            cache = prefill(newcomer, torch.ones_like(newcomer))
            width = max(args.context, args.prompt)
            for a, b in zip(batch_cache.layers, cache.layers):
                for attr in ("keys", "values"):
                    x, y = getattr(a, attr), getattr(b, attr)
                    torch.cat([F.pad(x, (0, 0, width - x.shape[-2], 0)), F.pad(y, (0, 0, width - y.shape[-2], 0))])

        def reprefill() -> None:
            width = max(args.context, args.prompt)
            ids = torch.zeros((args.running + 1, width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            ids[:-1, width - args.context:] = running
            mask[:-1, width - args.context:] = 1
            ids[-1, width - args.prompt:] = newcomer
            mask[-1, width - args.prompt:] = 1
            prefill(ids, mask)

        times = {}
        for name, fn in (("merge", merge), ("re-prefill", reprefill)):
            fn()
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            times[name] = best
    print(f"{args.model}: {args.running} running rows x {args.context} tokens, newcomer {args.prompt} tokens, "
          f"threads {torch.get_num_threads()}")
    for name, t in times.items():
        print(f"  {name:10} {t * 1000:8.1f} ms")
    print(f"  merge is {times['re-prefill'] / times['merge']:.1f}x faster")


if __name__ == "__main__":
    main()
