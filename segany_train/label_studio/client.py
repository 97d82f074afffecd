"""A small client of Label Studio's REST API: authentication, JSON calls, and fetching task images.

Label Studio accepts two kinds of key: a legacy token (`Authorization: Token <key>`, enabled per
organisation, e.g. `label-studio start --enable-legacy-api-token`) and a personal access token, a
JWT refresh token that is exchanged at `/api/token/refresh` for a short-lived access token sent as
`Bearer`. Both are handled here; which one a key is is read from its shape (a JWT has three
dot-separated parts).

The engine (`data_engine/label_studio_tasks.py`) and `segany-serve` (which fetches the images of the
tasks it is asked about) use this one client; `label-studio-sdk` is not needed in this environment.
"""

from typing import Any
from urllib.parse import urljoin

import httpx


class LabelStudioError(RuntimeError):
    """A Label Studio request failed; the message names the request and what the server said."""


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

    def _authorization(self, *, refresh: bool = False) -> str:
        if not self.is_personal_access_token:
            return f"Token {self.api_key}"
        if self._access_token is None or refresh:
            response = self._http.post(f"{self.url}/api/token/refresh", json={"refresh": self.api_key})
            if response.status_code != 200:
                raise LabelStudioError(f"POST /api/token/refresh: {response.status_code} {_detail(response)}")
            self._access_token = response.json()["access"]
        return f"Bearer {self._access_token}"

    def absolute_url(self, path_or_url: str) -> str:
        """A path Label Studio gave (/data/upload/...) as a URL on this server; full URLs unchanged."""
        return urljoin(self.url + "/", path_or_url)

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        url = self.absolute_url(path)
        try:
            response = self._http.request(method, url, headers={"Authorization": self._authorization()}, **kwargs)
            if response.status_code == 401 and self.is_personal_access_token:  # the access token expired
                response = self._http.request(method, url, headers={"Authorization": self._authorization(refresh=True)}, **kwargs)
        except httpx.HTTPError as error:
            raise LabelStudioError(f"{method} {url}: {type(error).__name__}: {error}") from None
        if response.status_code >= 400:
            raise LabelStudioError(f"{method} {path}: {response.status_code} {_detail(response)}")
        return response

    def call(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None, files: Any = None) -> Any:
        """A JSON API call; returns the decoded JSON answer (None for an empty one)."""
        response = self._send(method, path, json=json, params=params, files=files)
        return response.json() if response.content else None

    def fetch(self, path_or_url: str) -> bytes:
        """The bytes behind a URL Label Studio gave for a task's data (e.g. an uploaded image)."""
        return self._send("GET", path_or_url).content

    def close(self) -> None:
        self._http.close()


def _detail(response: httpx.Response) -> str:
    """The server's error text on one line, shortened."""
    text = " ".join(response.text.split())
    return text[:300] + ("..." if len(text) > 300 else "")
