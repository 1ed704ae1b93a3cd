"""Run one vLLM engine and print its greedy completions as JSON (a script: vLLM spawns its engine process).

usage: vllm_generate.py MODEL CACHE PROMPTS_JSON [TP] [--exact] [--max-tokens=N]
CACHE: `vllm` for vLLM's own Llama, else an xq kind; --exact: the plugin's `xq_exact` mode.
"""

import json
import sys

from vllm import LLM, SamplingParams

MAX_TOKENS = 16
KV_CACHE_BYTES = 1 << 28  # the same cache memory for every run, so capacities compare


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    limit = [int(a.split("=")[1]) for a in sys.argv[1:] if a.startswith("--max-tokens=")]
    model, cache, prompts = args[0], args[1], json.loads(args[2])
    tp = int(args[3]) if len(args) > 3 else 1
    overrides = {"architectures": ["XqLlamaForCausalLM"], "xq_cache": cache}
    if "--exact" in sys.argv:
        overrides["xq_exact"] = True
    extra = {} if cache == "vllm" else {"hf_overrides": overrides}
    llm = LLM(model=model, dtype="float32", max_model_len=2048, enforce_eager=True, kv_cache_memory_bytes=KV_CACHE_BYTES,
              tensor_parallel_size=tp, **extra)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=limit[0] if limit else MAX_TOKENS))
    print("XQ-RESULT " + json.dumps([o.outputs[0].text for o in outs]), flush=True)


if __name__ == "__main__":
    main()
