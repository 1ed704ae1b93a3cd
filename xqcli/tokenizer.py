"""Text <-> token ids for Hugging Face model folders, byte-compatible with `transformers`.

Encoding runs the folder's `tokenizer.json` through the `tokenizers` library (the same Rust code
`transformers` uses), and chat templates render in a Jinja sandbox configured the way
`transformers` configures it, so a prompt xq builds is token-for-token the prompt the reference
implementation builds. `tokenizers` and `jinja2` are imported lazily: the CLI must start fast.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from xqcli.errors import InputError, ModelError, XQError

if TYPE_CHECKING:
    import jinja2
    import tokenizers

# The named special tokens `transformers` exposes to chat templates (its `special_tokens_map`).
_SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


# Bounds of one chat-template rendering: the sandbox bounds each range(), these bound the total work, so
# nested loops, huge repetitions or powers end with an error instead of running for hours.
MAX_LOOP_STEPS = 1_000_000  # iterations of all `for` loops together
MAX_RENDER_CHARS = 1 << 24  # characters of output (a prompt of ~4M tokens)
MAX_POWER_BITS = 1 << 16  # size of an integer `a ** b` may produce


class ChatTemplateError(Exception):
    """Raised by a template's `raise_exception(...)`: the conversation breaks the template's rules."""


class TemplateLimitError(Exception):
    """A chat template's rendering went past one of the bounds above."""


def _read_json(path: Path, error: type[XQError] = ModelError) -> dict[str, Any]:
    """Parse an optional JSON side file; an absent file reads as empty, a corrupt one is an `error`."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise error(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise error(f"{path} is not a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    """Special tokens are stored as plain strings or as serialized AddedToken dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value: Any) -> list[int]:
    """`*_token_id` entries in config files may be one int, a list of ints, or null."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _named_templates(value: Any) -> dict[str, str] | str | None:
    """Normalize a `chat_template` entry: one template string, or named templates (list or dict form)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return {
            t["name"]: t["template"] for t in value if isinstance(t, dict) and "name" in t and "template" in t
        }
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if isinstance(v, str)}
    return None


