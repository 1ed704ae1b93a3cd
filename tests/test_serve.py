"""`xq serve` end to end: a real server process on 127.0.0.1 (port 0: a free one, read from its startup line),
talked to with the official `openai` client and with raw HTTP for bad input. Tiny GGUF model (byte-level
tokenizer, ChatML template) except the SmolLM2 check that batched answers are `xq generate`'s answers."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import assets
import pytest
from schemas import assert_valid

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

KEY = "test-key"
ROOT = Path(__file__).resolve().parents[1]


class Server:
    """`python -m xqcli serve MODEL ARGS --port 0` in a child process; `url` once it listens."""

    started: list[Server] = []  # every server of the session: none may outlive it (a failed test leaves its own)

    def __init__(self, model: Path | str, *args: str, timeout: float = 90) -> None:
        env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "passive", "PYTHONUNBUFFERED": "1"}
        env.pop("TRITON_INTERPRET", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "xqcli", "serve", str(model), "--port", "0", *args],
                                     cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        Server.started.append(self)
        self.lines: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            line = self.proc.stderr.readline()
            if not line:
                raise AssertionError(f"the server exited ({self.proc.wait()}): {''.join(self.lines)}")
            self.lines.append(line)
            m = re.search(r"on (http://[\d.]+:\d+)/v1", line)
            if m:
                self.url = m.group(1)
                self.startup = line
                break
            if time.monotonic() > deadline:
                raise AssertionError("the server did not start")
        threading.Thread(target=self._drain, daemon=True).start()
        self.host, self.port = self.url.removeprefix("http://").split(":")

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def client(self, key: str = KEY):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def request(self, method: str, path: str, body: bytes | str | dict | None = None, *, key: str | None = KEY,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, int(self.port), timeout=60)
        data = json.dumps(body).encode() if isinstance(body, dict) else body.encode() if isinstance(body, str) else body
        hdrs = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {}) | (headers or {})
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        conn.close()
        return out

    def metrics(self) -> dict[str, float]:
        status, _, text = self.request("GET", "/metrics")
        assert status == 200
        return {line.split()[0]: float(line.split()[1]) for line in text.decode().splitlines()
                if line and not line.startswith("#") and "{" not in line}

    def requests_total(self) -> dict[tuple[str, str], float]:
        """`xq_requests_total` by (endpoint, status)."""
        _, _, text = self.request("GET", "/metrics")
        line = re.compile(r'^xq_requests_total\{endpoint="(\w+)",status="(\d+)"\} (\S+)$', re.MULTILINE)
        found = line.findall(text.decode())
        return {(endpoint, status): float(n) for endpoint, status, n in found}

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@pytest.fixture(scope="session", autouse=True)
def no_server_outlives_the_tests() -> Iterator[None]:
    yield
    for srv in Server.started:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait(30)


@pytest.fixture(scope="module")
def tiny_gguf() -> Path:
    return assets.tiny_gguf("llama")


@pytest.fixture(scope="module")
def server(tiny_gguf) -> Iterator[Server]:
    """4 rows of 256 tokens; the budget holds about 3 rows' worth, so admission by memory is exercised."""
    srv = Server(tiny_gguf, "--cache", "xquant-4", "--window", "16", "--context", "256", "--max-rows", "4",
                 "--budget", "40KiB", "--api-key", KEY)
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def long_server(tiny_gguf) -> Iterator[Server]:
    """2 rows of 4,096 tokens (past the tiny model's 512 trained positions: garbage text, but long answers that
    take seconds) and a budget of 3,072 tokens, less than one full row."""
    srv = Server(tiny_gguf, "--cache", "kv", "--context", "4096", "--allow-long-context", "--max-rows", "2",
                 "--budget", "1536KiB")
    yield srv
    assert srv.stop() == 0


