"""A screenshot of a logged-in Label Studio page with Debian's headless Chromium.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON messages
ending in a NUL byte, written to the browser's fd 3 and read from its fd 4), so nothing beyond the
standard library is needed. The session cookie comes from Label Studio's own login form.
"""

import base64
import fcntl
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
]  # fmt: skip


def login_session_cookie(label_studio_url: str, *, email: str, password: str) -> str:
    """The `sessionid` cookie Label Studio's login form sets for this user."""
    with httpx.Client(base_url=label_studio_url, follow_redirects=False, timeout=30) as http:
        page = http.get("/user/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        if token is None:
            raise RuntimeError("Label Studio's login page has no CSRF token")
        answer = http.post(
            "/user/login/",
            data={"csrfmiddlewaretoken": token.group(1), "email": email, "password": password},
            headers={"Referer": f"{label_studio_url}/user/login/"},
        )
        session = http.cookies.get("sessionid")
        if answer.status_code != 302 or not session:
            raise RuntimeError(f"Label Studio's login failed: {answer.status_code}")
        return session


class _DevTools:
    """Requests to Chromium over its debugging pipe, one at a time."""

    def __init__(self, to_browser: int, from_browser: int) -> None:
        self.to_browser, self.from_browser = to_browser, from_browser
        self.next_id = 0
        self.buffer = b""

    def send(self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None, timeout: float = 60) -> dict[str, Any]:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while b"\0" not in self.buffer:
                chunk = os.read(self.from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed its debugging pipe")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self.next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]
        raise RuntimeError(f"{method}: no answer within {timeout} s")


def _above_four(fd: int) -> int:
    """`fd` moved to a number above 4, so that placing the pipe ends on 3 and 4 cannot overwrite one."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return moved


def screenshot(url: str, out: Path, *, cookie: tuple[str, str, str], ready_script: str, timeout: float = 120, size: tuple[int, int] = (1400, 900)) -> Path:
    """Opens `url` with `cookie` (name, value, the URL it belongs to), waits until `ready_script`
    (JavaScript) is true plus two seconds for the drawing to settle, and saves a PNG to `out`."""
    to_read, to_browser = os.pipe()  # the browser reads fd 3
    from_browser, to_write = os.pipe()  # the browser writes fd 4
    to_read, to_write = _above_four(to_read), _above_four(to_write)
    with tempfile.TemporaryDirectory() as profile:
        arguments = [*FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}", "--remote-debugging-pipe", "about:blank"]
        process = subprocess.Popen(
            # bash (dash takes one-digit fds only) puts the pipe ends on fds 3 and 4, then becomes Chromium
            ["/bin/bash", "-c", f'exec "$0" "$@" 3<&{to_read} 4>&{to_write}', str(CHROMIUM), *arguments],
            pass_fds=(to_read, to_write),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_read)
        os.close(to_write)
        try:
            tools = _DevTools(to_browser, from_browser)
            name, value, cookie_url = cookie
            tools.send("Storage.setCookies", {"cookies": [{"name": name, "value": value, "url": cookie_url}]})
            target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            tools.send("Emulation.setDeviceMetricsOverride", {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": False}, session=session)
            tools.send("Page.navigate", {"url": url}, session=session)
            deadline = time.monotonic() + timeout
            while True:
                state = tools.send("Runtime.evaluate", {"expression": f"Boolean({ready_script})", "returnByValue": True}, session=session)
                if state["result"].get("value") is True:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url} was not ready ({ready_script}) within {timeout} s")
                time.sleep(1)
            time.sleep(2)
            png = tools.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(base64.b64decode(png))
            return out
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            os.close(to_browser)
            os.close(from_browser)
