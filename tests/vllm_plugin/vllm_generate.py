"""Run one vLLM engine and print its greedy completions as JSON (a script: vLLM spawns its engine process).

usage: vllm_generate.py MODEL CACHE PROMPTS_JSON [TP]   (CACHE: `vllm` for vLLM's own Llama, else an xq kind)
"""

import json
import sys

from vllm import LLM, SamplingParams

MAX_TOKENS = 16
KV_CACHE_BYTES = 1 << 28  # the same cache memory for every run, so capacities compare


def main() -> None:
    model, cache, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    tp = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    extra = {} if cache == "vllm" else {"hf_overrides": {"architectures": ["XqLlamaForCausalLM"], "xq_cache": cache}}
    llm = LLM(model=model, dtype="float32", max_model_len=2048, enforce_eager=True, kv_cache_memory_bytes=KV_CACHE_BYTES,
              tensor_parallel_size=tp, **extra)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    print("XQ-RESULT " + json.dumps([o.outputs[0].text for o in outs]), flush=True)


if __name__ == "__main__":
    main()
