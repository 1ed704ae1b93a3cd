"""Graph vs eager, and both vs the reference path: the engine's decode step for every cache kind (issue 13,
items 1 and 5).

For each kind: SmolLM2-135M (the test asset, or ``--model DIR``) prefills a real text's first 100 tokens
into three caches, then decodes ``--steps`` greedy steps, every path fed the reference path's tokens:

- graph: `DecodeStep` captured in a CUDA graph and replayed (`xqcli.engine.graph.StepDecoder`; CUDA only,
  ``max_graph_vs_eager`` is null without a GPU);
- eager: the same step run eagerly;
- ref: the model through a cache on the pure-torch reference path (kernels="off").

Two protocols (``--protocol``):

- ``synced`` (the default, the one the exit status judges): before every step the graph and eager caches
  load the reference cache's stored data (`ModelCache.load_state_dict`), so each step starts from the same
  codes, scales and windows and the logit difference is that step's alone. The tokens a step seals can
  still get another code or fp16 scale when the two paths compute their value ~1e-6 apart; those flips
  are counted (``flips_*``, summed over the steps) and their effect is part of the difference.
- ``free``: no loading; each path keeps what it stored. A flip then stays in the cache and, in XQuant-CL's
  closed loop, changes every later layer's deltas, so quantized kinds drift apart by quantization noise
  (BENCHMARKS.md shows how far); reported, with the stored data that differs at the end.

It reports per kind the largest |graph − eager| (same kernels: expected 0) and |eager − ref| of the fp32
logits, and whether the greedy picks agree; exit 1 when graph and eager differ by more than 1e-3 or a
pick differs, or when eager and the reference differ by more than REF_MAX_ABS (the tests' rule).

    python bench/graph_check.py --json OUT.json                 # on a GPU: 64 steps, every kind
    python bench/graph_check.py --interpret --steps 2 --kinds kv  # CPU smoke run (Triton interpreter)
    python bench/graph_check.py --float64 --kinds xquant-4,xquant-cl-3  # float32 rounding's own distance
    python bench/graph_check.py --threads 1 --kinds xquant-cl-3  # the BLAS thread count's own distance
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# tests/test_decode_step.py's rule for the fused step against the reference path: fp32 logits within this
# and the same greedy picks.
REF_MAX_ABS = 2e-3
KINDS = ("kv", "kivi-4", "xquant-4", "xquant-4+rot", "xquant-4+ch0", "xquant-cl-3", "xquant-cl-3+rot")


def default_kinds(config) -> list[str]:
    """KINDS without +ch0 on a model that caches X itself (MHA): there is no latent channel 0 to keep."""
    from xqcli.cache.spec import uses_latents

    return [k for k in KINDS if "+ch0" not in k or uses_latents(config)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="an HF folder (default: SmolLM2-135M from the test assets)")
    ap.add_argument("--kinds", help="comma-separated cache kinds (default: every kind of KINDS the model takes; "
                                    "+ch0 needs latents)")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--interpret", action="store_true", help="CPU: the Triton interpreter, no graph")
    ap.add_argument("--protocol", choices=("synced", "free"), default="synced",
                    help="synced: every step starts from the reference's stored data; free: each path keeps its own")
    ap.add_argument("--float64", action="store_true",
                    help="no kernels: the float32 reference path against a float64 one, the distance float32 rounding "
                         "alone gives (the scale a step's difference compares with)")
    ap.add_argument("--threads", type=int,
                    help="no kernels: the reference path at this many BLAS threads against itself at torch's default "
                         "(the distance the thread count alone gives: BLAS splits products by threads)")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before xqcli.kernels is imported
    import torch

    from xqcli.bundle.artifacts import Artifacts
    from xqcli.cache.spec import CacheSpec
    from xqcli.engine.fused import DecodeWeights
    from xqcli.engine.graph import StepDecoder
    from xqcli.engine.step import DecodeStep
    from xqcli.load import load_hf_folder, make_cache
    from xqcli.tokenizer import Tokenizer

    sys.path.insert(0, str(ROOT / "tests"))
    import assets

    folder = args.model or assets.smollm2_hf()
    cuda = torch.cuda.is_available() and not args.interpret
    model = load_hf_folder(folder, device="cuda" if cuda else "cpu")
    model64 = load_hf_folder(folder, dtype=torch.float64, device=model.device) if args.float64 else None
    prompt = Tokenizer.from_folder(folder).encode(assets.wiki_text())[:100]
    context = len(prompt) + args.steps + 1
    rows, ok = [], True
    for kind in args.kinds.split(",") if args.kinds else default_kinds(model.config):
        spec = CacheSpec.parse(kind)
        if spec.method != "kv":
            spec = CacheSpec.parse(kind, window=16, group_size=32)  # most cached tokens read from codes
        with torch.inference_mode():
            artifacts = Artifacts()
            reference_only = args.float64 or args.threads is not None
            graphed = cuda and not reference_only
            # before the caches, as the engine does
            weights = None if reference_only else DecodeWeights.build(model, spec, artifacts)
            # graph (CUDA only: without a GPU it would be the eager step again), eager, then the reference;
            # --float64 / --threads: the reference in float64 / at N threads, then as it runs by default
            if reference_only:
                other = model64 if args.float64 else model
                caches = [make_cache(m, spec, 1, context, artifacts=Artifacts(), kernels="off") for m in (other, model)]

                def other_reference(tok, cache=caches[0]):
                    with blas_threads(args.threads):
                        return other(tok, cache)[:, -1].float()

                prefills = [other_reference, lambda t: model(t, caches[1])[:, -1].float()]
                decoders = [lambda tok, n_new, rows: other_reference(tok[:, None])]
            else:
                paths = ("auto", "auto", "off") if cuda else ("auto", "off")
                caches = [make_cache(model, spec, 1, context, artifacts=artifacts, kernels=k) for k in paths]
                prefills = [lambda t, c=c: model(t, c)[:, -1].float() for c in caches]
                decoders = [StepDecoder(DecodeStep(model, c, weights, backend="auto" if cuda else "triton"), graph=g)
                            for c, g in zip(caches[:-1], (cuda, False))]
            tokens = torch.tensor([prompt], device=model.device)
            logits = [prefill(tokens) for prefill in prefills]
            d_graph, d_ref = (0.0 if graphed else None), 0.0
            same_picks = True
            flips = {"code_bytes_differ": 0, "scales_zeros_differ": 0}
            one = torch.ones(1, dtype=torch.long, device=model.device)
            for _ in range(args.steps):
                tok = logits[-1].argmax(-1)
                same_picks &= all(bool((lg.argmax(-1) == tok).all()) for lg in logits[:-1])
                if args.protocol == "synced":
                    for c in caches[:-1]:
                        load_into(c, caches[-1])
                ref = model(tok[:, None], caches[-1])[:, -1].float()
                logits = [dec(tok, one, [1]).clone() for dec in decoders] + [ref]
                if graphed:
                    d_graph = max(d_graph, (logits[0] - logits[1]).abs().max().item())
                d_ref = max(d_ref, (logits[-2] - logits[-1]).abs().max().item())
                if args.protocol == "synced":  # what this step stored differently
                    step_diff = stored_differences(caches[-2], caches[-1])
                    for key in flips:
                        flips[key] += step_diff[key]
        row = {"kind": kind, "protocol": args.protocol, "steps": args.steps, "graph": graphed, "float64": args.float64,
               "threads": args.threads,
               "max_graph_vs_eager": d_graph, "max_eager_vs_ref": d_ref, "same_greedy_picks": same_picks}
        if args.protocol == "synced":
            row |= {f"flips_{key}": n for key, n in flips.items()}
        else:
            row |= stored_differences(caches[-2], caches[-1])
        ok &= (d_graph is None or d_graph <= 1e-3) and d_ref <= REF_MAX_ABS and same_picks
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(model.device), "rows": rows}, indent=2))
    return 0 if ok else 1


@contextmanager
def blas_threads(n: int | None) -> Iterator[None]:
    """Run the block at n intra-op threads (None: as it is)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_into(cache, source) -> None:
    """Give `cache` the stored data of `source` (same kind and settings), keeping its `lengths` tensor: a
    captured step reads the lengths through that tensor, so it is updated in place."""
    lengths = cache.lengths
    cache.load_state_dict(source.state_dict())
    lengths.copy_(cache.lengths)
    cache.set_lengths(lengths, list(cache.host_lengths))


def stored_differences(a, b) -> dict:
    """How many stored code bytes and fp16 scales/zeros differ between two caches of one kind (0 for `kv`):
    a logit difference beyond summation order comes from such flips, a float32 value on the other side of
    a rounding boundary."""
    codes = params = total = 0
    for layer_a, layer_b in zip(getattr(a, "streams", []), getattr(b, "streams", [])):
        for sa, sb in zip(layer_a, layer_b):
            if sa.spec is None:
                continue
            codes += int((sa.codes != sb.codes).sum())
            total += sa.codes.numel()
            params += int((sa.scale != sb.scale).sum() + (sa.zero != sb.zero).sum())
    return {"code_bytes_differ": codes, "code_bytes": total, "scales_zeros_differ": params}


if __name__ == "__main__":
    sys.exit(main())
