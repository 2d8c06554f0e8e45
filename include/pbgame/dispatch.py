"""The game's hot routes dispatched by a dict lookup, in front of the Starlette app.

A leaderboard call served from memory spent about a quarter of its CPU in the framework around
the handler: Starlette's two exception middlewares, its router trying each route's regex in turn,
and the request/response wrappers (a no-op request measured 0.27 ms of CPU on bare ASGI against
0.34-0.39 ms through Starlette on this machine; the leaderboard call went from 0.57-0.65 to
0.42-0.45 ms). The journeys' paths are fixed strings or one trailing
parameter, so `Dispatch` finds the handler with one dict lookup and calls it with a Starlette
`Request`; everything else (files, health, metrics, lifespan, wrong methods, 404s) goes to the
Starlette app unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

Handler = Callable[[Request], Awaitable[Response]]


class Dispatch:
    """ASGI app: ``exact[(method, path)]`` or ``param[(method, prefix)] = (name, handler)`` for one trailing segment."""

    def __init__(self, app: ASGIApp, exact: dict[tuple[str, str], Handler],
                 param: dict[tuple[str, str], tuple[str, Handler]]) -> None:
        self.app = app
        self.exact = exact
        self.param = param

    @classmethod
    def for_routes(cls, app: Starlette, hot: Collection[Handler]) -> Dispatch:
        """The tables derived from `app`'s own routes whose endpoint is in `hot` (the journeys), so
        the routes stay the one list: fixed paths, or one trailing parameter (others stay Starlette's).
        HEAD stays Starlette's too."""
        exact: dict[tuple[str, str], Handler] = {}
        param: dict[tuple[str, str], tuple[str, Handler]] = {}
        for route in app.routes:
            if not isinstance(route, Route) or route.endpoint not in hot:
                continue
            head, _, last = route.path.rpartition("/")
            for method in sorted((route.methods or set()) - {"HEAD"}):
                if "{" not in route.path:
                    exact[(method, route.path)] = route.endpoint
                elif "{" not in head and last.startswith("{") and last.endswith("}"):
                    param[(method, head + "/")] = (last[1:-1], route.endpoint)
        return cls(app, exact, param)

    def __getattr__(self, name: str) -> Any:  # app.state, app.routes...: the Starlette app's
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            handler = self.exact.get((method, path))
            if handler is None:
                head, _, last = path.rpartition("/")
                hit = self.param.get((method, head + "/")) if last else None
                if hit is not None:
                    scope["path_params"] = {hit[0]: last}
                    handler = hit[1]
            if handler is not None:
                scope.setdefault("app", self.app)
                response = await handler(Request(scope, receive))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
