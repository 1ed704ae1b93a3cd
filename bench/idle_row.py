"""Decode ms/token of a short conversation while another row of the engine holds a long idle one (serve's case:
a finished conversation kept in its row for prefix reuse). The step of the running row should cost what its own
tokens cost, whatever the idle row holds.

    python bench/idle_row.py --cache xquant-4 --idle 2000        # SmolLM2-135M from the test assets, CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="an HF folder (default: SmolLM2-135M from the test assets)")
    ap.add_argument("--cache", default="xquant-4")
    ap.add_argument("--idle", type=int, default=2000, help="tokens the idle row holds")
    ap.add_argument("--steps", type=int, default=24, help="decode steps timed")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import torch

    from xqcli.engine.loop import Engine
    from xqcli.load import load_hf_folder

    sys.path.insert(0, str(ROOT / "tests"))
    import assets

    torch.set_num_threads(args.threads)
    model = load_hf_folder(args.model or assets.smollm2_hf())
    engine = Engine(model, None, args.cache, context=args.idle + args.steps + 64, batch=2)
    ids = torch.randint(0, model.config.vocab_size, (args.idle + args.steps + 32,),
                        generator=torch.Generator().manual_seed(0)).tolist()
    for i in range(0, args.idle, 256):  # row 0: the idle conversation, prefilled in chunks
        engine.step_rows([ids[i:min(i + 256, args.idle)], []])
    engine.step_rows([[], ids[:20]])  # row 1: a short prompt, then one token per step
    times = []
    for t in range(args.steps):
        t0 = time.perf_counter()
        engine.step_rows([[], [ids[20 + t]]])
        times.append(time.perf_counter() - t0)
    print(f"{args.cache}, idle row {args.idle} tokens: {1000 * statistics.median(times):.1f} ms/token (median of "
          f"{args.steps})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
