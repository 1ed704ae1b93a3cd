"""xqcli.tokenizer against transformers on small BPE tokenizers trained offline in a temp folder.

Three folders cover the layouts Llama-family models ship: SmolLM2-like (byte-level BPE, ChatML, no
BOS), Llama-3-like (byte-level BPE, BOS added by the tokenizer.json post-processor, several EOS ids)
and Llama-2-like (SentencePiece-style BPE with byte fallback and a leading-space-stripping decoder).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers

from xqcli.errors import InputError, ModelError
from xqcli.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")  # the reference implementation (test extra)

SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + strftime_now("%d %b %Y") + "\\n\\n" }}
{%- if tools is not none %}
    {{- "You may call these functions:\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

SAMPLE = (
    "The quick brown fox jumps over the lazy dog. Naïve café owners in Zürich serve crème brûlée — "
    "¿qué tal? Ελληνικά, русский текст, 日本語のテキスト, 中文字符, 한국어, עברית, العربية.\n"
    "Emoji: 😀🎉👩‍👩‍👧‍👦🏳️‍🌈 and flags 🇫🇷🇯🇵; math: ∀x∈ℝ, x²≥0; ①②③.\n\n"
    'def fib(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n'
    "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "\tTabs\tand   multiple   spaces,\r\nwindows newlines, trailing spaces   \n"
    "Special tokens inline: <|im_start|>user\nhi<|im_end|> and <|endoftext|>.\n"
)


def _corpus() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics)[:40])


def _long_text() -> str:
    return SAMPLE + _corpus()[:3000] + SAMPLE


def _write(folder: Path, files: dict[str, object]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content)
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def byte_bpe() -> str:
    """A trained byte-level BPE (GPT-2/SmolLM2/Llama-3 family), serialized."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1500,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_corpus()], trainer)
    return tok.to_str()


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory: pytest.TempPathFactory, byte_bpe: str) -> Path:
    folder = tmp_path_factory.mktemp("smol")
    (folder / "tokenizer.json").write_text(byte_bpe, encoding="utf-8")
    return _write(
        folder,
        {
            "tokenizer_config.json": {
                "tokenizer_class": "GPT2Tokenizer",
                "bos_token": "<|im_start|>",
                "eos_token": {
                    "__type": "AddedToken",
                    "content": "<|im_end|>",
                    "normalized": False,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "special": True,
                },
                "unk_token": "<|endoftext|>",
                "pad_token": "<|im_end|>",
                "clean_up_tokenization_spaces": False,
                "chat_template": SMOL_TEMPLATE,
            },
            "config.json": {"model_type": "llama", "bos_token_id": 1, "eos_token_id": 2},
            "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2},
        },
    )


