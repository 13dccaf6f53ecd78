"""A real browser for the report tests: Debian's headless Chromium, driven over the DevTools
protocol (a websocket; aiohttp, which Snakemake already brings, is the client).

    with Browser() as browser:
        browser.open("file:///.../report.html")
        browser.evaluate("document.title")
        browser.evaluate("document.querySelector('table').rows.length", frame=browser.frames()[1])
        browser.screenshot(path)
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class BrowserError(RuntimeError):
    pass


class Browser:
    def __init__(self, width: int = 1400, height: int = 1000):
        if CHROMIUM is None:
            raise BrowserError("no chromium on PATH (tests/cluster/install-packages.sh installs Debian's)")
        self.size = (width, height)
        self._ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()

    def __enter__(self) -> "Browser":
        self._profile = tempfile.TemporaryDirectory(prefix="mnistflow-chromium-")
        self._proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-port=0",
             f"--user-data-dir={self._profile.name}", f"--window-size={self.size[0]},{self.size[1]}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        port_file = Path(self._profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self._proc.poll() is not None:
                self.__exit__(None, None, None)
                raise BrowserError("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        self._loop.run_until_complete(self._connect(port))
        return self

    async def _connect(self, port: int) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://127.0.0.1:{port}/json/list") as response:
            pages = [t for t in await response.json(content_type=None) if t["type"] == "page"]
        self._ws = await self._session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)

    def __exit__(self, *exc) -> None:
        if getattr(self, "_session", None) is not None:
            self._loop.run_until_complete(self._session.close())
        self._proc.terminate()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._loop.close()
        self._profile.cleanup()

    def send(self, method: str, **params) -> dict:
        return self._loop.run_until_complete(self._send(method, params))

    async def _send(self, method: str, params: dict) -> dict:
        message_id = next(self._ids)
        await self._ws.send_str(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            reply = json.loads((await asyncio.wait_for(self._ws.receive(), 30)).data)
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url: str) -> None:
        self.send("Page.enable")
        self.send("Page.navigate", url=url)

    def frames(self) -> list[str]:
        """Frame ids: the page's first, then its iframes'."""
        def walk(tree):
            yield tree["frame"]["id"]
            for child in tree.get("childFrames", []):
                yield from walk(child)

        return list(walk(self.send("Page.getFrameTree")["frameTree"]))

    def evaluate(self, expression: str, frame: str | None = None):
        """The expression's value (JSON), in the page or in one of its frames (an iframe from a
        data: URL is another origin to the page's scripts, not to DevTools)."""
        params = {"expression": expression, "returnByValue": True, "awaitPromise": True}
        if frame is not None:
            params["contextId"] = self.send("Page.createIsolatedWorld", frameId=frame)["executionContextId"]
        result = self.send("Runtime.evaluate", **params)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20, frame_index: int | None = None):
        deadline = time.monotonic() + timeout
        while True:
            try:
                frame = self.frames()[frame_index] if frame_index is not None else None
                value = self.evaluate(expression, frame)
            except (BrowserError, IndexError):
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out after {timeout}s waiting for {expression}")
            time.sleep(0.2)

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(base64.b64decode(data))
