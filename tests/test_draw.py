"""draw.py: the server without a browser (http.client), then the page in a real headless Chromium
driven by selenium. The browser tests skip where Chromium or selenium is missing, unless
MNIST_MLP_REQUIRE_BROWSER=1 (CI sets it), which makes a missing browser a failure."""

import base64
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from PIL import Image

import draw
from tests.conftest import ROOT, WARM_PYTHON, assert_usage_error, run_main


def request(address, method, path, body=None, headers=None):
    """(status, decoded JSON or text) of one request."""
    connection = http.client.HTTPConnection(*address, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        kind = response.getheader("Content-Type", "")
        return response.status, json.loads(data) if kind.startswith("application/json") else data.decode()
    finally:
        connection.close()


def read_until_closed(raw):
    """Everything the server sends on a raw socket, up to its closing the connection."""
    chunks = []
    while chunk := raw.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks)


def png_of(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def drawn_digit(pixels):
    """An MNIST digit as a user draws it: dark ink on white, 280x280."""
    image = Image.frombytes("L", (28, 28), bytes(pixels.tolist()))
    return png_of(Image.eval(image, lambda value: 255 - value).resize((280, 280), Image.Resampling.BICUBIC))


def test_the_page_is_served_self_contained(server):
    status, page = request(server, "GET", "/")
    assert status == 200 and "<canvas" in page and page.count("<canvas") == 1
    assert 'id="prediction"' in page and 'id="clear"' in page and "touch-action: none" in page
    assert '"0", "1", "2"' in page  # the checkpoint's class names, filled in
    assert '"reading with noteLearning_1.pth (epoch 1)"' in page  # and which checkpoint reads
    for outside in ("http://", "https://", 'src="//', "@import"):  # nothing is fetched from elsewhere
        assert outside not in page


def test_drawn_digits_are_read_and_answered_in_full(server, mnist):
    _, test_split = mnist
    right = 0
    for index in range(10):
        status, answer = request(
            server, "POST", "/predict", drawn_digit(test_split.pixels[index]), {"Content-Type": "image/png"}
        )
        assert status == 200
        assert answer["classes"] == [str(digit) for digit in range(10)] and len(answer["probabilities"]) == 10
        assert abs(sum(answer["probabilities"]) - 1) < 1e-5
        assert answer["prediction"] == str(max(range(10), key=lambda i: answer["probabilities"][i]))
        ranked = sorted(range(10), key=lambda i: -answer["probabilities"][i])[:3]
        assert answer["top3"] == [{"class": str(i), "probability": answer["probabilities"][i]} for i in ranked]
        seen = Image.open(io.BytesIO(base64.b64decode(answer["image"].split(",", 1)[1])))
        assert seen.size == (28, 28) and seen.mode == "L"
        right += answer["prediction"] == str(int(test_split.labels[index]))
    assert right >= 9
    data_url = b"data:image/png;base64," + base64.b64encode(drawn_digit(test_split.pixels[0]))
    status, answer = request(server, "POST", "/predict", data_url, {"Content-Type": "text/plain"})
    assert status == 200 and answer["prediction"] == str(int(test_split.labels[0]))


@pytest.mark.parametrize(
    "body, words",
    [
        (b"not a picture at all", "not an image"),
        (png_of(Image.new("L", (280, 280), 255)), "no ink"),
        (png_of(Image.new("L", (280, 280), 255))[:60], "cannot read"),
        (b"data:image/png;base64,@@@", "base64"),
    ],
)
def test_bad_bodies_are_400_json_errors(server, body, words):
    status, answer = request(server, "POST", "/predict", body, {"Content-Type": "image/png"})
    assert status == 400 and words in answer["error"]


def test_status_codes_for_what_is_not_served(server):
    assert request(server, "GET", "/nothing")[0] == 404
    assert request(server, "POST", "/nothing", b"x")[0] == 404
    assert request(server, "GET", "/predict")[0] == 405
    assert request(server, "DELETE", "/predict")[0] == 405
    with socket.create_connection(server, timeout=30) as raw:  # no Content-Length at all
        raw.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_until_closed(raw).startswith(b"HTTP/1.0 411")
    with socket.create_connection(server, timeout=30) as raw:  # 3 GB announced: refused before any is read
        raw.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 3000000000\r\n\r\n")
        answer = read_until_closed(raw)
        assert answer.startswith(b"HTTP/1.0 413") and b"over 2 MB" in answer


def test_a_slow_client_is_cut_off_and_others_are_still_answered(server, monkeypatch):
    monkeypatch.setattr(draw.Handler, "timeout", 1)
    with socket.create_connection(server, timeout=30) as slow:
        slow.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nonly a little")
        assert request(server, "GET", "/")[0] == 200  # answered while the slow one waits
        started = time.monotonic()
        assert slow.recv(100) == b""  # the server gave up on it
        assert time.monotonic() - started < 10


def test_a_burst_of_connections_is_answered_in_full(server, mnist):
    body = drawn_digit(mnist[1].pixels[0])
    results = []

    def one():
        try:
            results.append(request(server, "POST", "/predict", body, {"Content-Type": "image/png"})[0])
        except OSError as error:
            results.append(repr(error))

    threads = [threading.Thread(target=one) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [200] * 32


def test_without_a_checkpoint_it_says_how_to_make_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert_usage_error(*run_main(draw, [], capsys)[::2], "python train.py")
    assert draw.is_loopback("127.0.0.1") and draw.is_loopback("localhost") and not draw.is_loopback("0.0.0.0")


@pytest.mark.slow
def test_it_takes_the_newest_checkpoint_and_stops_on_ctrl_c_with_130(trained, tmp_path):
    for epoch in (1, 2):  # the later epoch is the one served
        shutil.copy(trained[0] / "noteLearning_1.pth", tmp_path / f"noteLearning_{epoch}.pth")
    process = subprocess.Popen(
        [*WARM_PYTHON, os.path.join(ROOT, "draw.py"), "--port", "0", "--host", "0.0.0.0"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("http://127.0.0.1:") and "noteLearning_2.pth" in line
        port = int(line.split(":")[2].split("/")[0])
        assert request(("127.0.0.1", port), "GET", "/")[0] == 200
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130 and "Traceback" not in err
    assert err.startswith("warning: --host 0.0.0.0") and "network" in err


@pytest.mark.slow
def test_ctrl_c_stops_it_even_when_started_with_sigint_ignored(trained):
    """A program started in the background inherits SIGINT ignored: Ctrl-C (SIGINT) must still stop it."""
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "draw.py"), str(trained[0] / "noteLearning_1.pth"), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        assert process.stdout.readline().startswith("http://127.0.0.1:")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130 and "Traceback" not in err


# ----------------------------------------------------------------------------- in a real browser


def chromium_or_skip():
    """Selenium and Debian's Chromium, or a skip (a failure where MNIST_MLP_REQUIRE_BROWSER=1)."""
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium")
    if missing:
        message = f"needs {', '.join(missing)}: apt-get install chromium chromium-driver; pip install selenium"
        if os.environ.get("MNIST_MLP_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    chromium_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="draw-test-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--window-size=1000,800",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser, server):
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    browser.get(f"http://127.0.0.1:{server[1]}/")
    return browser


# Strokes in the canvas's own 280x280 pixels.
DIGITS = {
    "1": [[(150, 40), (150, 240)]],
    "7": [[(70, 55), (210, 55), (120, 240)]],
    "0": [
        [
            (140 + 60 * x, 140 + 95 * y)
            for x, y in [(0, -1), (0.7, -0.7), (1, 0), (0.7, 0.7), (0, 1), (-0.7, 0.7), (-1, 0), (-0.7, -0.7), (0, -1)]
        ]
    ],
    "4": [[(170, 40), (70, 170), (215, 170)], [(170, 100), (170, 245)]],  # two strokes
}


def draw_strokes(driver, strokes, touch=False):
    """Draw `strokes` on the canvas with W3C pointer actions (a mouse, or a finger), one stroke at a time."""
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput

    canvas = driver.find_element("id", "canvas")
    size = driver.execute_script("return arguments[0].clientWidth", canvas)  # selenium's size counts the border
    for stroke in strokes:
        kind = interaction.POINTER_TOUCH if touch else interaction.POINTER_MOUSE
        actions = ActionBuilder(driver, mouse=PointerInput(kind, "finger" if touch else "mouse"), duration=0)
        points = []
        for (x0, y0), (x1, y1) in zip(stroke, stroke[1:]):  # dense enough for pointermove to draw lines
            points += [(x0 + (x1 - x0) * t / 8, y0 + (y1 - y0) * t / 8) for t in range(8)]
        points.append(stroke[-1])
        offsets = [(round((x / 280 - 0.5) * size), round((y / 280 - 0.5) * size)) for x, y in points]
        actions.pointer_action.move_to(canvas, *offsets[0]).pointer_down()
        for offset in offsets[1:]:
            actions.pointer_action.move_to(canvas, *offset)
        actions.pointer_action.pointer_up()
        actions.perform()


def wait_for_answer(driver):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 20).until(lambda d: d.find_element("id", "status").text.endswith("sure"))
    return driver.find_element("id", "prediction").text


def console_errors(driver):
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_digits_drawn_with_a_mouse_are_read_right(page, tmp_path):
    for digit, strokes in DIGITS.items():
        page.find_element("id", "clear").click()
        draw_strokes(page, strokes)
        answer = wait_for_answer(page)
        page.save_screenshot(str(tmp_path / f"drawn-{digit}.png"))
        assert answer == digit, (digit, tmp_path)
        bars = page.execute_script(
            "return [...document.querySelectorAll('#bars .fill')].map(e => parseFloat(e.style.width))"
        )
        assert len(bars) == 10 and abs(sum(bars) - 100) < 1 and max(bars) == bars[int(digit)]
        assert page.execute_script("return document.getElementById('seen').naturalWidth") == 28
        guesses = page.find_element("id", "guesses").text  # "top three: 7 (92.1%) · 1 (5.3%) · 9 (1.2%)"
        assert guesses.startswith(f"top three: {digit} (") and guesses.count("%)") == 3, guesses
    assert page.find_element("id", "checkpoint").text == "reading with noteLearning_1.pth (epoch 1)"
    page.save_screenshot(str(tmp_path / "draw.png"))
    with Image.open(tmp_path / "draw.png") as screenshot:
        assert screenshot.format == "PNG" and screenshot.size[0] >= 600
    assert console_errors(page) == []


def test_clear_empties_the_canvas_the_bars_and_the_image(page):
    draw_strokes(page, DIGITS["7"])
    wait_for_answer(page)
    page.find_element("id", "clear").click()
    state = page.execute_script("""
        const c = document.getElementById('canvas');
        const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        return {white: data.every(v => v === 255), prediction: document.getElementById('prediction').textContent,
                bars: [...document.querySelectorAll('#bars .fill')].map(e => parseFloat(e.style.width)),
                seen: document.getElementById('seen').hidden
                      && !document.getElementById('seen').getAttribute('src')};""")
    assert state == {"white": True, "prediction": "–", "bars": [0] * 10, "seen": True}


def test_a_finger_draws_on_a_phone_without_scrolling_the_page(page):
    page.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}
    )
    page.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": True, "maxTouchPoints": 5})
    page.refresh()
    assert page.execute_script("return document.documentElement.scrollWidth") <= 390  # fits: no sideways scroll
    draw_strokes(page, DIGITS["1"], touch=True)
    assert wait_for_answer(page) == "1"
    assert page.execute_script("return window.scrollY") == 0
    assert console_errors(page) == []


def test_a_checkpoint_name_cannot_break_the_pages_script(trained, tmp_path):
    odd = tmp_path / "a<!--<script>b.pth"  # a "<!--<script>" inside a script changes how HTML parses it
    odd.write_bytes((trained[0] / "noteLearning_1.pth").read_bytes())
    server = draw.Server(("127.0.0.1", 0), draw.DigitReader(str(odd)))
    try:
        page = server.page.decode()
    finally:
        server.server_close()
    assert "<!--<script>" not in page and "a\\u003c!--\\u003cscript>b.pth (epoch 1)" in page


# ----------------------------------------------------------------------------- what the server shares, bounded


@pytest.fixture(scope="module")
def bounded_server(trained):
    """`python draw.py` in a process of its own under the usual 1,024-descriptor limit: (address, pid)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "draw.py"), str(trained[0] / "noteLearning_1.pth"), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit,
    )
    try:
        line = process.stdout.readline()
        yield ("127.0.0.1", int(line.split(":")[2].split("/")[0])), process.pid
    finally:
        process.kill()
        process.wait()


def peak_memory(pid):
    """The process's peak resident memory in bytes (Linux's VmHWM)."""
    with open(f"/proc/{pid}/status") as file:
        return next(int(line.split()[1]) * 1024 for line in file if line.startswith("VmHWM:"))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads peak memory from Linux's /proc")
def test_big_drawings_at_once_keep_the_servers_memory_bounded(bounded_server, mnist):
    from PIL import ImageDraw

    address, pid = bounded_server
    _, test_split = mnist
    assert (
        request(address, "POST", "/predict", drawn_digit(test_split.pixels[0]), {"Content-Type": "image/png"})[0] == 200
    )
    before = peak_memory(pid)
    big = Image.new("RGBA", (2800, 2800), "white")  # 7.8 megapixels, just under the cap: 31 MB decoded
    ImageDraw.Draw(big).line([(1400, 400), (1400, 2400)], fill="black", width=200)
    body = png_of(big)
    assert len(body) < draw.MAX_BODY
    results = []
    threads = [
        threading.Thread(
            target=lambda: results.append(request(address, "POST", "/predict", body, {"Content-Type": "image/png"})[0])
        )
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    grown = peak_memory(pid) - before
    assert sorted(set(results)) in ([200], [200, 503]) and results.count(200) >= 2, results
    # two decodes at a time, each at most 8 megapixels: far from the 8 x (31 MB and its copies) of old
    assert grown < 250 * 2**20, f"peak memory grew by {grown / 2**20:.0f} MiB"
    print(f"peak memory grew by {grown / 2**20:.0f} MiB")
    huge = Image.new("1", (6300, 6300), 1)  # a 26 KB PNG of 40 megapixels: refused from its header
    status, answer = request(address, "POST", "/predict", png_of(huge), {"Content-Type": "image/png"})
    assert status == 400 and "8,000,000" in answer["error"]


@pytest.mark.slow
def test_a_flood_of_slow_connections_does_not_starve_real_requests(bounded_server):
    import resource

    address, _ = bounded_server
    slow, stop = [], threading.Event()
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)  # this side holds 1,100 sockets: room for them here
    wanted = 4096 if limits[1] == resource.RLIM_INFINITY else min(4096, limits[1])
    if wanted < 1200:
        pytest.skip(f"this process may open only {limits[1]} files; the flood needs 1,100 sockets")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(limits[0], wanted), limits[1]))

    def flood():  # 1,100 connections, each sending its request a byte at a time, slower than any deadline
        for _ in range(1100):
            if stop.is_set():
                return
            try:
                connection = socket.create_connection(address, timeout=5)
                connection.sendall(b"GET / HT")
                slow.append(connection)
            except OSError:
                pass

    flooding = threading.Thread(target=flood, daemon=True)
    flooding.start()
    try:
        time.sleep(1.0)  # the flood is well under way
        started = time.monotonic()
        answered = [request(address, "GET", "/")[0] for _ in range(3)]
        assert answered == [200, 200, 200] and time.monotonic() - started < 20
        flooding.join(60)
        assert len(slow) > 1024 - 64  # more than the server could hold open under its descriptor limit
        assert request(address, "GET", "/")[0] == 200
    finally:
        stop.set()
        for connection in slow:
            connection.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)


@pytest.mark.parametrize(
    "raw, status",
    [
        (b"GARBAGE\r\n\r\n", 400),  # not a request line
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),  # a request line over http.server's 64 KB
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431),  # more headers than http.server takes
        (b"BREW / HTTP/1.1\r\n\r\n", 501),  # a method nobody serves
    ],
)
def test_every_error_is_json_whoever_raises_it(server, raw, status):
    with socket.create_connection(server, timeout=10) as connection:
        connection.sendall(raw)
        answer = read_until_closed(connection)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split()[1] == str(status).encode() and b"application/json" in head, head[:200]
    assert "error" in json.loads(body)


def test_any_decoder_failure_is_a_400(server):
    from PIL import Image as PILImage

    samples = []
    for kind in ("DDS", "BLP", "TIFF", "GIF", "WEBP", "ICO"):
        try:
            buffer = io.BytesIO()
            PILImage.new("RGB", (64, 64), "white").save(buffer, format=kind)
        except (KeyError, OSError, ValueError):
            continue
        data = buffer.getvalue()
        samples.append((kind + " cut in half", data[: len(data) // 2]))  # the header intact, the data cut
        samples.append((kind + " cut at 40 bytes", data[:40]))
    assert len(samples) >= 6
    for kind, body in samples:
        status, answer = request(server, "POST", "/predict", body, {"Content-Type": "application/octet-stream"})
        assert status == 400 and answer["error"], (kind, status, answer)


def test_ipv6_hosts_and_a_missing_page_are_served_and_said(trained, monkeypatch, capsys):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    reader = draw.DigitReader(str(trained[0] / "noteLearning_1.pth"))
    try:
        httpd = draw.Server(("::1", 0), reader)
    except OSError:
        pytest.skip("::1 cannot be bound here")
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        connection = http.client.HTTPConnection("::1", httpd.server_address[1], timeout=10)
        connection.request("GET", "/")
        assert connection.getresponse().status == 200
        connection.close()
    finally:
        httpd.shutdown()
        httpd.server_close()
    monkeypatch.setattr(draw, "PAGE", str(trained[0] / "no-such-page.html"))
    assert_usage_error(
        *run_main(draw, [trained[0] / "noteLearning_1.pth", "--port", "0"], capsys)[::2],
        "cannot read the page",
        "draw.html",
    )