def wait_idle(srv: Server, timeout: float = 10) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = srv.metrics()
        if (m["xq_active_rows"] == 0 and m["xq_queue_depth"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def wait_for(srv: Server, name: str, value: float, timeout: float = 60) -> None:
    """Poll /metrics until `name` reaches `value` (a generous deadline: the machine may be loaded)."""
    deadline = time.monotonic() + timeout
    while srv.metrics()[name] < value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.02)


def test_openai_client_chat_and_completions(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny-llama-v1"]
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Say hi"}]
    whole = client.chat.completions.create(model="tiny-llama-v1", messages=msgs, max_tokens=12)
    assert whole.object == "chat.completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12
    stream = client.chat.completions.create(model="tiny-llama-v1", messages=msgs, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    text = client.completions.create(model="x", prompt="The cat", max_tokens=5, temperature=0.8, top_p=0.9, seed=3)
    again = client.completions.create(model="x", prompt="The cat", max_tokens=5, temperature=0.8, top_p=0.9, seed=3)
    assert text.object == "text_completion" and text.usage.completion_tokens == 5
    assert text.choices[0].text == again.choices[0].text  # a seed reproduces the answer
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="x", prompt="The cat", max_tokens=5, temperature=0.8, top_p=0.9, seed=3, stream=True))
    assert streamed == text.choices[0].text


def test_a_conversation_continued_reuses_its_cached_prefix(server):
    client = server.client()
    msgs = [{"role": "user", "content": "Count to three"}]
    first = client.chat.completions.create(model="x", messages=msgs, max_tokens=6)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    msgs += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And four?"}]
    second = client.chat.completions.create(model="x", messages=msgs, max_tokens=6)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert server.metrics()["xq_reused_prompt_tokens_total"] >= first.usage.prompt_tokens


@pytest.mark.parametrize("body, status, needle, param", [
    ("{not json", 400, "not valid JSON", None),
    ({"model": "x", "messages": [{"role": "user", "content": "hi"}], "tools": []}, 400, "unknown field 'tools'",
     "tools"),
    ({"model": "x", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "must be a number",
     "temperature"),
    ({"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": True}, 400, "integer",
     "max_tokens"),
    ({"model": "x", "messages": [{"role": "robot", "content": "hi"}]}, 400, "role", "messages[0].role"),
    ({"model": "x", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "'n' must be 1", "n"),
    ({"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 250}, 400,
     "max_tokens is 250: 2", "max_tokens"),
    ({"model": "x", "messages": [], "stream": True}, 400, "non-empty list", "messages"),
    ({"model": "x", "messages": [{"role": "user", "content": "hi"}], "min_p": 1}, 400, "'min_p' must be in [0, 1)",
     "min_p"),
    ({"model": "x", "messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 0.5}, 400,
     "leave it out or send 0", "frequency_penalty"),
    # No max_tokens: the prompt alone is too long, and the message does not blame a max_tokens never sent.
    ({"model": "x", "messages": [{"role": "user", "content": "a" * 300}]}, 400, "more than the context of 256",
     "messages"),
])
def test_bad_requests_get_openai_errors_naming_the_field(server, body, status, needle, param):
    code, _headers, raw = server.request("POST", "/v1/chat/completions", body)
    err = json.loads(raw)["error"]
    assert code == status and needle in err["message"] and err["param"] == param
    assert err["type"] == "invalid_request_error"
    if "context" in needle and "max_tokens" not in body:
        assert "max_tokens" not in err["message"] and err["code"] == "context_length_exceeded"


def test_context_overflow_names_the_numbers(server):
    code, _, raw = server.request("POST", "/v1/completions", {"model": "x", "prompt": "a" * 200, "max_tokens": 100})
    assert code == 400 and "more than the context of 256" in json.loads(raw)["error"]["message"]
    code, _, raw = server.request("POST", "/v1/completions", {"model": "x", "prompt": "a" * 300})
    err = json.loads(raw)["error"]
    assert code == 400 and err["param"] == "prompt" and "max_tokens" not in err["message"]


def test_auth_body_limit_and_unknown_routes(server):
    code, headers, raw = server.request("GET", "/v1/models", key=None)
    assert code == 401 and headers["www-authenticate"] == "Bearer" and "API key" in json.loads(raw)["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong").models.list()
    code, _, raw = server.request("GET", "/health", key=None)  # health checks need no key
    assert code == 200
    assert_valid(json.loads(raw), "serve-health")
    code, _, raw = server.request("POST", "/v1/completions", b"{" + b" " * (5 << 20) + b"}")
    assert code == 413 and "limit" in json.loads(raw)["error"]["message"]
    before = server.requests_total()
    code, _, raw = server.request("GET", "/v2/anything")
    assert code == 404 and json.loads(raw)["error"]["type"] == "not_found_error"
    code, headers, raw = server.request("GET", "/v1/chat/completions")
    assert code == 405 and headers["allow"] == "POST"
    assert json.loads(raw)["error"]["message"] == "GET is not allowed on /v1/chat/completions: use POST"
    after = server.requests_total()
    for key in (("other", "404"), ("chat", "405")):
        assert after[key] == before.get(key, 0) + 1


def test_startup_line_and_metrics_show_the_budget(server):
    assert "xquant-4 cache" in server.startup and "127.0.0.1" in server.startup
    tokens = int(re.search(r"holds ([\d,]+) tokens", server.startup).group(1).replace(",", ""))
    kv = int(re.search(r"\(kv: ([\d,]+),", server.startup).group(1).replace(",", ""))
    assert tokens > 2 * kv
    m = server.metrics()
    assert m["xq_cache_budget_tokens"] == tokens and m["xq_cache_budget_bytes"] == 40 << 10
    assert m["xq_rows"] == 4 and m["xq_cache_bytes_allocated"] > 0


def test_a_chat_without_max_tokens_gets_what_the_budget_holds(long_server):
    """The budget holds 3,072 tokens, less than a row of 4,096: a chat without max_tokens is admitted and may
    generate up to what the budget holds for its row (it was refused, blaming a max_tokens never sent)."""
    whole = long_server.client().chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}])
    use = whole.usage
    held = use.prompt_tokens + use.completion_tokens - 1  # the last token is never fed
    assert held <= 3072 and (whole.choices[0].finish_reason == "stop" or held == 3072)


def test_a_client_that_disconnects_before_a_whole_answer_frees_its_row(long_server):
    """A non-streaming request whose client goes away is cancelled: it does not run to its 3,000 tokens."""
    before = long_server.metrics()["xq_generated_tokens_total"]
    gone = long_server.requests_total().get(("completion", "499"), 0)
    sock = socket.create_connection((long_server.host, int(long_server.port)), timeout=30)
    body = json.dumps({"model": "x", "prompt": "go", "max_tokens": 3000}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    wait_for(long_server, "xq_active_rows", 1)
    sock.close()
    deadline = time.monotonic() + 60
    while long_server.requests_total().get(("completion", "499"), 0) == gone:
        assert time.monotonic() < deadline, "the request was never cancelled"
        time.sleep(0.05)
    m = wait_idle(long_server)
    assert m["xq_active_rows"] == 0 and m["xq_cache_bytes_reserved"] == 0
    assert m["xq_generated_tokens_total"] - before < 3000


def stream_and_drop(srv: Server, max_tokens: int, after: int) -> int:
    """Open a chat stream, read `after` data lines, then drop the connection; data lines read."""
    sock = socket.create_connection((srv.host, int(srv.port)), timeout=30)
    body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "go on"}], "max_tokens": max_tokens,
                       "stream": True}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode() +
                 b"\r\n\r\n" + body)
    seen, buf = 0, b""
    while seen < after:
        part = sock.recv(4096)
        assert part, "the stream ended early"
        buf += part
        seen = buf.count(b"data: ")
    sock.close()
    return seen


