"""The lean dispatcher in front of the Starlette app: the hot paths by dict, everything else unchanged."""

from __future__ import annotations

import asyncio

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from pbgame.dispatch import Dispatch


async def _fast(request: Request) -> JSONResponse:
    return JSONResponse({"via": "dispatch", "params": request.path_params, "q": dict(request.query_params)})


async def _slow(request: Request) -> PlainTextResponse:
    return PlainTextResponse("starlette")


def _app() -> Dispatch:
    app = Starlette(routes=[Route("/api/players/me", _slow), Route("/api/players/{player_id}", _slow),
                            Route("/api/matches", _slow, methods=["POST"]), Route("/health", _slow)])
    app.state.marker = "kept"
    lean = Dispatch(app, {("GET", "/api/players/me"): _fast, ("POST", "/api/matches"): _fast},
                    {("GET", "/api/players/"): ("player_id", _fast)})
    assert lean.state.marker == "kept"  # the Starlette app's attributes show through
    return lean


def _calls(*calls: tuple[str, str]) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_app()), base_url="http://t") as c:
            return [await c.request(method, url, json={} if method == "POST" else None) for method, url in calls]
    return asyncio.run(go())


def test_hot_paths_are_dispatched_with_their_parameter_and_query() -> None:
    me, other, match = _calls(("GET", "/api/players/me?limit=5"), ("GET", "/api/players/abc123"),
                              ("POST", "/api/matches"))
    assert me.json() == {"via": "dispatch", "params": {}, "q": {"limit": "5"}}
    assert other.json()["params"] == {"player_id": "abc123"}
    assert match.json()["via"] == "dispatch"


def test_everything_else_goes_to_starlette_unchanged() -> None:
    health, wrong1, wrong2, empty, deeper, nowhere = _calls(
        ("GET", "/health"), ("GET", "/api/matches"), ("POST", "/api/players/me"), ("GET", "/api/players/"),
        ("GET", "/api/players/a/b"), ("GET", "/nowhere"))
    assert health.text == "starlette"
    assert wrong1.status_code == wrong2.status_code == 405  # a wrong method is Starlette's answer
    assert empty.status_code == deeper.status_code == nowhere.status_code == 404  # no parameter, or two: no match


def test_the_tables_come_from_the_apps_own_routes() -> None:
    """A journey's route is written once: the dispatcher's tables are derived from it (fixed paths and
    one trailing parameter; HEAD, other endpoints and deeper parameters stay Starlette's)."""
    async def other(request: Request) -> PlainTextResponse:
        return PlainTextResponse("other")

    app = Starlette(routes=[Route("/api/players/me", _fast), Route("/api/players/{player_id}", _fast),
                            Route("/api/matches", _fast, methods=["POST"]), Route("/api/f/{a}/{b}", _fast),
                            Route("/health", other)])
    lean = Dispatch.for_routes(app, hot={_fast})
    assert lean.exact == {("GET", "/api/players/me"): _fast, ("POST", "/api/matches"): _fast}
    assert lean.param == {("GET", "/api/players/"): ("player_id", _fast)}
