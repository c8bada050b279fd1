"""The servers as a browser meets them: the push and jobs pages in headless Chromium, pages on another origin (CORS),
and the stop with a browser's EventSource connected.

Chromium and ChromeDriver are Debian's (``make test`` installs them), driven with Selenium; every test here is skipped,
with the reason, where one of them is missing or cannot start. The flags are the ones this machine needs (no sandbox
as root, no background networking: its connections would be refused by the closed network).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import tempfile
import time

import pytest

from example_servers import EXAMPLES, ServerProcess, backend_name, wait_until  # noqa: F401

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]
PUSH, JOBS, UPLOAD = EXAMPLES / "push_server.py", EXAMPLES / "jobs_server.py", EXAMPLES / "upload_server.py"


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as error:
        pytest.skip(f"selenium is not installed ({error}): pip install -e '.[test]'")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.skip(f"{path} is missing: apt-get install chromium chromium-driver (make test does)")
    profile = tempfile.mkdtemp(prefix="iokit-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for a driver online
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except Exception as error:  # noqa: BLE001 - any reason it cannot start is a reason to skip
        shutil.rmtree(profile, ignore_errors=True)
        pytest.skip(f"headless Chromium does not start here: {str(error).splitlines()[0]}")
    driver.set_script_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def text_of(browser, element_id: str) -> str:
    return browser.find_element("id", element_id).text


def shows(browser, element_id: str, expected: str, timeout: float = 10.0) -> bool:
    """Wait until the page's element shows ``expected``; return whether it did."""
    return wait_until(lambda: text_of(browser, element_id) == expected, timeout, interval=0.05)


def publish(server, topic: str, count: int, start: int = 0) -> list[str]:
    connection = http.client.HTTPConnection(*server.address, timeout=10)
    try:
        ids = []
        for n in range(start, start + count):
            connection.request("POST", f"/topics/{topic}/messages", body=json.dumps({"n": n}))
            response = connection.getresponse()
            ids.append(json.loads(response.read())["id"])
            assert response.status == 202
        return ids
    finally:
        connection.close()


def blank(browser) -> None:
    browser.get("about:blank")  # closes the page's connections (its EventSource) before the next test


# -- the pages ---------------------------------------------------------------------------------------------------------

def test_push_page_shows_events_its_last_id_and_a_reconnect_across_a_restart(browser, backend_name):
    with ServerProcess(PUSH, backend_name) as first:
        port = str(first.port)
        browser.get(f"{first.url}/?topic=page")
        assert shows(browser, "state", "open"), text_of(browser, "state")
        ids = publish(first, "page", 3)
        assert shows(browser, "count", "3") and text_of(browser, "last-id") == ids[-1]
        assert text_of(browser, "reconnects") == "0"
    # The server restarts on the same port and publishes before the page is back: the page's last id is from the
    # earlier life, so it must get a reset (with bare numbers it silently got the new life's events after "3").
    with ServerProcess(PUSH, backend_name, "--port", port) as second:
        later = publish(second, "page", 5, start=3)
        assert shows(browser, "reconnects", "1", timeout=15), text_of(browser, "state")
        assert shows(browser, "resets", "1") and text_of(browser, "count") == "3"
        assert text_of(browser, "last-id") == later[-1]  # the reset moved it to now
        newest = publish(second, "page", 1, start=8)
        assert shows(browser, "count", "4") and text_of(browser, "last-id") == newest[0]
        blank(browser)


def test_jobs_page_follows_one_job_by_short_and_by_long_polling(browser, backend_name):
    with ServerProcess(JOBS, backend_name) as server:
        browser.get(server.url + "/")
        duration = browser.find_element("id", "duration")
        duration.clear()
        duration.send_keys("2500")
        browser.find_element("id", "start-button").click()
        assert shows(browser, "long-status", "succeeded", timeout=10), text_of(browser, "long-status")
        assert shows(browser, "short-status", "succeeded", timeout=10), text_of(browser, "short-status")
        short, long = int(text_of(browser, "short-requests")), int(text_of(browser, "long-requests"))
        # Short polling asked every second (0, 1, 2, 3 s), long polling once: its one request was held until the
        # job ended. Unchanged short polls were 304s without a body.
        assert short >= 3 and long == 1, (short, long)
        assert int(text_of(browser, "short-not-modified")) >= 1
        assert text_of(browser, "job-id").startswith("job ")
        blank(browser)


# -- pages on another origin -------------------------------------------------------------------------------------------

