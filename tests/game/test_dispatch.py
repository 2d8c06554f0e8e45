"""The lean dispatcher in front of the Starlette app: the hot paths by dict, everything else unchanged."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from pbgame.dispatch import Dispatch


async def _fast(request: Request) -> JSONResponse:
    return JSONResponse({"via": "dispatch", "params": request.path_params, "q": dict(request.query_params)})


async def _slow(request: Request) -> PlainTextResponse:
    return PlainTextResponse("starlette")


def _client() -> TestClient:
    app = Starlette(routes=[Route("/api/players/me", _slow), Route("/api/players/{player_id}", _slow),
                            Route("/api/matches", _slow, methods=["POST"]), Route("/health", _slow)])
    app.state.marker = "kept"
    lean = Dispatch(app, {("GET", "/api/players/me"): _fast, ("POST", "/api/matches"): _fast},
                    {("GET", "/api/players/"): ("player_id", _fast)})
    assert lean.state.marker == "kept"  # the Starlette app's attributes show through
    return TestClient(lean)


def test_hot_paths_are_dispatched_with_their_parameter_and_query() -> None:
    with _client() as c:
        assert c.get("/api/players/me?limit=5").json() == {"via": "dispatch", "params": {}, "q": {"limit": "5"}}
        assert c.get("/api/players/abc123").json()["params"] == {"player_id": "abc123"}
        assert c.post("/api/matches", json={}).json()["via"] == "dispatch"


def test_everything_else_goes_to_starlette_unchanged() -> None:
    with _client() as c:
        assert c.get("/health").text == "starlette"
        assert c.get("/api/matches").status_code == 405  # a wrong method is Starlette's answer
        assert c.post("/api/players/me").status_code == 405
        assert c.get("/api/players/").status_code == 404  # an empty parameter is no match
        assert c.get("/api/players/a/b").status_code == 404
        assert c.get("/nowhere").status_code == 404
