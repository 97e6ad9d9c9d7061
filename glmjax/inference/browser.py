"""GLM-4's ``simple_browser`` tool (``search``, ``mclick``, ``open_url``) over a pluggable backend.

The model calls the browser in GLM-4's All Tools syntax (``search("query", recency_days=7)``,
``mclick([0, 2, 5])``, ``open_url("https://...")``; ``glmjax.data.chat_format`` parses it into
``{"action": ..., ...}``; other models call the same function with JSON arguments) and cites what
it read as ``【{id}†{text}】``, ``id`` being the result id the browser showed.

Backends (:class:`SearchBackend`):

* :class:`LocalDocumentIndex` (the default): BM25 (``glmjax.pipelines.retrieval.BM25Retriever``,
  on the ``bm25s`` library) over text files the user
  points at (files or directories; ``.txt``, ``.md``, ``.html``, ... ); ``recency_days`` filters
  by modification time; ``open_url`` opens indexed documents only (their ``file://`` URLs), never
  other files.
* :class:`HTTPSearchBackend`: any JSON search HTTP API, by configuration (endpoint, query
  parameter names, headers and API key, where the results and their fields are in the reply);
  pages are fetched over HTTP(S) and reduced to text.

:class:`SimpleBrowser` keeps the results it has shown under ids that are unique for its lifetime, so
one browser serves many conversations at once (an ``mclick`` id always names the result it was
shown for). Register it with :func:`register_browser_tool`.
"""

from __future__ import annotations

import dataclasses
import html.parser
import json
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from glmjax.inference.tools import ToolRegistry
from glmjax.pipelines.retrieval import BM25Retriever, lexical_terms

DEFAULT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".html", ".htm", ".json", ".jsonl", ".csv",
                    ".tex", ".py")
BROWSER_DESCRIPTION = (
    "A web browser. action 'search' runs a search (query, optional recency_days) and lists results "
    "as 【id†title†source】 with a snippet; 'mclick' opens the results with the given ids; "
    "'open_url' opens a URL. Cite what you use as 【id†text】.")
BROWSER_PARAMETERS = {
    "type": "object",
    "properties": {
        "action": {"type": "string", "enum": ["search", "mclick", "open_url"]},
        "query": {"type": "string", "description": "search: what to search for"},
        "recency_days": {"type": "integer", "description": "search: only results this recent"},
        "ids": {"type": "array", "items": {"type": "integer"}, "description": "mclick: result ids"},
        "url": {"type": "string", "description": "open_url: the page to open"},
    },
    "required": ["action"],
}
_CITATION = re.compile(r"【(\d+)†(.+?)】")
_SNIPPET_CHARS = 300
_BLOCK_TAGS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "section",
               "article", "table", "ul", "ol", "blockquote", "header", "footer"}


class BrowserError(RuntimeError):
    """A search or page that could not be served (the message says why)."""


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """One search hit: its page's title and URL, and a snippet of its text."""

    title: str
    url: str
    snippet: str


@dataclasses.dataclass(frozen=True)
class Page:
    """An opened page: its URL, title and text."""

    url: str
    title: str
    text: str


@dataclasses.dataclass(frozen=True)
class Citation:
    """A ``【id†text】`` citation in a reply, resolved to the result it names."""

    id: int
    text: str
    title: str
    url: str


class SearchBackend(Protocol):
    """Where :class:`SimpleBrowser` searches and opens pages."""

    def search(self, query: str, recency_days: int | None, limit: int) -> list[SearchResult]:
        """At most ``limit`` results for ``query``, best first (only pages changed in the last
        ``recency_days`` days when it is given)."""

    def open(self, url: str) -> Page:
        """The page at ``url``; raises :class:`BrowserError` when it cannot be served."""


