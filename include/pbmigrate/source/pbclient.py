"""The PocketBase HTTP client under `ApiSource`: superuser login, retries, one-line errors.

Retries are tenacity's (exponential backoff with jitter, or the server's Retry-After), decided on
the exception's type, never on its text. The superuser token travels in a `requests` auth object
applied to each request, so threads sharing the session (the prefetching cursors) never see the
session's headers change under them, and a token near its expiry is renewed once for all of them.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import requests
import tenacity
from requests.auth import AuthBase
from urllib3.exceptions import NewConnectionError

from pbmigrate.errors import BadSource, SourceError

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
BACKOFF_BASE = 0.5  # seconds; doubles per attempt, plus jitter
BACKOFF_CAP = 8.0
RETRY_AFTER_CAP = 60.0
TOKEN_MARGIN = 120  # re-authenticate this many seconds before the token expires
NETWORK_ERRORS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
LOGINS = [(23, "/api/collections/_superusers/auth-with-password"), (22, "/api/admins/auth-with-password")]


class Retryable(Exception):
    """A failure worth another attempt (429, 5xx, truncated body); `response` when there was one."""

    def __init__(self, message: str, response: requests.Response | None = None):
        super().__init__(message)
        self.response = response


class SuperuserAuth(AuthBase):
    """Puts the superuser token on each request, logging in first when there is none or it is
    about to expire. `refresh(stale)` logs in again only if no other thread already has."""

    def __init__(self, login: Callable[[], str], margin: float = TOKEN_MARGIN):
        self._login = login
        self._lock = threading.Lock()
        self.margin = margin
        self.token: str | None = None
        self.expires = 0.0

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        token = self.token
        if token is None or time.time() > self.expires - self.margin:
            token = self.refresh(token)
        request.headers["Authorization"] = token
        return request

    def refresh(self, stale: str | None) -> str:
        with self._lock:
            if self.token == stale:
                token = self._login()
                self.token, self.expires = token, jwt_exp(token)
            return self.token  # type: ignore[return-value]


class PocketBaseClient:
    """One PocketBase server, as its superuser (0.22 admins or 0.23+ superusers).

    Construction checks that the URL is a PocketBase and logs in, so a wrong password, an
    unreachable URL or another kind of server fails at once in one line. `retries` applies to
    every request (429, 5xx, refused or dropped connections, truncated bodies): the default five
    wait about 16-18 s in all, enough to ride out a PocketBase restart.
    """

    def __init__(self, url: str, email: str, password: str, *, timeout: float = 30, retries: int = 5):
        self.url = url.rstrip("/")
        self.email = email
        self._password = password
        self.timeout = timeout
        self.retries = max(0, retries)
        self.generation = 0  # 22 or 23, from the login endpoint that answered
        self.logins = 0  # successful superuser logins (re-logins show token expiry or rejection)
        self.retried = 0  # requests repeated after a network failure, 429 or 5xx
        self.session = requests.Session()
        self.session.headers["Accept"] = "application/json"
        self.auth = SuperuserAuth(self._login)
        try:
            self._check_health()
            self.auth.refresh(None)
        except BaseException:
            self.session.close()
            raise

    def close(self) -> None:
        self.session.close()

    # -- calls ---------------------------------------------------------------------------------

    def get(self, path: str, params: Mapping[str, Any], what: str | None = None) -> Any:
        """A GET's decoded JSON body."""
        return self.send("GET", path, params=params, what=what, parse=True)[1]

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.send(method, path, **kwargs)[0]

    def send(self, method: str, path: str, *, params: Mapping[str, Any] | None = None, json_body: Any = None,
             auth: bool = True, check: bool = True, idempotent: bool = True, stream: bool = False,
             timeout: float | None = None, what: str | None = None, parse: bool = False
             ) -> tuple[requests.Response, Any]:
        """One API call with retries, and one re-login on 401/403.

        A request that is not idempotent is only repeated when the server cannot have acted on it
        (a refused connection, 429). With `parse`, the body is decoded inside the attempt, so a
        connection dropped in the middle of a response is retried like any other failure."""
        reauthed = False
        while True:
            token = self.auth.token
            resp, body = self._with_retries(
                lambda: self._attempt(method, path, params, json_body, auth, idempotent, stream, timeout, parse),
                idempotent, f"{method} {path}")
            if auth and resp.status_code in (401, 403) and not reauthed:
                reauthed = True
                self.auth.refresh(token)
                continue
            if check and resp.status_code >= 400:
                if resp.status_code == 404 and what:
                    raise SourceError(f"{self.url}: unknown {what} (404 {message(resp)})")
                raise SourceError(f"{self.url}: {method} {path} answered {resp.status_code}: {message(resp)}")
            return resp, body

    def json(self, resp: requests.Response) -> Any:
        if resp.status_code == 204 or not resp.content:
            return None
        try:
            return json.loads(resp.content)
        except ValueError as exc:
            raise SourceError(f"{self.url}: {resp.request.path_url.split('?')[0]} did not answer "
                              f"JSON ({short(exc)})") from exc

    def retrying(self, *errors: type[BaseException]) -> tenacity.Retrying:
        """This client's policy (attempts, backoff) over other failures, e.g. a download's."""
        return self._policy(tenacity.retry_if_exception_type(errors))

    def _policy(self, retry: tenacity.retry_base, **kwargs: Any) -> tenacity.Retrying:
        return tenacity.Retrying(retry=retry, wait=_wait, stop=tenacity.stop_after_attempt(self.retries + 1),
                                 reraise=True, **kwargs)

    # -- inside --------------------------------------------------------------------------------

    def _attempt(self, method: str, path: str, params: Mapping[str, Any] | None, json_body: Any, auth: bool,
                 idempotent: bool, stream: bool, timeout: float | None, parse: bool
                 ) -> tuple[requests.Response, Any]:
        resp = self.session.request(method, self.url + path, params=params, json=json_body,
                                    auth=self.auth if auth else None, stream=stream,
                                    timeout=(min(10.0, self.timeout), timeout or self.timeout))
        if resp.status_code in RETRY_STATUS and (idempotent or resp.status_code == 429):
            raise Retryable(f"HTTP {resp.status_code}: {message(resp)}", resp)
        body = None
        if parse and resp.status_code == 200:
            try:
                body = json.loads(resp.content)
            except ValueError as exc:
                if resp.headers.get("Content-Type", "").startswith("application/json"):
                    raise Retryable(f"truncated JSON response ({exc})") from exc
                raise SourceError(f"{self.url}: {method} {path} did not answer JSON "
                                  "(not a PocketBase server?)") from exc
        return resp, body

    def _with_retries(self, attempt: Callable[[], Any], idempotent: bool, what: str) -> Any:
        def worth_it(exc: BaseException) -> bool:
            return isinstance(exc, (*NETWORK_ERRORS, Retryable)) and (idempotent or never_sent(exc))

        def count(_: tenacity.RetryCallState) -> None:
            self.retried += 1

        retrying = self._policy(tenacity.retry_if_exception(worth_it), before_sleep=count)
        try:
            return retrying(attempt)
        except (*NETWORK_ERRORS, Retryable) as exc:
            n = retrying.statistics.get("attempt_number", 1)
            tries = f"{n} attempt{'s' if n > 1 else ''}"
            if isinstance(exc, Retryable):
                raise SourceError(f"{self.url}: {what} kept failing ({short(exc)}; {tries})") from exc
            raise SourceError(f"{self.url}: cannot reach the server ({short(exc)}; {what}, {tries})") from exc

    def _check_health(self) -> None:
        """Fail early, and clearly, when the URL is not a PocketBase server."""
        resp = self.request("GET", "/api/health", auth=False, check=False)
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code != 200 or not isinstance(body, dict) or "message" not in body:
            kind = resp.headers.get("Content-Type", "?").split(";")[0]
            raise BadSource(f"{self.url}: not a PocketBase server (GET /api/health answered "
                            f"{resp.status_code} {kind})")

    def _login(self) -> str:
        """Log in as superuser; the endpoint that answers also tells the schema generation."""
        body = {"identity": self.email, "password": self._password}
        for generation, path in [e for e in LOGINS if e[0] == self.generation] or LOGINS:
            resp = self.request("POST", path, json_body=body, auth=False, check=False)
            if resp.status_code == 404:
                continue
            if resp.status_code in (400, 401, 403):
                raise BadSource(f"{self.url}: superuser login as {self.email!r} failed: wrong email "
                                f"or password ({message(resp)})")
            if resp.status_code != 200:
                raise SourceError(f"{self.url}: superuser login answered {resp.status_code}: {message(resp)}")
            token = (self.json(resp) or {}).get("token")
            if not token:
                raise SourceError(f"{self.url}: superuser login returned no token")
            self.generation = generation
            self.logins += 1
            return token
        raise BadSource(f"{self.url}: no superuser login endpoint (not a PocketBase server, or a "
                        "version older than 0.22)")


