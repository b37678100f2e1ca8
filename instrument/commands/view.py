"""`instrument view DIR`: browse a data set's attributions directory in the browser (read-only, local).

$ instrument view out/                 # http://127.0.0.1:8000/: search, pages, each example interactive
$ instrument view out/ --port 0        # any free port (printed)
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_command(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "view",
        help="browse a data set's attributions directory (written by attribute-dataset) in a browser",
        description="Serve DIR read-only on a local address: a searchable, paged list of the examples, "
        "each opened in the interactive view (only the shard holding it is read).",
    )
    parser.add_argument("directory", type=Path, metavar="DIR", help="the attributions directory (with manifest.json)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> None:
    from instrument.views.server import make_server

    server = make_server(args.directory, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"Serving {args.directory} at http://{host}:{port}/ (read-only; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