class _TextExtractor(html.parser.HTMLParser):
    """The title and visible text of an HTML document (scripts and styles dropped)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title = ""
        self.parts: list[str] = []
        self._skip = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in ("script", "style", "noscript"):
            self._skip += 1
        elif tag == "title":
            self._in_title = True
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "noscript") and self._skip:
            self._skip -= 1
        elif tag == "title":
            self._in_title = False
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        elif not self._skip:
            self.parts.append(data)


def html_to_text(document: str) -> tuple[str, str]:
    """``(title, text)`` of an HTML document: visible text, one block per line."""
    extractor = _TextExtractor()
    extractor.feed(document)
    extractor.close()
    lines = (" ".join(line.split()) for line in "".join(extractor.parts).splitlines())
    return " ".join(extractor.title.split()), "\n".join(line for line in lines if line)


def _snippet(text: str, terms: set[str]) -> str:
    """The paragraph of ``text`` sharing most words with ``terms``, cut to a snippet."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n|\n", text) if p.strip()] or [""]
    best = max(paragraphs, key=lambda p: len(terms & set(re.findall(r"\w+", p.lower()))))
    return best if len(best) <= _SNIPPET_CHARS else best[: _SNIPPET_CHARS - 1] + "…"


@dataclasses.dataclass(frozen=True)
class _Document:
    url: str
    title: str
    text: str
    mtime: float


class LocalDocumentIndex:
    """BM25 search over local text files.

    Args:
      paths: files and directories (searched recursively) to index.
      suffixes: file name endings indexed inside directories (a file named directly is always
        indexed).
      max_file_bytes: larger files are skipped.

    Raises:
      ValueError: a path that does not exist, or nothing to index.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], *, suffixes: Sequence[str] = DEFAULT_SUFFIXES,
                 max_file_bytes: int = 5_000_000) -> None:
        files: list[Path] = []
        for path in map(Path, paths):
            if path.is_file():
                files.append(path)
            elif path.is_dir():
                files.extend(sorted(p for p in path.rglob("*")
                                    if p.is_file() and p.suffix.lower() in suffixes))
            else:
                raise ValueError(f"{path}: no such file or directory to index")
        self._documents = [self._read(path) for path in dict.fromkeys(f.resolve() for f in files)
                           if path.stat().st_size <= max_file_bytes]
        if not self._documents:
            raise ValueError(f"no documents to index under {', '.join(map(str, paths)) or 'nothing'}")
        self._by_url = {document.url: document for document in self._documents}
        self._retriever = BM25Retriever([f"{document.title}\n{document.text}" for document in self._documents])

    @staticmethod
    def _read(path: Path) -> _Document:
        raw = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix.lower() in (".html", ".htm"):
            title, text = html_to_text(raw)
        else:
            text = raw
            title = next((line.strip().lstrip("#").strip() for line in raw.splitlines() if line.strip()), "")
        return _Document(path.as_uri(), (title or path.name)[:120], text, path.stat().st_mtime)

    def __len__(self) -> int:
        return len(self._documents)

    def search(self, query: str, recency_days: int | None, limit: int) -> list[SearchResult]:
        """The best BM25 matches for ``query`` (documents sharing no term with it are left out)."""
        mask = np.ones(len(self._documents), np.float32)
        if recency_days is not None and recency_days > 0:
            cutoff = time.time() - recency_days * 86400
            mask = np.asarray([document.mtime >= cutoff for document in self._documents], np.float32)
        found = self._retriever.search(query, limit, weights=mask)
        terms = set(lexical_terms(query))
        return [SearchResult(self._documents[i].title, self._documents[i].url,
                             _snippet(self._documents[i].text, terms)) for i in found]

    def open(self, url: str) -> Page:
        """An indexed document by its ``file://`` URL; any other URL is refused."""
        document = self._by_url.get(url)
        if document is None:
            raise BrowserError(f"{url} is not a document of the local index (only its file:// URLs open)")
        return Page(document.url, document.title, document.text)


def _field(item: Any, path: str) -> Any:
    """``item``'s value at the dotted ``path`` (None when absent)."""
    for key in path.split(".") if path else []:
        if isinstance(item, Mapping):
            item = item.get(key)
        elif isinstance(item, list) and key.isdigit() and int(key) < len(item):
            item = item[int(key)]
        else:
            return None
    return item


