"""The simple_browser tool: a BM25 index over local files, a configurable search HTTP API (served
locally), result ids and citations, and the GLM-4 All Tools registration."""

import http.server
import json
import os
import threading
import time
import urllib.parse

import pytest

from glmjax.inference.all_tools import register_all_tools
from glmjax.inference.browser import (
    BrowserError,
    Citation,
    HTTPSearchBackend,
    LocalDocumentIndex,
    SimpleBrowser,
    html_to_text,
    register_browser_tool,
)
from glmjax.inference.tools import ToolRegistry


@pytest.fixture
def documents(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "mesh.md").write_text(
        "# JAX meshes\n\nA mesh names device axes.\n\nSharding places arrays on a mesh by partition specs.")
    (tmp_path / "docs" / "paris.txt").write_text("Paris weather\nParis is sunny in June, 25 degrees.")
    (tmp_path / "docs" / "page.html").write_text(
        "<html><head><title>Cats</title><style>p{}</style></head><body><p>Cats sleep a lot.</p>"
        "<script>alert(1)</script><p>They purr.</p></body></html>")
    (tmp_path / "docs" / "skip.bin").write_bytes(b"\x00mesh mesh")
    old = tmp_path / "docs" / "old.txt"
    old.write_text("Old notes about sharding and meshes.")
    os.utime(old, (time.time() - 30 * 86400,) * 2)
    return tmp_path / "docs"


def test_local_index_searches_and_opens_indexed_files_only(documents):
    index = LocalDocumentIndex([documents])
    assert len(index) == 4  # .bin is not a text suffix
    results = index.search("sharding mesh", None, 10)
    assert [r.title for r in results][:2] == ["JAX meshes", "Old notes about sharding and meshes."]
    assert results[0].url == (documents / "mesh.md").resolve().as_uri()
    assert results[0].snippet == "Sharding places arrays on a mesh by partition specs."
    assert [r.title for r in index.search("sharding mesh", 7, 10)] == ["JAX meshes"]  # recency_days
    assert index.search("zebra", None, 10) == [] and index.search("the", None, 10) == []
    assert index.open(results[0].url).text.startswith("# JAX meshes")
    page = index.open((documents / "page.html").resolve().as_uri())
    assert (page.title, page.text) == ("Cats", "Cats sleep a lot.\nThey purr.")
    with pytest.raises(BrowserError, match="is not a document of the local index"):
        index.open("file:///etc/passwd")
    with pytest.raises(ValueError, match="no such file or directory"):
        LocalDocumentIndex([documents / "missing"])


def test_browser_ids_mclick_open_url_and_citations(documents):
    browser = SimpleBrowser(LocalDocumentIndex([documents]), max_page_chars=40)
    listing = browser.search("sunny June")
    assert listing.splitlines()[:2] == ["# 【0†Paris weather†paris.txt】", "Paris is sunny in June, 25 degrees."]
    second = browser.search("cats purr")
    assert second.startswith("# 【1†Cats†page.html】")  # ids keep counting across searches
    opened = browser.mclick([0, 1, 7])
    blocks = opened.split("\n\n")
    assert blocks[0] == f"【0†Paris weather】\nURL: {(documents / 'paris.txt').resolve().as_uri()}\n" \
                        "Paris weather\nParis is sunny in June, 25…"
    assert blocks[1].startswith("【1†Cats】") and blocks[2] == "【7】 Error: no search result has id 7"
    url = (documents / "mesh.md").resolve().as_uri()
    assert browser.open_url(url).startswith("【2†JAX meshes】")
    assert browser.citations("Sunny【0†Paris is sunny】, meshes【2†mesh】, bad【9†x】") == [
        Citation(0, "Paris is sunny", "Paris weather", (documents / "paris.txt").resolve().as_uri()),
        Citation(2, "mesh", "JAX meshes", url)]
    assert browser.search("nothing matches zebra") == "No results for 'nothing matches zebra'."


