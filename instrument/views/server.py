"""A read-only local web server that browses a data set's attributions directory (`instrument view DIR`).

    server = make_server("out/", port=0)           # 127.0.0.1, a free port
    server.serve_forever()                         # http://127.0.0.1:PORT/

Routes: `/` the list (search and paging, drawn by a little inline script), `/api/examples?q=&page=&per_page=`
the list as JSON (from the manifest only), `/example/<index>` one example in the interactive view
(`instrument.views.interactive`), reading only the shard that holds it. Nothing else is served: no
file is ever read by a path taken from the request, paths with `..` are refused (403), and only GET
and HEAD are answered.
"""

from __future__ import annotations

import html
import json
import os
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from instrument.files.shards import open_attributions
from instrument.outputs import FeatureAttributionOutput
from instrument.views.interactive import interactive_html

PER_PAGE = 50


class Browser:
    """What the server shows: the manifest's list, and one example at a time (its shard read on demand)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory).resolve()
        self.attributions = open_attributions(self.directory)
        self.shard_positions = {entry["file"]: k for k, entry in enumerate(self.attributions.manifest["shards"])}
        self.haystack = [f"{i}\n{a}\n{b}".lower() for i, (a, b) in zip(self.attributions.ids, self.attributions.texts)]

    def examples(self, query: str = "", page: int = 0, per_page: int = PER_PAGE) -> dict:
        """One page of the examples whose id or texts contain `query` (case-insensitive)."""
        query = query.strip().lower()
        found = [i for i, text in enumerate(self.haystack) if query in text] if query else range(len(self.haystack))
        pages = max(1, -(-len(found) // per_page))
        page = min(max(page, 0), pages - 1)
        items = [
            {
                "index": i,
                "id": self.attributions.ids[i],
                "input": self.attributions.texts[i][0],
                "generated": self.attributions.texts[i][1],
            }
            for i in found[page * per_page : (page + 1) * per_page]
        ]
        return {"total": len(found), "page": page, "pages": pages, "items": items}

    def example_page(self, index: int) -> str:
        """The interactive view of example `index` (reads only its shard)."""
        ds = self.attributions
        seq = ds[index]
        manifest = ds.manifest
        shard_info = ds.shard(self.shard_positions[ds.shard_of(index)]).info
        info = {
            **shard_info,
            "model_name": shard_info.get("model_name") or manifest.get("model"),
            "attribution_method": shard_info.get("attribution_method") or manifest.get("method"),
            "attribution_args": shard_info.get("attribution_args") or manifest.get("arguments"),
            "input_texts": [ds.texts[index][0]],
            "generated_texts": [ds.texts[index][1]],
        }
        body = interactive_html(
            FeatureAttributionOutput([seq], info=info),
            title=f"Example {index} (id {ds.ids[index]})",
            titles=[f"id {ds.ids[index]}"],
        )
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Example {index}</title></head>'
            f'<body style="margin:12px"><nav><a href="../">&larr; all examples</a></nav>\n{body}\n</body></html>\n'
        )

    def list_page(self) -> str:
        manifest = self.attributions.manifest
        meta = (
            f"{len(self.attributions)} examples in {len(manifest['shards'])} shards; model {manifest.get('model')}, "
            f"method {manifest.get('method')}" + ("" if manifest.get("complete") else "; the job has not finished")
        )
        title = html.escape(f"Attributions: {self.directory.name}")
        page = (Path(__file__).parent / "browse.html").read_text(encoding="utf-8")
        return page.replace("__TITLE__", title).replace("__META__", html.escape(meta))


class Handler(BaseHTTPRequestHandler):
    """GET and HEAD on the routes of `Browser`; everything else refused."""

    browser: Browser
    server_version = "seq-instrument-view"

    def log_message(self, format, *args):  # quiet: the command prints its address once
        pass

    def _send(self, status: int, body: str, kind: str = "text/html; charset=utf-8") -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        if ".." in path.split("/") or "\\" in path or "\0" in path:
            return self._send(HTTPStatus.FORBIDDEN, "refused: a path outside the directory\n", "text/plain")
        try:
            if path == "/":
                return self._send(HTTPStatus.OK, self.browser.list_page())
            if path == "/api/examples":
                query = parse_qs(parts.query)
                page = int(query.get("page", ["0"])[0])
                per_page = min(max(int(query.get("per_page", [str(PER_PAGE)])[0]), 1), 1000)
                found = self.browser.examples(query.get("q", [""])[0], page, per_page)
                return self._send(HTTPStatus.OK, json.dumps(found, ensure_ascii=False), "application/json")
            if path.startswith("/example/") and path[len("/example/") :].isdigit():
                index = int(path[len("/example/") :])
                if index >= len(self.browser.attributions):
                    return self._send(HTTPStatus.NOT_FOUND, f"no example {index}\n", "text/plain")
                return self._send(HTTPStatus.OK, self.browser.example_page(index))
        except ValueError as error:
            return self._send(HTTPStatus.BAD_REQUEST, f"{error}\n", "text/plain")
        return self._send(HTTPStatus.NOT_FOUND, "not found\n", "text/plain")


def make_server(directory: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server browsing `directory` (read-only) at http://host:port/ (`port=0`: a free one); the
    manifest is read now, shards when an example is opened."""
    handler = type("BoundHandler", (Handler,), {"browser": Browser(directory)})
    return ThreadingHTTPServer((host, port), handler)
