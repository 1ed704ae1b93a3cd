"""Evaluation texts: `wiki` (a cleaned 2016 English Wikipedia excerpt) and `news` (the Lee corpus).

Both ship as test data inside the gensim 4.4.0 wheel, which installs offline from PyPI with
`pip install --no-deps gensim==4.4.0` (we read the files; gensim is never imported). The wiki
cleaner is a WikiText-style heuristic (../shared/docs/test-assets.md §3.3): its perplexities are for
relative comparisons only, not for comparison with published WikiText-2 numbers.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from xqcli.errors import InputError, MissingDependencyError

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
_STOP_SECTIONS = {"references", "external links", "see also", "further reading", "notes", "bibliography"}


def gensim_data_dir() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("the built-in texts come from gensim's test data, which is not installed",
                                     hint="pip install --no-deps gensim==4.4.0, or pass --text FILE")
    return Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"


def news_text() -> str:
    return (gensim_data_dir() / NEWS_FILE).read_text(encoding="utf-8")


def _strip_nested(text: str, open_: str, close: str) -> str:
    """Remove innermost open_..close spans repeatedly (templates and tables nest)."""
    pat = re.compile(re.escape(open_) + r"(?:(?!" + re.escape(open_) + r")(?!" + re.escape(close) + r").)*?"
                     + re.escape(close), re.S)
    while True:
        new = pat.sub("", text)
        if new == text:
            return text
        text = new


def clean_wikitext(markup: str) -> list[str]:
    """MediaWiki markup of one article -> clean paragraph lines (WikiText-style headings kept)."""
    t = re.sub(r"<!--.*?-->", "", markup, flags=re.S)
    t = re.sub(r"<ref[^>]*/>", "", t)
    t = re.sub(r"<ref[^>]*>.*?</ref>", "", t, flags=re.S)
    t = _strip_nested(t, "{{", "}}")
    t = _strip_nested(t, "{|", "|}")
    t = re.sub(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", t)
    t = re.sub(r"\[\[[^\]|]*\|([^\]]*)\]\]", r"\1", t)
    t = re.sub(r"\[\[([^\]]*)\]\]", r"\1", t)
    t = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", t)
    t = re.sub(r"\[https?://\S+\]", "", t)
    t = t.replace("'''", "").replace("''", "")
    t = re.sub(r"<[^>]+>", "", t)
    t = html.unescape(t)
    lines: list[str] = []
    for line in t.split("\n"):
        line = line.strip()
        m = re.match(r"^(=+)\s*(.*?)\s*\1$", line)
        if m:
            if m.group(2).lower() in _STOP_SECTIONS:
                break
            lines.append(f"= {m.group(2)} =")
            continue
        if len(line) >= 40 and line[0] not in "*#:;|!{}":
            lines.append(line)
    return lines


def wiki_text() -> str:
    """The cleaned article text, articles separated by blank lines."""
    articles: list[str] = []
    with bz2.open(gensim_data_dir() / WIKI_FILE, "rb") as f:
        for _, el in ET.iterparse(f):
            if not el.tag.endswith("}page") and el.tag != "page":
                continue
            ns = next((c.text for c in el.iter() if c.tag.endswith("ns")), None)
            text = next((c.text for c in el.iter() if c.tag.endswith("text")), None) or ""
            if ns == "0" and not text.lstrip().upper().startswith("#REDIRECT"):
                lines = clean_wikitext(text)
                if lines:
                    articles.append("\n".join(lines))
            el.clear()
    return "\n\n".join(articles)


def load_text(name: str) -> str:
    """`wiki`, `news` or a path to a UTF-8 text file."""
    if name == "wiki":
        return wiki_text()
    if name == "news":
        return news_text()
    p = Path(name)
    if not p.is_file():
        raise InputError(f"--text {name}: not 'wiki', 'news' or an existing file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--text {name}: cannot read it as UTF-8 ({e})") from None
    if not text.strip():
        raise InputError(f"--text {name}: the file is empty")
    return text