def _llama3_backend(byte_bpe: str) -> str:
    """The byte-level BPE with Llama 3's special tokens and its BOS-adding post-processor."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend
    from tokenizers.processors import TemplateProcessing

    tok = Backend.from_str(byte_bpe)
    names = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
    ]
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    return tok.to_str()


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory: pytest.TempPathFactory, byte_bpe: str) -> Path:
    folder = tmp_path_factory.mktemp("llama3")
    backend = _llama3_backend(byte_bpe)
    (folder / "tokenizer.json").write_text(backend, encoding="utf-8")
    ids = {
        n: tokenizers.Tokenizer.from_str(backend).token_to_id(n)
        for n in ("<|begin_of_text|>", "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
    }
    return _write(
        folder,
        {
            "tokenizer_config.json": {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|eot_id|>",
                "clean_up_tokenization_spaces": True,
                "chat_template": LLAMA3_TEMPLATE,
            },
            "config.json": {
                "model_type": "llama",
                "bos_token_id": ids["<|begin_of_text|>"],
                "eos_token_id": ids["<|end_of_text|>"],
            },
            "generation_config.json": {
                "bos_token_id": ids["<|begin_of_text|>"],
                "eos_token_id": [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]],
            },
        },
    )


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-2-style folder: Metaspace BPE with byte fallback and a decoder that strips one leading space."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = Backend(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=900, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens, limit_alphabet=60
    )
    tok.train_from_iterator([_corpus()], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    folder = tmp_path_factory.mktemp("sp")
    tok.save(str(folder / "tokenizer.json"))
    return _write(
        folder,
        {
            "tokenizer_config.json": {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "add_bos_token": True,
                "add_eos_token": False,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
            },
        },
    )


def _hf(folder: Path):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


CONVERSATIONS = {
    "with_system": [
        {"role": "system", "content": "You are terse. Réponds en français si besoin. 🤖"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And in Japanese? 日本語で"},
    ],
    "without_system": [
        {"role": "user", "content": "Write def f(x):\n    return x"},
        {"role": "assistant", "content": "def f(x):\n    return x  # done ✅"},
        {"role": "user", "content": "  Thanks!  "},
    ],
}


@pytest.mark.parametrize("folder", ["smol_dir", "llama3_dir", "sp_dir"])
def test_encode_and_decode_match_transformers(folder: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(folder)
    ours, theirs = Tokenizer.from_folder(path), _hf(path)
    text = _long_text()
    assert len(text) > 3000
    ids = ours.encode(text)
    assert ids == theirs(text)["input_ids"]
    assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"]
    assert ours.encode("") == theirs("")["input_ids"]
    assert ours.decode(ids) == theirs.decode(ids, clean_up_tokenization_spaces=False)
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(
        ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    assert ours.vocab_size == len(theirs)


def test_special_token_facts(smol_dir: Path, llama3_dir: Path) -> None:
    smol = Tokenizer.from_folder(smol_dir)
    assert (smol.bos_token, smol.eos_token, smol.bos_id, smol.eos_ids) == (
        "<|im_start|>",
        "<|im_end|>",
        1,
        [2],
    )
    assert not smol.add_bos and smol.encode("hi")[0] != smol.bos_id

    llama = Tokenizer.from_folder(llama3_dir)
    hf = _hf(llama3_dir)
    bos, eot = hf.convert_tokens_to_ids("<|begin_of_text|>"), hf.convert_tokens_to_ids("<|eot_id|>")
    eom, eos = hf.convert_tokens_to_ids("<|eom_id|>"), hf.convert_tokens_to_ids("<|end_of_text|>")
    assert llama.add_bos and llama.bos_id == bos and llama.bos_token == "<|begin_of_text|>"
    assert llama.eos_ids == [eos, eom, eot]  # generation_config order, then config, then tokenizer
    assert llama.eos_token == "<|eot_id|>"
    assert llama.encode("hi")[:2].count(bos) == 1


def test_add_bos_flag_never_doubles_bos(tmp_path: Path, llama3_dir: Path) -> None:
    """The post-processor already adds BOS: add_bos_token=true must not add a second, false removes it."""
    backend = (llama3_dir / "tokenizer.json").read_text(encoding="utf-8")
    config = json.loads((llama3_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    bos = Tokenizer.from_folder(llama3_dir).bos_id
    for flag, expected_bos in ((True, 1), (False, 0)):
        folder = _write(tmp_path / str(flag), {"tokenizer_config.json": {**config, "add_bos_token": flag}})
        (folder / "tokenizer.json").write_text(backend, encoding="utf-8")
        tok = Tokenizer.from_folder(folder)
        ids = tok.encode("hello world")
        assert ids.count(bos) == expected_bos and tok.add_bos is flag
        assert ids[expected_bos:] == tok.encode("hello world", add_special_tokens=False)
    eos_folder = _write(tmp_path / "eos", {"tokenizer_config.json": {**config, "add_eos_token": True}})
    (eos_folder / "tokenizer.json").write_text(backend, encoding="utf-8")
    tok = Tokenizer.from_folder(eos_folder)
    assert (
        tok.encode("hi")[-1] == tok.eos_ids[-1] and not tok.add_bos
    )  # as transformers' update_post_processor


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("folder", ["smol_dir", "llama3_dir"])
def test_chat_template_matches_transformers(
    folder: str, conversation: str, add_generation_prompt: bool, request: pytest.FixtureRequest
) -> None:
    path = request.getfixturevalue(folder)
    ours, theirs = Tokenizer.from_folder(path), _hf(path)
    messages = CONVERSATIONS[conversation]
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == theirs.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    ids = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ids == theirs.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    if folder == "llama3_dir":
        assert text.startswith("<|begin_of_text|>") and ids.count(ours.bos_id) == 1


def test_smol_template_text(smol_dir: Path) -> None:
    text = Tokenizer.from_folder(smol_dir).apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tools_tojson_and_extra_variables_match_transformers(llama3_dir: Path) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "météo",
                "description": "Wetter <heute> & morgen 🌦",
                "parameters": {"type": "object", "properties": {}},
            },
        }
    ]
    messages = [{"role": "user", "content": "Weather?", "tool_calls": None}]
    ours = Tokenizer.from_folder(llama3_dir).apply_chat_template(messages, tools=tools)
    assert ours == _hf(llama3_dir).apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=False
    )
    assert '"name": "météo"' in ours and "<heute> & morgen 🌦" in ours  # no ASCII or HTML escaping
    assert '\n    "type": "function"' in ours  # indent=4 honored


def test_raise_exception_is_an_input_error(llama3_dir: Path) -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(InputError, match="roles must alternate"):
        Tokenizer.from_folder(llama3_dir).apply_chat_template(messages)
    with pytest.raises(Exception, match="roles must alternate"):
        _hf(llama3_dir).apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize("folder", ["smol_dir", "llama3_dir", "sp_dir"])
def test_stream_decoder_equals_decode(folder: str, request: pytest.FixtureRequest) -> None:
    tok = Tokenizer.from_folder(request.getfixturevalue(folder))
    text = SAMPLE + " Leading space after special: <|im_end|> tail, and 🇯🇵 again."
    ids = tok.encode(text)
    for skip in (False, True):
        stream = tok.stream_decoder(skip_special_tokens=skip)
        pieces = [stream.feed(i) for i in ids]
        pieces.append(stream.flush())
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in p for p in pieces)  # no half characters ever reach the terminal


def test_stream_decoder_holds_partial_characters(smol_dir: Path) -> None:
    tok = Tokenizer.from_folder(smol_dir)
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1  # the tiny vocabulary splits the emoji's four bytes
    stream = tok.stream_decoder()
    assert [stream.feed(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert stream.feed(ids[-1]) == "😀"
    assert stream.flush() == ""
    partial = tok.stream_decoder()
    partial.feed(ids[0])
    assert partial.flush() == tok.decode(ids[:1])  # an unfinished character is returned at the end


def test_stream_decoder_goes_on_through_invalid_bytes(sp_dir: Path) -> None:
    """Junk a model may sample: with byte fallback, ',' then a lone lead byte decode as two U+FFFD once
    the next token arrives, which `DecodeStream` refuses; the stream keeps going from what it emitted."""
    tok = Tokenizer.from_folder(sp_dir)
    ids = [tok._backend.token_to_id(t) for t in ("<0x2C>", "<0xC9>", "<unk>")]
    stream = tok.stream_decoder()
    pieces = [stream.feed(i) for i in ids] + [stream.flush()]
    assert pieces == [",", "", "\ufffd<unk>", ""]
    assert tok.decode(ids) == "\ufffd\ufffd<unk>"  # why no stream can match it: ',' was already out


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    _write(tmp_path, {"tokenizer_config.json": {"bos_token": "<s>"}})
    with pytest.raises(ModelError, match="tokenizer.json") as info:
        Tokenizer.from_folder(tmp_path)
    assert str(tmp_path) in str(info.value) and "required" in str(info.value)


def test_corrupt_tokenizer_json(tmp_path: Path) -> None:
    _write(tmp_path, {"tokenizer.json": "{not json"})
    with pytest.raises(ModelError, match="cannot load"):
        Tokenizer.from_folder(tmp_path)


def test_no_chat_template(sp_dir: Path) -> None:
    tok = Tokenizer.from_folder(sp_dir)
    assert tok.chat_template is None
    with pytest.raises(
        InputError, match="has no chat template; pass --chat-template FILE or use plain prompts"
    ):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def _folder_with(tmp_path: Path, byte_bpe: str, name: str, files: dict[str, object]) -> Path:
    folder = _write(tmp_path / name, files)
    (folder / "tokenizer.json").write_text(byte_bpe, encoding="utf-8")
    return folder


def test_chat_template_sources(tmp_path: Path, byte_bpe: str) -> None:
    hello = [{"role": "user", "content": "hi"}]
    named = _folder_with(
        tmp_path,
        byte_bpe,
        "named",
        {
            "tokenizer_config.json": {
                "chat_template": [
                    {"name": "tool_use", "template": "TOOLS"},
                    {"name": "default", "template": "DEFAULT {{ messages[0].content }}"},
                ]
            }
        },
    )
    assert Tokenizer.from_folder(named).apply_chat_template(hello) == "DEFAULT hi"

    no_default = _folder_with(
        tmp_path,
        byte_bpe,
        "nodefault",
        {"tokenizer_config.json": {"chat_template": [{"name": "tool_use", "template": "TOOLS"}]}},
    )
    with pytest.raises(InputError, match="tool_use"):
        Tokenizer.from_folder(no_default).apply_chat_template(hello)

    jinja = _folder_with(
        tmp_path,
        byte_bpe,
        "jinja",
        {
            "tokenizer_config.json": {"chat_template": "CONFIG"},
            "chat_template.jinja": "JINJA {{ eos_token }}",
        },
    )
    assert (
        Tokenizer.from_folder(jinja).apply_chat_template(hello) == "JINJA "
    )  # undefined tokens render empty
    assert _hf(jinja).apply_chat_template(hello, tokenize=False) == "JINJA "

    as_json = _folder_with(tmp_path, byte_bpe, "json", {"chat_template.json": {"chat_template": "JSON"}})
    assert Tokenizer.from_folder(as_json).apply_chat_template(hello) == "JSON"


def test_chat_template_override_file(tmp_path: Path, smol_dir: Path) -> None:
    hello = [{"role": "user", "content": "hi"}]
    raw = _write(
        tmp_path,
        {
            "t.jinja": "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}",
            "t.json": {"chat_template": "J{{ bos_token }}"},
            "bad.jinja": "{% for %}",
        },
    )
    assert (
        Tokenizer.from_folder(smol_dir, chat_template_file=raw / "t.jinja").apply_chat_template(hello)
        == "[user]hi"
    )
    tok = Tokenizer.from_folder(smol_dir)
    tok.use_chat_template_file(raw / "t.json")
    assert tok.apply_chat_template(hello) == "J<|im_start|>"
    with pytest.raises(InputError, match="cannot read chat template"):
        tok.use_chat_template_file(raw / "missing.jinja")
    tok.use_chat_template_file(raw / "bad.jinja")
    with pytest.raises(InputError, match="not valid Jinja"):
        tok.apply_chat_template(hello)


def test_broken_model_template_is_a_model_error(tmp_path: Path, byte_bpe: str) -> None:
    folder = _folder_with(tmp_path, byte_bpe, "broken", {"chat_template.jinja": "{% if %}"})
    with pytest.raises(ModelError, match="not valid Jinja"):
        Tokenizer.from_folder(folder).apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_sandbox_and_generation_tag(tmp_path: Path, byte_bpe: str) -> None:
    template = (
        "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% if loop.last %}"
        "{% break %}{% endif %}{% endfor %}{{ messages.append(1) if mutate else '' }}"
    )
    folder = _folder_with(tmp_path, byte_bpe, "gen", {"chat_template.jinja": template})
    tok = Tokenizer.from_folder(folder)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], mutate=False) == "x"
    with pytest.raises(InputError):  # ImmutableSandboxedEnvironment forbids mutating the inputs
        tok.apply_chat_template([{"role": "user", "content": "x"}], mutate=True)


def test_import_is_lazy() -> None:
    code = "import sys, xqcli.tokenizer; print('tokenizers' in sys.modules, 'jinja2' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