def test_a_client_that_disconnects_frees_its_row(server):
    before = server.metrics()["xq_generated_tokens_total"]
    stream_and_drop(server, max_tokens=200, after=3)
    m = wait_idle(server, timeout=5)
    assert m["xq_active_rows"] == 0 and m["xq_cache_bytes_reserved"] == 0
    assert m["xq_generated_tokens_total"] - before < 100  # cancelled, not run to its 200 tokens


def test_load_32_concurrent_streams_some_cancelled(server):
    """32 streaming requests of mixed lengths at once over 4 rows and a budget of about 3 full rows; every
    fourth is dropped mid-way. Each other one ends complete; afterwards nothing is left running or reserved."""
    def one(i: int) -> str:
        if i % 4 == 3:
            stream_and_drop(server, max_tokens=120, after=2)
            return "dropped"
        client = server.client()
        n = 5 + (i * 7) % 60
        chunks = list(client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": f"request {i} " + "x" * (i * 3)}], max_tokens=n,
            stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens == n
        return [c.choices[0].finish_reason for c in chunks if c.choices][-1]

    held, busy, stop = [], [], threading.Event()

    def watch() -> None:  # the budget holds while the load runs, not only after it
        while not stop.is_set():
            m = server.metrics()
            held.append(m["xq_cache_bytes_held"] <= m["xq_cache_budget_bytes"])
            busy.append(m["xq_active_rows"])
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    stop.set()
    watcher.join()
    assert results.count("dropped") == 8 and results.count("length") == 24
    assert all(held) and max(busy) >= 2  # several rows ran at once, and never past the budget
    m = wait_idle(server)
    assert m["xq_active_rows"] == 0 and m["xq_queue_depth"] == 0 and m["xq_cache_bytes_reserved"] == 0
    assert m["xq_cache_bytes_held"] <= m["xq_cache_budget_bytes"]
    assert m["xq_idle_rows"] <= 4


def test_queue_full_429_then_sigterm_finishes_in_flight_and_exits_0(tiny_gguf):
    # The running request is long (2,000 tokens: seconds even for the tiny model, trained on 512 positions:
    # the text past them does not matter here) so that it still runs, and the second one still waits, when
    # the third arrives; the second is sent once the first streams (sent together, either may get the row).
    srv = Server(tiny_gguf, "--cache", "kv", "--context", "2048", "--allow-long-context", "--max-rows", "1",
                 "--max-queue", "1", "--shutdown-timeout", "120")
    assert "| 1 row x 2,048 tokens," in srv.startup
    client = srv.client()
    conns = []
    for max_tokens in (2000, 400):  # one runs, one waits
        body = {"model": "x", "prompt": "go", "max_tokens": max_tokens, "stream": True}
        c = http.client.HTTPConnection(srv.host, int(srv.port), timeout=180)
        c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        conns.append(c)
        if len(conns) == 1:
            running = c.getresponse()
            assert running.status == 200 and running.readline().startswith(b"data: ")
    deadline = time.monotonic() + 30
    while srv.metrics()["xq_queue_depth"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.metrics()["xq_queue_depth"] == 1
    code, headers, raw = srv.request("POST", "/v1/completions", {"model": "x", "prompt": "hi", "max_tokens": 4})
    assert code == 429 and headers["retry-after"] == "1" and json.loads(raw)["error"]["code"] == "queue_full"
    assert "1 request is already waiting for a row" in json.loads(raw)["error"]["message"]
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="x", prompt="hi", max_tokens=4)
    srv.proc.send_signal(signal.SIGTERM)
    rest = running.read().decode()  # the running stream finishes after SIGTERM
    assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason": "length"' in rest
    waiting = conns[1].getresponse().read().decode()
    assert waiting.rstrip().endswith("data: [DONE]")  # it ran, or was told why not, and ended cleanly
    assert srv.stop() == 0
    with pytest.raises(OSError):
        socket.create_connection((srv.host, int(srv.port)), timeout=2)


def test_sigterm_past_the_timeout_ends_every_request_with_its_error(tiny_gguf):
    """--shutdown-timeout 0 with two long requests running and one waiting: the engine stops them, so the
    stream ends with the shutdown error event and [DONE], the whole answer and the waiting request get the
    503 error object; nothing is cut or answered in plain text, no traceback, exit 0."""
    srv = Server(tiny_gguf, "--cache", "kv", "--context", "4096", "--allow-long-context", "--max-rows", "2",
                 "--shutdown-timeout", "0")
    conns = [http.client.HTTPConnection(srv.host, int(srv.port), timeout=60) for _ in range(3)]
    headers = {"Content-Type": "application/json"}
    conns[0].request("POST", "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "go"}], "max_tokens": 4000, "stream": True}), headers)
    stream = conns[0].getresponse()
    assert stream.status == 200 and stream.readline().startswith(b"data: ")
    conns[1].request("POST", "/v1/completions", json.dumps({"prompt": "go", "max_tokens": 4000}), headers)
    wait_for(srv, "xq_active_rows", 2)
    conns[2].request("POST", "/v1/completions", json.dumps({"prompt": "go", "max_tokens": 4000}), headers)
    wait_for(srv, "xq_queue_depth", 1)
    srv.proc.send_signal(signal.SIGTERM)
    events = [line for line in stream.read().decode().splitlines() if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "shutting_down"
    for conn in conns[1:]:
        resp = conn.getresponse()
        assert resp.status == 503 and resp.getheader("content-type") == "application/json"
        assert json.loads(resp.read())["error"]["code"] == "shutting_down"
    assert srv.stop() == 0
    time.sleep(0.2)  # the stderr reader thread takes the last lines
    assert not any("Traceback" in line or "Cancel" in line for line in srv.lines), "".join(srv.lines)


def test_sizes_must_be_positive(capsys):
    from xqcli.cli import main

    for option, value in (("--max-body", "0B"), ("--budget", "0")):
        assert main(["serve", "anything", option, value]) == 2
        assert f"{option} {value}: the size must be positive" in capsys.readouterr().err


def test_missing_serve_extra_exits_6(monkeypatch, capsys):
    from xqcli.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["serve", "anything"]) == 6
    assert "pip install 'xqcli[serve]'" in capsys.readouterr().err


def test_a_taken_port_is_bad_input(capsys):
    from xqcli.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        assert main(["serve", "anything", "--port", str(s.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_a_budget_that_holds_no_request_is_refused_at_startup(tiny_gguf):
    # the tiny model's kv row: 512 B per token, so 1,000 B hold one token, and a request needs two
    proc = subprocess.run([sys.executable, "-m", "xqcli", "serve", str(tiny_gguf), "--port", "0", "--budget", "1000B",
                           "--cache", "kv"], capture_output=True, text=True, timeout=120)  # a server would not end
    err = proc.stderr
    assert proc.returncode == 7 and "holds no request: a row of 2 tokens of kv needs 1.00 KiB" in err and "raise --budget" in err


@pytest.mark.slow
def test_sixteen_concurrent_greedy_requests_are_xq_generate_texts_smollm2(smollm2_dir):
    """SmolLM2 over HTTP: 16 concurrent greedy completions return exactly the text each prompt gets from
    `xq generate` alone (the same code path: `Engine.generate`, context = prompt + max_tokens)."""
    from xqcli.engine import Engine, collect
    from xqcli.load import load

    prompts = [f"{topic} is" for topic in ("The capital of France", "Water", "A cat", "The moon", "Python",
                                          "Music", "The ocean", "A good book", "Coffee", "Winter", "The sun",
                                          "A computer", "Chess", "Mathematics", "A forest", "Bread")]
    srv = Server(smollm2_dir, "--cache", "xquant-4", "--context", "128", "--max-rows", "16")
    try:
        client = srv.client()
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda p: client.completions.create(model="x", prompt=p, max_tokens=12)
                                .choices[0].text, prompts))
    finally:
        assert srv.stop() == 0
    loaded = load(smollm2_dir, device="cpu")
    tok = loaded.tokenizer()
    for p, text in zip(prompts, got):
        ids = tok.encode(p)
        engine = Engine(loaded.model, tok, "xquant-4", context=len(ids) + 12, artifacts=loaded.artifacts)
        assert text == collect(engine.generate(ids, max_tokens=12))[0]["text"], p
