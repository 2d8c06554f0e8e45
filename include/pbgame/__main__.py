"""`python -m pbgame [--host H] [--port P] [--workers N]`: the game API on uvicorn, configured by PBG_* variables."""

from __future__ import annotations

import argparse
import logging

import uvicorn


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pbgame", description=__doc__.split(":")[1].strip())
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--keep-alive", type=int, default=120,
                        help="seconds an idle connection stays open (uvicorn's 5 s default makes every player "
                             "who thinks longer reconnect: a TCP handshake and a new protocol object per call)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per forwarded request is too many
    uvicorn.run("pbgame.service:build_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                loop="uvloop", http="httptools", access_log=False, log_level="warning", timeout_graceful_shutdown=5,
                timeout_keep_alive=args.keep_alive, backlog=4096,
                proxy_headers=False)  # the service reads X-Forwarded-For itself, only with PBG_TRUST_PROXY


if __name__ == "__main__":
    main()