class HTTPSearchBackend:
    """Any JSON search HTTP API, by configuration; pages are fetched over HTTP(S).

    A search is ``GET {url}?{query_param}={query}`` (plus ``limit_param``/``recency_param`` when
    set, and the fixed ``params``); the results are the list at ``results_path`` (dotted) of the
    JSON reply, each read at ``title_field``/``url_field``/``snippet_field`` (dotted). For example
    SearXNG: ``HTTPSearchBackend("http://localhost:8888/search", params={"format": "json"},
    snippet_field="content")``; Bing: ``results_path="webPages.value"``, ``title_field="name"``,
    ``api_key_env=...``, ``api_key_header="Ocp-Apim-Subscription-Key"``, ``api_key_prefix=""``.

    Args:
      url: the search endpoint.
      query_param, limit_param, recency_param: request parameter names (None: not sent).
      params: fixed request parameters.
      headers: fixed request headers.
      api_key_env: environment variable holding an API key (it must be set if given), sent as
        ``{api_key_header}: {api_key_prefix}{key}``.
      results_path, title_field, url_field, snippet_field: where the reply holds the results.
      timeout_s: socket timeout per request.
      max_page_bytes: pages are read up to this size.
      use_env_proxy: honour ``http_proxy``/``https_proxy``/``no_proxy``.
    """

    def __init__(self, url: str, *, query_param: str = "q", limit_param: str | None = None,
                 recency_param: str | None = None, params: Mapping[str, str] | None = None,
                 headers: Mapping[str, str] | None = None, api_key_env: str | None = None,
                 api_key_header: str = "Authorization", api_key_prefix: str = "Bearer ",
                 results_path: str = "results", title_field: str = "title", url_field: str = "url",
                 snippet_field: str = "snippet", timeout_s: float = 30.0,
                 max_page_bytes: int = 2_000_000, use_env_proxy: bool = True) -> None:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"search url must be http(s), got {url!r}")
        self.url = url
        self.query_param, self.limit_param, self.recency_param = query_param, limit_param, recency_param
        self.params = dict(params or {})
        self.headers = {"Accept": "application/json", **(headers or {})}
        if api_key_env is not None:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(f"environment variable {api_key_env} (search API key) is not set")
            self.headers[api_key_header] = f"{api_key_prefix}{key}"
        self.results_path, self.title_field = results_path, title_field
        self.url_field, self.snippet_field = url_field, snippet_field
        self.timeout_s = timeout_s
        self.max_page_bytes = max_page_bytes
        handlers = [] if use_env_proxy else [urllib.request.ProxyHandler({})]
        self._opener = urllib.request.build_opener(*handlers)

    def _get(self, url: str, headers: Mapping[str, str], limit: int) -> tuple[bytes, str]:
        request = urllib.request.Request(url, headers=dict(headers), method="GET")
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                return response.read(limit), response.headers.get_content_charset() or "utf-8"
        except urllib.error.HTTPError as err:
            raise BrowserError(f"GET {url} returned HTTP {err.code}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise BrowserError(f"GET {url} failed: {reason}") from None

    def search(self, query: str, recency_days: int | None, limit: int) -> list[SearchResult]:
        """Results from the search API, in its order (entries without a URL are skipped)."""
        params = {**self.params, self.query_param: query}
        if self.limit_param:
            params[self.limit_param] = str(limit)
        if self.recency_param and recency_days is not None and recency_days > 0:
            params[self.recency_param] = str(recency_days)
        url = f"{self.url}{'&' if '?' in self.url else '?'}{urllib.parse.urlencode(params)}"
        body, charset = self._get(url, self.headers, 10_000_000)
        try:
            reply = json.loads(body.decode(charset, errors="replace"))
        except json.JSONDecodeError as err:
            raise BrowserError(f"search reply from {self.url} is not JSON ({err})") from None
        items = _field(reply, self.results_path)
        if not isinstance(items, list):
            raise BrowserError(f"search reply from {self.url} has no list at {self.results_path!r}")
        results = []
        for item in items:
            link = _field(item, self.url_field)
            if isinstance(link, str) and link:
                title = _field(item, self.title_field)
                snippet = _field(item, self.snippet_field)
                results.append(SearchResult(str(title or link), link, str(snippet or "")))
        return results[:limit]

    def open(self, url: str) -> Page:
        """The page at an http(s) ``url`` as text (HTML reduced to its visible text)."""
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise BrowserError(f"cannot open {url!r}: only http(s) URLs")
        body, charset = self._get(url, {"Accept": "text/html, text/plain, */*"}, self.max_page_bytes)
        text = body.decode(charset, errors="replace")
        title, text = html_to_text(text) if "<html" in text[:2000].lower() else ("", text)
        return Page(url, title or url, text)


class SimpleBrowser:
    """GLM-4's simple_browser: searches, shows results under ids, opens them, resolves citations.

    Args:
      backend: where to search and open pages.
      results_per_search: results shown per search.
      max_page_chars: an opened page's text is cut to this length.
    """

    def __init__(self, backend: SearchBackend, *, results_per_search: int = 10,
                 max_page_chars: int = 5000) -> None:
        self.backend = backend
        self.results_per_search = results_per_search
        self.max_page_chars = max_page_chars
        self._shown: list[SearchResult] = []
        self._lock = threading.Lock()

    def _remember(self, result: SearchResult) -> int:
        with self._lock:
            self._shown.append(result)
            return len(self._shown) - 1

    def _page_text(self, index: int, page: Page) -> str:
        text = page.text
        if len(text) > self.max_page_chars:
            text = text[: self.max_page_chars] + "…"
        return f"【{index}†{page.title}】\nURL: {page.url}\n{text}"

    def search(self, query: str, recency_days: int | None = None) -> str:
        """Runs a search and lists the results as ``# 【id†title†source】`` lines with snippets."""
        if not isinstance(query, str) or not query.strip():
            raise ValueError("search needs a non-empty query")
        results = self.backend.search(query, recency_days, self.results_per_search)
        if not results:
            return f"No results for {query!r}."
        lines = []
        for result in results:
            parts = urllib.parse.urlsplit(result.url)
            source = parts.netloc or Path(parts.path).name
            lines += [f"# 【{self._remember(result)}†{result.title}†{source}】", result.snippet]
        return "\n".join(lines)

    def mclick(self, ids: Sequence[int]) -> str:
        """Opens the results with ``ids``; a result that fails is reported in place."""
        if not isinstance(ids, (list, tuple)) or not ids or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError("mclick needs a non-empty list of result ids")
        blocks = []
        for index in ids:
            with self._lock:
                result = self._shown[index] if 0 <= index < len(self._shown) else None
            if result is None:
                blocks.append(f"【{index}】 Error: no search result has id {index}")
                continue
            try:
                blocks.append(self._page_text(index, self.backend.open(result.url)))
            except BrowserError as err:
                blocks.append(f"【{index}†{result.title}】 Error: {err}")
        return "\n\n".join(blocks)

    def open_url(self, url: str) -> str:
        """Opens ``url`` and shows it under a new id."""
        if not isinstance(url, str) or not url.strip():
            raise ValueError("open_url needs a url")
        page = self.backend.open(url.strip())
        return self._page_text(self._remember(SearchResult(page.title, page.url, "")), page)

    def __call__(self, action: str, query: str | None = None, recency_days: int | None = None,
                 ids: Sequence[int] | None = None, url: str | None = None) -> str:
        """The tool entry point: ``action`` is ``search``, ``mclick`` or ``open_url``."""
        if action == "search":
            return self.search(query, recency_days)
        if action == "mclick":
            return self.mclick(ids)
        if action == "open_url":
            return self.open_url(url)
        raise ValueError(f"unknown action {action!r} (search, mclick, open_url)")

    def citations(self, text: str) -> list[Citation]:
        """The ``【id†text】`` citations in ``text`` that name results this browser showed."""
        found = []
        for match in _CITATION.finditer(text):
            index = int(match.group(1))
            with self._lock:
                result = self._shown[index] if index < len(self._shown) else None
            if result is not None:
                found.append(Citation(index, match.group(2), result.title, result.url))
        return found


def register_browser_tool(registry: ToolRegistry, browser: SimpleBrowser) -> SimpleBrowser:
    """Registers ``browser`` as the ``simple_browser`` tool (a GLM-4 All Tools built-in)."""
    registry.register(browser, name="simple_browser", description=BROWSER_DESCRIPTION,
                      parameters=BROWSER_PARAMETERS)
    return browser