class Tokenizer:
    """A model's tokenizer plus the special-token and chat-template facts around it."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        name: str,
        special_tokens: dict[str, str],
        eos_ids: list[int],
        bos_id: int | None,
        chat_template: str | None,
        chat_template_source: str,
        template_names: tuple[str, ...] = (),
        error: type[XQError] = ModelError,
    ) -> None:
        self._backend = backend
        self.name = name  # the folder, for messages
        self._special_tokens = special_tokens  # only the tokens the folder defines, as templates see them
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.bos_token: str | None = special_tokens.get("bos_token") or self._token(bos_id)
        self.eos_token: str | None = special_tokens.get("eos_token") or self._token(
            eos_ids[0] if eos_ids else None
        )
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.base_vocab_size: int = backend.get_vocab_size(with_added_tokens=False)  # without added special tokens
        self.chat_template = chat_template
        self._chat_template_source = chat_template_source
        self._chat_template_overridden = False
        self._template_names = template_names
        self._error = error  # what a problem of the folder's own files is: ModelError, BundleError in a bundle
        probe_plain = backend.encode("a", add_special_tokens=False).ids
        probe_full = backend.encode("a", add_special_tokens=True).ids
        self.add_bos: bool = bos_id is not None and probe_full[:1] == [bos_id] and probe_plain[:1] != [bos_id]

    @classmethod
    def from_folder(cls, path: str | Path, chat_template_file: str | Path | None = None, *,
                    error: type[XQError] = ModelError) -> Tokenizer:
        """Load from an HF folder (tokenizer.json required; configs and template files optional). Problems of
        the folder's files raise `error`: a model source's are ModelError (3), a bundle's BundleError (4)."""
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise error(
                f"{folder} has no tokenizer.json: a tokenizer.json (HF fast tokenizer) is required",
                hint="re-save it with transformers' save_pretrained, or download the full model repo",
            )
        from tokenizers import Tokenizer as Backend

        try:
            backend = Backend.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust side reports every parse failure as a plain Exception
            raise error(f"cannot load {tokenizer_file}: {e}") from e

        tok_config = _read_json(folder / "tokenizer_config.json", error)
        legacy_map = _read_json(folder / "special_tokens_map.json", error)
        model_config = _read_json(folder / "config.json", error)
        gen_config = _read_json(folder / "generation_config.json", error)

        special_tokens: dict[str, str] = {}
        for key in _SPECIAL_TOKEN_KEYS:
            content = _token_content(tok_config.get(key)) or _token_content(legacy_map.get(key))
            if content is not None:
                special_tokens[key] = content

        cls._apply_bos_eos_flags(backend, tok_config, special_tokens)

        bos_id = backend.token_to_id(special_tokens["bos_token"]) if "bos_token" in special_tokens else None
        if bos_id is None:
            bos_ids = _id_list(gen_config.get("bos_token_id")) or _id_list(model_config.get("bos_token_id"))
            bos_id = bos_ids[0] if bos_ids else None

        eos_ids: list[int] = []
        tokenizer_eos = (
            backend.token_to_id(special_tokens["eos_token"]) if "eos_token" in special_tokens else None
        )
        for i in (
            _id_list(gen_config.get("eos_token_id"))
            + _id_list(model_config.get("eos_token_id"))
            + _id_list(tokenizer_eos)
        ):
            if i not in eos_ids:
                eos_ids.append(i)

        template, source = cls._find_chat_template(folder, tok_config, error)
        names: tuple[str, ...] = ()
        if isinstance(template, dict):
            names = tuple(sorted(template))
            template = template.get("default")
        tokenizer = cls(
            backend,
            name=str(folder),
            special_tokens=special_tokens,
            eos_ids=eos_ids,
            bos_id=bos_id,
            chat_template=template,
            chat_template_source=source,
            template_names=names,
            error=error,
        )
        if chat_template_file is not None:
            tokenizer.use_chat_template_file(chat_template_file)
        return tokenizer

    @staticmethod
    def _apply_bos_eos_flags(
        backend: tokenizers.Tokenizer, tok_config: dict[str, Any], special_tokens: dict[str, str]
    ) -> None:
        """Honor explicit `add_bos_token`/`add_eos_token` the way transformers' Llama tokenizers do.

        When either flag is present the post-processor is rebuilt to add exactly the requested tokens,
        so a tokenizer.json that already adds BOS never gets a second one. Without the flags the
        tokenizer.json post-processor is authoritative (Llama 3 adds BOS there; SmolLM2 adds none).
        transformers 5 ignores the flags whenever tokenizer.json exists; for published Llama-family
        folders the flags and the post-processor agree, so both readings give the same ids.
        """
        if "add_bos_token" not in tok_config and "add_eos_token" not in tok_config:
            return
        from tokenizers.processors import TemplateProcessing

        single, pair, specials = ["$A:0"], ["$B:1"], []
        for flag, key, at_start in (
            ("add_bos_token", "bos_token", True),
            ("add_eos_token", "eos_token", False),
        ):
            token = special_tokens.get(key)
            token_id = backend.token_to_id(token) if token is not None else None
            if not tok_config.get(flag) or token_id is None:
                continue
            specials.append((token, token_id))
            for seq, type_id in ((single, 0), (pair, 1)):
                if at_start:
                    seq.insert(0, f"{token}:{type_id}")
                else:
                    seq.append(f"{token}:{type_id}")
        backend.post_processor = TemplateProcessing(
            single=" ".join(single), pair=" ".join(single + pair), special_tokens=specials
        )

    @staticmethod
    def _find_chat_template(
        folder: Path, tok_config: dict[str, Any], error: type[XQError]
    ) -> tuple[dict[str, str] | str | None, str]:
        """Locate the folder's template; separate files win over tokenizer_config.json, as in transformers."""
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            try:
                return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
            except (OSError, UnicodeDecodeError) as e:
                raise error(f"cannot read {jinja_file} as UTF-8 text ({e})") from None
        json_file = folder / "chat_template.json"
        from_json = _named_templates(_read_json(json_file, error).get("chat_template"))
        if from_json:
            return from_json, str(json_file)
        return _named_templates(tok_config.get("chat_template")), str(folder / "tokenizer_config.json")

    def use_chat_template_file(self, path: str | Path) -> None:
        """Replace the model's chat template with one from a file (`--chat-template FILE`).

        A `.json` file is read like HF's chat_template.json ({"chat_template": ...}); anything else
        is the raw Jinja text.
        """
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read chat template {file}: {e}") from e
        template: Any = text
        if file.suffix == ".json":
            try:
                template = _named_templates(json.loads(text).get("chat_template"))
            except (json.JSONDecodeError, AttributeError) as e:
                raise InputError(f"{file} is not a chat_template.json file: {e}") from e
            if isinstance(template, dict):
                template = template.get("default")
        if not template:
            raise InputError(f"{file} holds no chat template")
        self.chat_template = template
        self._chat_template_source = str(file)
        self._chat_template_overridden = True

    def _token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`; with special tokens, exactly what `AutoTokenizer(...)(text)` returns."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text for `ids` (no `clean_up_tokenization_spaces`: transformers skips it for BPE too)."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """A fresh incremental decoder for one generated sequence."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """Render a conversation like `transformers`' `apply_chat_template` (text, or ids if `tokenize`).

        Extra keyword arguments reach the template as variables (e.g. `enable_thinking=False`) and,
        as in transformers, override the special-token variables of the same name.
        """
        if self.chat_template is None:
            detail = (
                f" (only named templates {', '.join(self._template_names)}, none 'default')"
                if self._template_names
                else ""
            )
            raise InputError(
                f"{self.name} has no chat template{detail}; pass --chat-template FILE or use plain prompts"
            )
        if not messages:
            raise InputError("cannot apply a chat template to an empty conversation")
        # transformers drops None-valued keys: OpenAI-style `content: None` must not render as "None".
        conversation = [{k: v for k, v in m.items() if v is not None} for m in messages]
        import jinja2

        error = InputError if self._chat_template_overridden else self._error
        try:
            template = _compile_chat_template(self.chat_template)
        except jinja2.TemplateSyntaxError as e:
            raise error(f"chat template from {self._chat_template_source} is not valid Jinja: {e}") from e
        try:
            text = template.environment.render_bounded(
                template,
                messages=conversation,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **{**self._special_tokens, **template_kwargs},
            )
        except ChatTemplateError as e:
            raise InputError(f"the chat template refused this conversation: {e}") from e
        except (TemplateLimitError, RecursionError, OverflowError) as e:
            why = "recursion too deep" if isinstance(e, RecursionError) else str(e)
            raise error(f"chat template from {self._chat_template_source} was stopped: {why}") from None
        except jinja2.TemplateError as e:
            raise InputError(f"chat template from {self._chat_template_source} failed to render: {e}") from e
        if tokenize:
            # The template writes BOS itself when the model wants one, hence no special tokens here.
            return self.encode(text, add_special_tokens=False)
        return text


class StreamDecoder:
    """Turns ids into text one token at a time, emitting only complete characters.

    Byte-level BPE splits multibyte characters across tokens, and SentencePiece decoders strip a
    leading space at the start of a sequence, so a token cannot be decoded alone: `tokenizers`'
    `DecodeStream` decodes each new token with the previous emitted ones as context and holds text
    until it is a complete character. It has no end of sequence, so `flush` decodes what it still
    holds with the same context. For valid text the concatenated output equals `Tokenizer.decode`
    of all ids.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        from tokenizers.decoders import DecodeStream

        self._backend = tokenizer._backend
        self._skip = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._context: list[int] = []  # the ids of the last emitted text: the decoder's context
        self._held: list[int] = []  # ids fed since then, not yet emitted

    def feed(self, token_id: int) -> str:
        """Add one id; return newly completed text, or "" while a character is still partial."""
        self._held.append(token_id)
        try:
            text = self._stream.step(self._backend, token_id)
        except Exception:  # tokenizers raises a bare Exception ("Invalid prefix encountered ...")
            # Byte-fallback junk (invalid UTF-8) can decode differently once a byte follows: emit what
            # the held ids add to the context and go on from there, as at the end of a sequence.
            return self.flush()
        if text is None:
            return ""
        self._context, self._held = self._held, []
        return text

    def flush(self) -> str:
        """Return whatever is still held (as U+FFFD if it never completed) at the end of a sequence."""
        from tokenizers.decoders import DecodeStream

        if not self._held:
            return ""
        ids = self._context + self._held
        context_text = self._backend.decode(self._context, skip_special_tokens=self._skip)
        text = self._backend.decode(ids, skip_special_tokens=self._skip)[len(context_text):]
        self._context, self._held = ids, []
        self._stream = DecodeStream(ids=ids, skip_special_tokens=self._skip)  # later feeds continue after it
        return text


def _bounded_sandbox() -> type:
    """transformers' sandbox plus a budget for the whole rendering (`MAX_*` above): every `for` loop's
    iterable is wrapped at parse time in a counter of iterations, `*` and `**` are checked before they
    build a huge string or number, and `render_bounded` stops at a size of output."""
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})
        steps = 0  # loop iterations of the rendering under way

        def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
            tree = super()._parse(source, name, filename)
            for loop in tree.find_all(nodes.For):
                counted = nodes.EnvironmentAttribute("counted", lineno=loop.lineno)
                loop.iter = nodes.Call(counted, [loop.iter], [], None, None, lineno=loop.lineno)
            return tree

        def counted(self, iterable: Any) -> Any:
            for item in iterable:
                self.steps += 1
                if self.steps > MAX_LOOP_STEPS:
                    raise TemplateLimitError(f"more than {MAX_LOOP_STEPS:,} loop iterations")
                yield item

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "**" and type(left) is int and type(right) is int and right > 0 \
                    and left.bit_length() * right > MAX_POWER_BITS:
                raise TemplateLimitError(f"{left} ** {right} is too large a number")
            if operator == "*":
                seq, n = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
                if isinstance(seq, (str, list, tuple)) and type(n) is int and len(seq) * n > MAX_RENDER_CHARS:
                    raise TemplateLimitError(f"a repetition of {len(seq) * n:,} items")
            return super().call_binop(context, operator, left, right)

        def render_bounded(self, template: Any, **variables: Any) -> str:
            self.steps = 0
            parts, size = [], 0
            for part in template.generate(**variables):
                size += len(part)
                if size > MAX_RENDER_CHARS:
                    raise TemplateLimitError(f"more than {MAX_RENDER_CHARS:,} characters of output")
                parts.append(part)
            return "".join(parts)

    return BoundedSandbox


@lru_cache(maxsize=8)
def _compile_chat_template(source: str) -> jinja2.Template:
    """Compile in the environment transformers uses (bounded: `_bounded_sandbox`), so templates render
    identically."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols

    class GenerationTag(Extension):
        """`{% generation %}` marks assistant text for training masks; inference renders it as is."""

        tags: ClassVar[set[str]] = {"generation"}

        def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        # Jinja's own tojson HTML-escapes and forces ASCII; model templates expect plain json.dumps.
        return json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = _bounded_sandbox()(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)
