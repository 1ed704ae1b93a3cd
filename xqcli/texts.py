"""Evaluation texts: `wiki` (a cleaned 2016 English Wikipedia excerpt), `news` (the Lee corpus) and `builtin`.

`wiki` and `news` ship as test data inside the gensim 4.4.0 wheel, which installs offline from PyPI with
`pip install --no-deps gensim==4.4.0` (we read the files; gensim is never imported; no xq extra brings it, as
an extra would pull gensim's dependencies). `builtin` is the English prose every Python ships (the
standard library's pydoc topics), so `xq eval` works on every install; it is also the default calibration
text of `xq convert`, so a calibrated bundle scores a little better on it than on unseen text. The wiki
cleaner is a WikiText-style heuristic (`clean_article`): its perplexities are for
relative comparisons only, not for comparison with published WikiText-2 numbers.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import re
import xml.etree.ElementTree as ET
from functools import lru_cache
from pathlib import Path

from xqcli.errors import InputError, MissingDependencyError

TEXTS = ("wiki", "news", "builtin")
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
_STOP_SECTIONS = {"references", "external links", "see also", "further reading", "notes", "bibliography"}


def gensim_data_dir() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "the wiki and news texts come from gensim's test data, which is not installed (no xq extra brings it)",
            hint="pip install --no-deps gensim==4.4.0, or use --text builtin or --text FILE")
    return Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"


def has_gensim_texts() -> bool:
    """Whether `wiki` and `news` can be read here."""
    try:
        return (gensim_data_dir() / NEWS_FILE).is_file()
    except MissingDependencyError:
        return False


def default_text() -> str:
    """`wiki` where gensim's test data is installed, else `builtin` (every install has it)."""
    return "wiki" if has_gensim_texts() else "builtin"


def builtin_text() -> str:
    """English prose every Python ships: the stdlib's pydoc topic texts (the language reference)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def news_text() -> str:
    return (gensim_data_dir() / NEWS_FILE).read_text(encoding="utf-8")


_NON_PROSE_LINK = re.compile(r"^(?:file|image|category|[a-z]{2,3}(?:-[a-z]+)?):", re.IGNORECASE)


def _link_text(m: re.Match[str]) -> str:
    inner = m[1]
    return "" if _NON_PROSE_LINK.match(inner) else inner.rsplit("|", 1)[-1]


def clean_article(text: str) -> str:
    """MediaWiki markup of one article -> plain paragraphs with WikiText-style headings."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    text = re.sub(r"<ref[^>]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.DOTALL)
    while True:  # innermost templates, tables and links first, until nothing changes
        new = re.sub(r"\{\{[^{}]*\}\}", "", text)
        new = re.sub(r"\{\|(?:(?!\{\||\|\}).)*\|\}", "", new, flags=re.DOTALL)
        new = re.sub(r"\[\[([^\[\]]*)\]\]", _link_text, new)
        if new == text:
            break
        text = new
    text = re.sub(r"\[https?://[^\s\]]+ ?([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    text = html.unescape(re.sub(r"<[^>]+>", "", text))
    lines = []
    for line in text.splitlines():
        line = line.strip()
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*\1", line)
        if heading:
            if heading[2].lower() in _STOP_SECTIONS:
                break
            marks = " ".join("=" * len(heading[1]))  # WikiText style: "= = Section = ="
            lines.append(f"\n{marks} {heading[2]} {marks}\n")
        elif len(line) >= 40 and line[0] not in "*#:;|!{}":
            lines.append(line)
    return "\n".join(lines).strip()


@lru_cache(maxsize=1)
def wiki_text() -> str:
    """Main-namespace, non-redirect articles of the dump excerpt, one `= Title =` section each."""
    articles = []
    with bz2.open(gensim_data_dir() / WIKI_FILE) as f:
        for _, el in ET.iterparse(f):
            if el.tag.rsplit("}", 1)[-1] != "page":
                continue
            title, ns, text = el.findtext("{*}title"), el.findtext("{*}ns"), el.findtext("{*}revision/{*}text")
            el.clear()
            if ns == "0" and text and not text.lstrip().upper().startswith("#REDIRECT"):
                body = clean_article(text)
                if body:
                    articles.append(f"= {title} =\n\n{body}")
    return "\n\n".join(articles) + "\n"


def load_text(name: str) -> str:
    """`wiki`, `news`, `builtin` or a path to a UTF-8 text file."""
    if name == "wiki":
        return wiki_text()
    if name == "news":
        return news_text()
    if name == "builtin":
        return builtin_text()
    p = Path(name)
    if not p.is_file():
        raise InputError(f"--text {name}: not one of {', '.join(TEXTS)} nor an existing file")
    return read_user_text(p, "--text")


def read_user_text(path: Path, option: str) -> str:
    """A user's UTF-8 text file (eval text, calibration text), refused when unreadable or empty."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{option} {path}: does not exist", hint="check the path") from None
    except IsADirectoryError:
        raise InputError(f"{option} {path}: is a folder", hint="give a UTF-8 text file") from None
    except OSError as e:  # not its encoding: permissions, a device error
        raise InputError(f"{option} {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{option} {path}: cannot read it as UTF-8 text ({e})",
                         hint="give a UTF-8 text file") from None
    if not text.strip():
        raise InputError(f"{option} {path}: the file is empty")
    return text