def test_browser_tool_calls_go_through_the_registry(documents):
    registry = ToolRegistry()
    register_browser_tool(registry, SimpleBrowser(LocalDocumentIndex([documents])))
    assert registry.spec("simple_browser").kind == "simple_browser"
    assert registry.call("simple_browser", {"action": "search", "query": "cats"}).startswith("# 【0†Cats")
    assert registry.call("simple_browser", {"action": "mclick", "ids": [0]}).startswith("【0†Cats】")
    assert registry.call("simple_browser", {"action": "fly"}).startswith("Error: bad arguments")
    assert "search needs a non-empty query" in registry.call("simple_browser", {"action": "search"})
    assert "only its file:// URLs open" in registry.call("simple_browser", {"action": "open_url",
                                                                            "url": "file:///etc/hosts"})


class _SearchAPI(http.server.BaseHTTPRequestHandler):
    """A local search API (Bing-like reply shape) and two pages."""

    requests: list = []

    def do_GET(self):  # noqa: N802 - http.server's name
        parts = urllib.parse.urlsplit(self.path)
        _SearchAPI.requests.append((parts.path, dict(urllib.parse.parse_qsl(parts.query)), dict(self.headers)))
        if parts.path == "/search":
            host = f"http://127.0.0.1:{self.server.server_port}"
            body = json.dumps({"webPages": {"value": [
                {"name": "Page A", "url": f"{host}/a", "snippet": "about a"},
                {"name": "No link"},
                {"name": "Page B", "url": f"{host}/b", "snippet": "about b"}]}}).encode()
            kind = "application/json"
        elif parts.path == "/a":
            body, kind = b"<html><title>A</title><body><p>Alpha text.</p></body></html>", "text/html"
        else:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", f"{kind}; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def search_api():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SearchAPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _SearchAPI.requests = []
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_http_search_backend_by_configuration(search_api, monkeypatch):
    monkeypatch.setenv("TEST_SEARCH_KEY", "k3y")
    backend = HTTPSearchBackend(f"{search_api}/search", limit_param="count", recency_param="freshness",
                                params={"mkt": "en-US"}, api_key_env="TEST_SEARCH_KEY",
                                api_key_header="Ocp-Apim-Subscription-Key", api_key_prefix="",
                                results_path="webPages.value", title_field="name", use_env_proxy=False)
    browser = SimpleBrowser(backend)
    assert browser.search("jax", recency_days=3).splitlines() == [
        "# 【0†Page A†127.0.0.1:" + search_api.rsplit(":", 1)[1] + "】", "about a",
        "# 【1†Page B†127.0.0.1:" + search_api.rsplit(":", 1)[1] + "】", "about b"]
    path, query, headers = _SearchAPI.requests[0]
    assert (path, query) == ("/search", {"q": "jax", "count": "10", "freshness": "3", "mkt": "en-US"})
    assert headers["Ocp-Apim-Subscription-Key"] == "k3y"
    assert browser.mclick([0, 1]) == (f"【0†A】\nURL: {search_api}/a\nAlpha text.\n\n"
                                      f"【1†Page B】 Error: GET {search_api}/b returned HTTP 404")
    with pytest.raises(BrowserError, match="only http\\(s\\) URLs"):
        backend.open("file:///etc/passwd")
    with pytest.raises(BrowserError, match="has no list at 'missing'"):
        HTTPSearchBackend(f"{search_api}/search", results_path="missing", use_env_proxy=False).search("x", None, 5)
    with pytest.raises(ValueError, match="environment variable NOT_SET_KEY"):
        HTTPSearchBackend(f"{search_api}/search", api_key_env="NOT_SET_KEY")


def test_html_to_text():
    assert html_to_text("<title> T </title><div>a <b>b</b></div><script>x</script><p>c</p>") == ("T", "a b\nc")


def test_register_all_tools(documents):
    registry = register_all_tools(ToolRegistry(), documents=[documents])
    assert registry.names == ["python", "simple_browser"]
    assert [spec["type"] for spec in registry.specs()] == ["python", "simple_browser"]
    with pytest.raises(ValueError, match="cogview \\(image generation\\) is not available"):
        register_all_tools(ToolRegistry(), ["cogview"])
    with pytest.raises(ValueError, match="simple_browser needs documents to index"):
        register_all_tools(ToolRegistry(), ["simple_browser"])
    with pytest.raises(ValueError, match="unknown tool 'shell'"):
        register_all_tools(ToolRegistry(), ["shell"])
