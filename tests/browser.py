"""A small Chrome DevTools Protocol (CDP) client for tests: headless Chromium and one page at a time.

    with Browser(find_chromium()) as browser:
        page = browser.open_page()
        page.navigate(path.as_uri())          # returns after Page.loadEventFired
        page.wait_until("document.images.length > 0", timeout=30)
        png = page.screenshot()
        page.problems()                       # console errors, uncaught exceptions, failed loads

Chromium is started with ``--remote-debugging-port=0``; it writes the port it chose (and the
browser's websocket path) to ``DevToolsActivePort`` in its user-data folder. One websocket to the
browser carries everything: a page target is attached with ``flatten``, so its commands and events
travel on the same socket tagged with a ``sessionId``. Messages are read in this thread only when a
caller waits for something; events that arrive meanwhile are kept per session.
"""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import websocket

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = ("install Chromium to run it: Debian/Ubuntu `sudo apt-get install chromium` "
                "(.ci/run installs it in CI), or put a chromium/google-chrome executable on PATH")
START_TIMEOUT = 60.0     # guards only: every wait below ends on an event, these bound a hung browser
CALL_TIMEOUT = 60.0


class CDPError(RuntimeError):
    """A CDP command failed, the browser died, or something awaited never came."""


def find_chromium() -> Optional[str]:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """Headless Chromium driven over CDP; a context manager that always ends the process."""

    def __init__(self, executable: str, *, width: int = 1200, height: int = 900):
        self.executable, self.width, self.height = executable, width, height
        self._process: Optional[subprocess.Popen] = None
        self._socket: Optional[websocket.WebSocket] = None
        self._folder: Optional[str] = None
        self._next_id = 0
        self._responses: Dict[int, dict] = {}
        self._events: Dict[Optional[str], List[dict]] = {}

    # ------------------------------------------------------------------ process

    def __enter__(self) -> "Browser":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        self._folder = tempfile.mkdtemp(prefix="tokenflow-chromium-")
        args = [self.executable, "--headless=new", "--remote-debugging-port=0", f"--user-data-dir={self._folder}",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
                "--mute-audio", "--autoplay-policy=no-user-gesture-required", f"--window-size={self.width},{self.height}"]
        # Chromium refuses to run as root with its sandbox, and in containers without user namespaces (or
        # without the SUID helper, chromium-sandbox) it has none to use; the pages opened here are our own files.
        args += ["--no-sandbox", "about:blank"]
        self._log = open(Path(self._folder) / "chromium.log", "wb")
        self._process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        port_file = Path(self._folder) / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if port_file.is_file():
                lines = port_file.read_text().split()
                if len(lines) >= 2:
                    break
            if self._process.poll() is not None:
                raise CDPError(f"chromium exited with {self._process.returncode} before it listened:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise CDPError(f"chromium wrote no DevToolsActivePort within {START_TIMEOUT:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)
        port, path = lines[0], lines[1]
        # no Origin header: Chromium refuses websocket clients that send an origin it was not told to allow
        self._socket = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=CALL_TIMEOUT,
                                                   suppress_origin=True, enable_multithread=False)

    def log_tail(self, limit: int = 3000) -> str:
        try:
            return (Path(self._folder) / "chromium.log").read_bytes()[-limit:].decode(errors="replace")
        except (OSError, TypeError):
            return ""

    def close(self) -> None:
        if self._socket is not None:
            try:
                self.call("Browser.close", timeout=10)
            except (CDPError, OSError, websocket.WebSocketException):
                pass
            self._socket.close()
            self._socket = None
        if self._process is not None:
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
            self._process = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    # ------------------------------------------------------------------ protocol

    def call(self, method: str, params: Optional[dict] = None, *, session: Optional[str] = None,
             timeout: float = CALL_TIMEOUT) -> dict:
        """Send one command and return its result; CDPError if it failed or no answer came."""
        if self._socket is None:
            raise CDPError("the browser is not running")
        self._next_id += 1
        message: Dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._socket.send(json.dumps(message))
        reply = self._pump(lambda: self._responses.pop(message["id"], None), timeout, f"the reply to {method}")
        if "error" in reply:
            raise CDPError(f"{method} failed: {reply['error']}")
        return reply.get("result", {})

    def events(self, session: Optional[str]) -> List[dict]:
        return self._events.setdefault(session, [])

    def wait_event(self, method: str, *, session: Optional[str], timeout: float = CALL_TIMEOUT, start: int = 0) -> dict:
        """The first event ``method`` of ``session`` at or after position ``start`` of its event list."""
        def found():
            return next((e for e in self.events(session)[start:] if e["method"] == method), None)

        return self._pump(found, timeout, f"event {method}")

    def _pump(self, done, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while True:
            result = done()
            if result is not None:
                return result
            left = deadline - time.monotonic()
            if left <= 0:
                raise CDPError(f"no {what} within {timeout:.0f} s")
            self._socket.settimeout(left)
            try:
                raw = self._socket.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except (websocket.WebSocketException, OSError) as error:
                raise CDPError(f"lost the browser while waiting for {what}: {error}\n{self.log_tail()}") from None
            message = json.loads(raw)
            if "id" in message:
                self._responses[message["id"]] = message
            else:
                self.events(message.get("sessionId")).append(message)

    def open_page(self) -> "Page":
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        for domain in ("Page", "Runtime", "Log", "Network"):
            page.call(f"{domain}.enable")
        return page


class Page:
    """One tab. ``problems()`` lists what a person would see as errors in the DevTools console."""

    def __init__(self, browser: Browser, session: str):
        self.browser, self.session = browser, session
        self._since = 0   # where the current document's events start in the session's event list

    def call(self, method: str, **params) -> dict:
        return self.browser.call(method, params, session=self.session)

    def navigate(self, url: str, *, timeout: float = CALL_TIMEOUT) -> None:
        """Go to ``url`` and return once its load event fired (CDPError if navigation failed)."""
        start = self._since = len(self.browser.events(self.session))
        result = self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise CDPError(f"navigation to {url} failed: {result['errorText']}")
        self.browser.wait_event("Page.loadEventFired", session=self.session, timeout=timeout, start=start)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (promises awaited), or CDPError if it threw."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise CDPError(f"{expression!r} threw: {_exception_text(result['exceptionDetails'])}")
        return result["result"].get("value")

    def wait_until(self, expression: str, *, timeout: float, interval: float = 0.1) -> Any:
        """Evaluate ``expression`` until it is truthy; return that value (CDPError with the last value after timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise CDPError(f"{expression!r} still {value!r} after {timeout:.0f} s")
            time.sleep(interval)

    def screenshot(self, *, full_page: bool = True) -> bytes:
        """PNG bytes of the viewport, or of the whole page at CSS-pixel scale 1."""
        params: Dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.call("Page.getLayoutMetrics")["cssContentSize"]
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        return base64.b64decode(self.call("Page.captureScreenshot", **params)["data"])

    def problems(self) -> List[str]:
        """Since the last ``navigate``: console errors and assertions, uncaught exceptions, error log
        entries (failed resource loads among them: "Failed to load resource"), and requests that failed."""
        found, urls = [], {}
        for event in self.browser.events(self.session)[self._since:]:
            method, params = event["method"], event.get("params", {})
            if method == "Network.requestWillBeSent":
                urls[params["requestId"]] = params["request"]["url"]
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
                found.append(f"console.{params['type']}: {text}")
            elif method == "Runtime.exceptionThrown":
                found.append(f"uncaught exception: {_exception_text(params['exceptionDetails'])}")
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                entry = params["entry"]
                found.append(f"log error ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".rstrip())
            elif method == "Network.loadingFailed" and not params.get("canceled"):
                found.append(f"failed load: {params.get('errorText')} {urls.get(params.get('requestId'), '')}".rstrip())
        return found


def _exception_text(details: dict) -> str:
    exception = details.get("exception") or {}
    return exception.get("description") or details.get("text", "unknown exception")
