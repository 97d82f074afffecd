"""The images of the tasks segany-serve is asked about, fetched within a deadline and a size cap.

A task's image URL is whatever the request says, and segany-serve answers anyone who can reach it,
so fetching is narrowed:

- Label Studio's API key goes only to Label Studio's configured origin (paths such as
  `/data/upload/...`; `..` segments refused: `LabelStudioClient.absolute_url`);
- other http(s) URLs are fetched only under the prefixes the operator allowed (`--allow-image-url`),
  without the key; anything else is refused, so requests cannot make segany-serve reach other hosts;
- each fetch ends by a total deadline (httpx's timeouts bound each read, so a server dripping a byte
  at a time would otherwise hold it without bound) and stops past a size cap; no redirects.

Fetching is asynchronous and outside the model lock: a slow image server delays only the click that
needs that image.
"""

import asyncio
from collections.abc import Sequence
from urllib.parse import urlsplit

import httpx
from starlette.concurrency import run_in_threadpool

from segany_train.label_studio.client import LabelStudioClient, has_dot_segment, same_origin
from segany_train.label_studio.regions import BadRequest


class TaskImageSource:
    """Fetches task images from Label Studio (with its key) or under `allowed_prefixes` (without)."""

    def __init__(self, *, allowed_prefixes: Sequence[str] = (), deadline_seconds: float = 30.0, max_bytes: int = 50 << 20) -> None:
        for prefix in allowed_prefixes:
            parts = urlsplit(prefix)
            if parts.scheme not in ("http", "https") or not parts.hostname or not parts.path.endswith("/"):
                raise ValueError(f"--allow-image-url {prefix!r}: give an http(s) URL with a host and a path ending in '/' (e.g. https://images.example.com/tasks/)")
        if not deadline_seconds > 0:
            raise ValueError(f"the image fetch deadline must be positive, got {deadline_seconds}")
        if max_bytes < 1:
            raise ValueError(f"the image size cap must be at least 1 byte, got {max_bytes}")
        self.allowed_prefixes = tuple(allowed_prefixes)
        self.deadline_seconds = deadline_seconds
        self.max_bytes = max_bytes

    async def fetch(self, url: str, label_studio: LabelStudioClient | None) -> bytes:
        """The image bytes behind `url`; BadRequest (one line) when refused, failed, too slow or too large."""
        shown = url[:100]
        on_label_studio = url.startswith("/") or (label_studio is not None and same_origin(url, label_studio.url))
        if on_label_studio:
            if label_studio is None:
                raise BadRequest("segany-serve does not know Label Studio's address or API key: pass --label-studio-url and --label-studio-api-key")
            target = label_studio.absolute_url(url)  # ForeignURL (a BadRequest-like ValueError) for //host or ..
        elif self._allowed(url):
            target = url
        else:
            raise BadRequest(f"refusing to fetch the task image {shown!r}: not on Label Studio and not under an --allow-image-url prefix")
        try:
            return await asyncio.wait_for(self._download(target, label_studio if on_label_studio else None), self.deadline_seconds)
        except asyncio.TimeoutError:
            raise BadRequest(f"GET {shown}: no complete image within {self.deadline_seconds:g} s") from None
        except httpx.HTTPError as error:
            raise BadRequest(f"GET {shown}: {type(error).__name__}: {error}") from None

    def _allowed(self, url: str) -> bool:
        if has_dot_segment(url):
            return False
        return any(same_origin(url, prefix) and urlsplit(url).path.startswith(urlsplit(prefix).path) for prefix in self.allowed_prefixes)

    async def _download(self, url: str, label_studio: LabelStudioClient | None) -> bytes:
        async with httpx.AsyncClient(timeout=self.deadline_seconds, follow_redirects=False) as http:
            response = await self._get(http, url, label_studio)
            if response.status_code == 401 and label_studio is not None and label_studio.is_personal_access_token:
                await response.aclose()  # the access token expired: exchange the key again
                response = await self._get(http, url, label_studio, refresh=True)
            try:
                if response.status_code != 200:
                    raise BadRequest(f"GET {url[:100]}: {response.status_code}")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > self.max_bytes:
                    raise BadRequest(f"GET {url[:100]}: the image is {int(declared)} bytes, over the {self.max_bytes}-byte cap (--max-image-mb)")
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > self.max_bytes:
                        raise BadRequest(f"GET {url[:100]}: the image is over the {self.max_bytes}-byte cap (--max-image-mb)")
                return bytes(data)
            finally:
                await response.aclose()

    @staticmethod
    async def _get(http: httpx.AsyncClient, url: str, label_studio: LabelStudioClient | None, *, refresh: bool = False) -> httpx.Response:
        headers = {}
        if label_studio is not None:  # the key's exchange (a personal access token) is a blocking call
            headers["Authorization"] = await run_in_threadpool(label_studio.authorization, refresh=refresh)
        return await http.send(http.build_request("GET", url, headers=headers), stream=True)
