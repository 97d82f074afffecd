"""A small client of Label Studio's REST API: authentication, JSON calls, and fetching task images.

Label Studio accepts two kinds of key: a legacy token (`Authorization: Token <key>`, enabled per
organisation, e.g. `label-studio start --enable-legacy-api-token`) and a personal access token, a
JWT refresh token that is exchanged at `/api/token/refresh` for a short-lived access token sent as
`Bearer`. Both are handled here; which one a key is is read from its shape (a JWT has three
dot-separated parts).

The key goes to Label Studio's own origin only: a path or URL naming another host (`//host/x`,
which `urljoin` makes another origin) or climbing with `..` (`/data/upload/../../admin`) is refused,
since task data (where segany-serve's image URLs come from) is written by whoever imports tasks.

The engine (`data_engine/label_studio_tasks.py`) and `segany-serve` (which fetches the images of the
tasks it is asked about, `task_images.py`) use this one client; `label-studio-sdk` is not needed in
this environment.
"""

from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import httpx


class LabelStudioError(RuntimeError):
    """A Label Studio request failed; the message names the request and what the server said."""


class ForeignURL(ValueError):
    """A path or URL that is not on Label Studio's origin, or climbs out of its path with `..`."""


class LabelStudioClient:
    """Calls Label Studio at `url` (e.g. http://localhost:8080) with `api_key`."""

    def __init__(self, *, url: str, api_key: str, timeout_seconds: float = 60.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"the Label Studio URL must start with http:// or https://, got {url!r}")
        if not api_key:
            raise ValueError("a Label Studio API key is needed (Account & Settings -> Access Token)")
        self.url = url.rstrip("/")
        self.api_key = api_key
        self._http = httpx.Client(timeout=timeout_seconds)
        self._access_token: str | None = None

    @property
    def is_personal_access_token(self) -> bool:
        return self.api_key.count(".") == 2

    def authorization(self, *, refresh: bool = False) -> str:
        """The Authorization header's value (a personal access token is exchanged, once or on `refresh`)."""
        if not self.is_personal_access_token:
            return f"Token {self.api_key}"
        if self._access_token is None or refresh:
            response = self._http.post(f"{self.url}/api/token/refresh", json={"refresh": self.api_key})
            if response.status_code != 200:
                raise LabelStudioError(f"POST /api/token/refresh: {response.status_code} {_detail(response)}")
            self._access_token = response.json()["access"]
        return f"Bearer {self._access_token}"

    def absolute_url(self, path_or_url: str) -> str:
        """A path Label Studio gave (/data/upload/...) or a URL as a URL on this server; ForeignURL
        for another origin or a `..`/`.` path segment (also percent-encoded or with backslashes)."""
        if has_dot_segment(path_or_url):  # checked before urljoin resolves them
            raise ForeignURL(f"{path_or_url[:100]!r} has a '.' or '..' path segment; refused")
        url = urljoin(self.url + "/", path_or_url)
        if not same_origin(url, self.url):
            raise ForeignURL(f"{path_or_url[:100]!r} is not on Label Studio's origin {self.url}; its API key goes nowhere else")
        return url

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        url = self.absolute_url(path)
        try:
            response = self._http.request(method, url, headers={"Authorization": self.authorization()}, **kwargs)
            if response.status_code == 401 and self.is_personal_access_token:  # the access token expired
                response = self._http.request(method, url, headers={"Authorization": self.authorization(refresh=True)}, **kwargs)
        except httpx.HTTPError as error:
            raise LabelStudioError(f"{method} {url}: {type(error).__name__}: {error}") from None
        if response.status_code >= 400:
            raise LabelStudioError(f"{method} {path}: {response.status_code} {_detail(response)}")
        return response

    def call(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None, files: Any = None) -> Any:
        """A JSON API call; returns the decoded JSON answer (None for an empty one)."""
        response = self._send(method, path, json=json, params=params, files=files)
        return response.json() if response.content else None

    def close(self) -> None:
        self._http.close()


def has_dot_segment(path_or_url: str) -> bool:
    """Whether the path has a '.' or '..' segment, also percent-encoded or written with backslashes."""
    segments = unquote(urlsplit(path_or_url).path).replace("\\", "/").split("/")
    return "." in segments or ".." in segments


def same_origin(url: str, other: str) -> bool:
    """Whether two absolute URLs share scheme, host and port (the default port when none is given)."""
    a, b = urlsplit(url), urlsplit(other)
    try:
        ports = [u.port or {"http": 80, "https": 443}.get(u.scheme.lower()) for u in (a, b)]
    except ValueError:  # a port that is not a number
        return False
    return a.scheme.lower() == b.scheme.lower() and a.hostname == b.hostname and ports[0] == ports[1] and a.hostname is not None


def _detail(response: httpx.Response) -> str:
    """The server's error text on one line, shortened."""
    text = " ".join(response.text.split())
    return text[:300] + ("..." if len(text) > 300 else "")