def test_a_page_on_another_origin_polls_with_cors_and_is_refused_without(browser, backend_name):
    with ServerProcess(JOBS, backend_name) as page_server:
        origin = page_server.url
        with ServerProcess(JOBS, backend_name, "--cors-origin", origin) as api:
            browser.get(f"{origin}/?server={api.url}")
            duration = browser.find_element("id", "duration")
            duration.clear()
            duration.send_keys("1200")
            browser.find_element("id", "start-button").click()
            assert shows(browser, "long-status", "succeeded"), text_of(browser, "job-id")
            assert shows(browser, "short-status", "succeeded")  # read Location, ETag and Retry-After: exposed
        with ServerProcess(JOBS, backend_name, "--cors-origin", "http://elsewhere.example") as closed:
            refused = browser.execute_async_script(FETCH_SCRIPT, f"{closed.url}/jobs", "POST",
                                                   {"Content-Type": "application/json"}, '{"duration_ms": 0}')
            assert refused["error"], refused  # the browser refused the page the answer: no CORS headers for it
        blank(browser)


FETCH_SCRIPT = """
const [url, method, headers, body, done] = arguments;
fetch(url, {method, headers, body}).then(
  (response) => done({status: response.status, headers: Object.fromEntries(response.headers.entries())}),
  (error) => done({error: String(error)}));
"""

TUS_SCRIPT = """
const [server, done] = arguments;
const tus = {"Tus-Resumable": "1.0.0"};
(async () => {
  const created = await fetch(`${server}/files`, {method: "POST", headers: {...tus, "Upload-Length": "11"}});
  const location = created.headers.get("Location");
  const patched = await fetch(server + location, {method: "PATCH", body: "hello world",
    headers: {...tus, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}});
  const head = await fetch(server + location, {method: "HEAD", headers: tus});
  const download = await fetch(server + location);
  done({created: created.status, location, patched: patched.status, offset: patched.headers.get("Upload-Offset"),
        head: head.headers.get("Upload-Offset"), length: head.headers.get("Upload-Length"),
        resumable: head.headers.get("Tus-Resumable"), body: await download.text()});
})().catch((error) => done({error: String(error)}));
"""

EVENTSOURCE_SCRIPT = """
const [server, done] = arguments;
const source = new EventSource(`${server}/events?topic=cors`);
source.onopen = () => fetch(`${server}/topics/cors/messages`, {method: "POST", body: '{"from": "a page"}',
                                                               headers: {"Content-Type": "application/json"}});
source.onmessage = (event) => { source.close(); done({id: event.lastEventId, data: event.data}); };
source.onerror = () => { if (source.readyState === EventSource.CLOSED) done({error: "closed"}); };
"""


def test_a_page_on_another_origin_uploads_with_tus_and_subscribes_with_eventsource(browser, backend_name):
    with ServerProcess(JOBS, backend_name) as page_server, tempfile.TemporaryDirectory() as directory:
        origin = page_server.url
        browser.get(origin + "/")
        with ServerProcess(UPLOAD, backend_name, "--dir", directory, "--cors-origin", origin) as uploads:
            result = browser.execute_async_script(TUS_SCRIPT, uploads.url)
            assert result.get("error") is None, result
            assert (result["created"], result["patched"]) == (201, 204) and result["location"].startswith("/files/")
            assert result["offset"] == result["head"] == result["length"] == "11" and result["resumable"] == "1.0.0"
            assert result["body"] == "hello world"
        with ServerProcess(PUSH, backend_name, "--cors-origin", origin) as push:
            event = browser.execute_async_script(EVENTSOURCE_SCRIPT, push.url)
            assert event.get("error") is None and json.loads(event["data"]) == {"from": "a page"}, event
            assert event["id"].endswith("-1")
        blank(browser)


# -- the stop ----------------------------------------------------------------------------------------------------------

def test_sigterm_with_an_idle_browser_eventsource_is_prompt(browser, backend_name):
    with ServerProcess(PUSH, backend_name) as server:
        browser.get(f"{server.url}/?topic=idle")
        assert shows(browser, "state", "open")
        publish(server, "idle", 1)
        assert shows(browser, "count", "1")
        time.sleep(0.3)  # idle: the stream waits for its next event
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(10) == 0
        took = time.monotonic() - started
        # Was 1.1-1.4 s on threads, epoll and uring (0.02 s on blocking).
        assert took < 0.5, f"the server took {took:.2f} s to stop with an idle EventSource connected"
    blank(browser)