# -- helpers ---------------------------------------------------------------------------------------


def _wait(state: tenacity.RetryCallState) -> float:
    """The server's Retry-After when it sent one, else exponential backoff with jitter."""
    exc = state.outcome.exception() if state.outcome else None
    resp = exc.response if isinstance(exc, Retryable) else None
    retry_after = resp.headers.get("Retry-After") if resp is not None else None
    if retry_after and retry_after.isdigit():
        return min(float(retry_after), RETRY_AFTER_CAP)
    return _backoff(state)


_backoff = tenacity.wait_exponential_jitter(multiplier=BACKOFF_BASE, max=BACKOFF_CAP, jitter=BACKOFF_BASE)


def never_sent(exc: BaseException) -> bool:
    """True when the server cannot have acted on the request: a 429, or no connection was made."""
    if isinstance(exc, Retryable):
        return exc.response is not None and exc.response.status_code == 429
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None  # urllib3's MaxRetryError
    return isinstance(exc, requests.ConnectionError) and isinstance(reason, NewConnectionError)


def jwt_exp(token: str) -> float:
    """The token's expiry (JWT `exp`), or one hour from now if it cannot be read."""
    try:
        payload = token.split(".")[1]
        payload += "=" * (-len(payload) % 4)
        return float(json.loads(base64.urlsafe_b64decode(payload))["exp"])
    except (IndexError, KeyError, TypeError, ValueError):
        return time.time() + 3600


def message(resp: requests.Response) -> str:
    """The `message` of either error shape (0.22 `code`, 0.23+ `status`), else the start of the body."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("message"):
        msg = str(body["message"])
        data = body.get("data")
        if isinstance(data, dict) and data:
            details = "; ".join(
                f"{k}: {v.get('message', v) if isinstance(v, dict) else v}" for k, v in data.items()
            )
            msg = f"{msg} ({details})"
        return msg
    text = resp.text.strip().replace("\n", " ")
    return text[:120] or resp.reason or "no message"


def short(exc: BaseException) -> str:
    """One line about a failure, without urllib3's nested reprs."""
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    text = str(reason or (exc.args[0] if exc.args else "") or exc)
    m = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if m:
        return m.group(1).strip()
    for marker in ("Read timed out", "Connection refused", "Connection reset", "Connection aborted",
                   "RemoteDisconnected", "IncompleteRead", "timed out"):
        if marker in text:
            return marker
    return text.splitlines()[0][:200] if text else type(exc).__name__
