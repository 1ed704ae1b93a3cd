"""The tokenizer rebuilt from GGUF metadata: tokenizer.json text, tokenizer_config, generation_config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from xqcli.errors import GGUFError
from xqcli.sources.gguf.reader import one_line

SUPPORTED_TOKENIZERS = ("gpt2", "llama")

# Pre-tokenizer split patterns for `tokenizer.ggml.pre` values whose merges were learned on them
# (the patterns of the original tokenizer.json files); anything else uses GPT-2's, as transformers does.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def build_tokenizer(kv: dict[str, Any], config: dict[str, Any], path: Path
                    ) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """tokenizer.json text, tokenizer_config and generation_config; fills the config's bos/eos ids."""
    kind = kv.get("tokenizer.ggml.model")
    tokens = kv.get("tokenizer.ggml.tokens")
    if not isinstance(kind, str):
        raise GGUFError(f"{path}: required metadata 'tokenizer.ggml.model' is missing")
    if kind not in SUPPORTED_TOKENIZERS:
        raise GGUFError(f"{path}: tokenizer model {kind!r} is not supported "
                        f"(supported: {', '.join(SUPPORTED_TOKENIZERS)})")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise GGUFError(f"{path}: required metadata 'tokenizer.ggml.tokens' is missing or not a string list")
    if len(tokens) > config["vocab_size"]:
        raise GGUFError(f"{path}: the tokenizer has {len(tokens)} tokens but the embedding only "
                        f"{config['vocab_size']} rows")
    types = kv.get("tokenizer.ggml.token_type", [])
    if not isinstance(types, list) or len(types) not in (0, len(tokens)):
        raise GGUFError(f"{path}: metadata 'tokenizer.ggml.token_type' does not match the token list")

    def token_id(key: str, strict: bool) -> int | None:
        v = kv.get(f"tokenizer.ggml.{key}")
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(tokens):
            return v
        if v is not None and strict:
            raise GGUFError(f"{path}: metadata 'tokenizer.ggml.{key}' = {v!r} is not a token id")
        return None

    bos, eos = token_id("bos_token_id", True), token_id("eos_token_id", True)
    unk, pad = token_id("unknown_token_id", False), token_id("padding_token_id", False)
    eot = token_id("eot_token_id", False)
    if kind == "gpt2":
        backend = _byte_level_bpe(kv, tokens, types, path)
    else:
        backend = _sentencepiece_bpe(kv, tokens, types, unk, path)
    add_bos = kv.get("tokenizer.ggml.add_bos_token", kind == "llama")  # llama.cpp's default for SPM vocabs
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[bos] if bos is not None else None,
        "eos_token": tokens[eos] if eos is not None else None,
        "unk_token": tokens[unk] if unk is not None else None,
        "pad_token": tokens[pad] if pad is not None else None,
        "add_bos_token": bool(add_bos),
        "add_eos_token": bool(kv.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    template = kv.get("tokenizer.chat_template")
    if isinstance(template, str):
        tokenizer_config["chat_template"] = template
    config["bos_token_id"], config["eos_token_id"] = bos, eos
    stops = list(dict.fromkeys(i for i in (eos, eot) if i is not None))  # chat models stop on either
    generation_config = {"bos_token_id": bos, "eos_token_id": stops[0] if len(stops) == 1 else stops or None}
    if pad is not None:
        generation_config["pad_token_id"] = pad
    return backend.to_str(), tokenizer_config, generation_config


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _merge_pairs(merges: Any, path: Path) -> list[tuple[str, str]]:
    if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
        raise GGUFError(f"{path}: metadata 'tokenizer.ggml.merges' is not a string list")
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = next((m for m, p in zip(merges, pairs) if len(p) != 2), None)
    if bad is not None:
        raise GGUFError(f"{path}: metadata 'tokenizer.ggml.merges' has a malformed entry {bad!r}")
    return pairs  # type: ignore[return-value]


def _build(path: Path, make: Callable[[], Any]) -> Any:
    """Run a tokenizers constructor; its Rust errors (e.g. a merge of unknown tokens) become GGUFErrors."""
    try:
        return make()
    except Exception as e:  # noqa: BLE001 (tokenizers raises plain Exception)
        raise GGUFError(f"{path}: the GGUF tokenizer is inconsistent ({one_line(e)})") from None


def _byte_level_bpe(kv: dict[str, Any], tokens: list[str], types: list[int], path: Path) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    b2u = _bytes_to_unicode()
    alphabet = set(b2u.values())
    # A token stored in plain text rather than the byte alphabet is respelled, as transformers does.
    spelled = [t if set(t) <= alphabet else "".join(b2u[b] for b in t.encode("utf-8")) for t in tokens]
    merges = _merge_pairs(kv.get("tokenizer.ggml.merges"), path)
    tk = _build(path, lambda: Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(spelled)}, merges=merges)))
    split = _PRE_SPLITS.get(kv.get("tokenizer.ggml.pre"))
    if split is None:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                             use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    # A control token outside the byte alphabet is a llama.cpp mislabel; adding it would grow the vocab.
    _add_tokens(tk, tokens, types, keep=lambda t: set(t) <= alphabet)
    return tk


def _sentencepiece_bpe(kv: dict[str, Any], tokens: list[str], types: list[int], unk: int | None,
                       path: Path) -> Any:
    """Llama/Mistral-style SentencePiece BPE with byte fallback; merges come from the scores when absent."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in kv:
        merges = _merge_pairs(kv["tokenizer.ggml.merges"], path)
    else:
        scores = kv.get("tokenizer.ggml.scores")
        if not isinstance(scores, list) or len(scores) != len(tokens):
            raise GGUFError(f"{path}: a sentencepiece tokenizer needs 'tokenizer.ggml.scores' or merges")
        merges = _merges_from_scores(vocab, dict(zip(tokens, scores)))
    unk_token = tokens[unk] if unk is not None else None
    tk = _build(path, lambda: Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk_token,
                                                   fuse_unk=True, byte_fallback=True)))
    prefix = bool(kv.get("tokenizer.ggml.add_space_prefix", True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    _add_tokens(tk, tokens, types, keep=lambda t: True)
    return tk


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two vocab pieces, best score first (what sentencepiece BPE merges)."""
    found = []
    for token, score in scores.items():
        if len(token) > 1024:  # no real piece is this long; splitting it would cost len**2
            continue
        local = [(token[:k], token[k:], score) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        found += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


def _add_tokens(tk: Any, tokens: list[str], types: list[int], keep: Callable[[str], bool]) -> None:
    """Control tokens (e.g. <|im_start|>) become special; user-defined ones match whole but stay text."""
    from tokenizers import AddedToken

    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
               if k == _CONTROL and keep(t)]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types)
            if k == _USER_DEFINED and keep(t)]
    if control:
        tk.add_special_tokens(control)
    if user:
        tk.add_tokens(user)

