"""Draw a digit and see what the model reads: python draw.py [CHECKPOINT] [--port 8000]

Serves mnist_mlp_tools/draw.html, one self-contained page (no request leaves the machine): a canvas for mouse, pen or
finger, the model's guess, its ten probabilities and the 28x28 image it saw. Each drawing goes to
POST /predict as a PNG and is prepared as predict.py prepares a picture (handwriting.py).
Standard library server only; Ctrl-C stops it (exit code 130).
"""

import base64
import binascii
import concurrent.futures
import contextlib
import io
import ipaddress
import json
import os
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

from mnist_mlp_tools import commands, run_folder
from mnist_mlp_tools.commands import UsageError

checkpoints, handwriting, models = commands.lazy_import(
    "mnist_mlp_tools.checkpoints", "mnist_mlp_tools.handwriting", "mnist_mlp_tools.models"
)


def newest_checkpoint(folder="."):
    """The checkpoint of the latest epoch in `folder`; a one-line UsageError if there is none."""
    found = run_folder.checkpoint_epochs(folder)
    if not found:
        raise UsageError(
            "no noteLearning_*.pth in this folder: train one with `python train.py`, "
            "or name one: python draw.py CHECKPOINT"
        )
    return found[max(found)]


def parse_args(argv):
    parser = commands.ArgumentParser(description=__doc__.splitlines()[0].split(": ", 1)[0] + ".")
    parser.add_argument(
        "checkpoint",
        nargs="?",
        metavar="CHECKPOINT",
        help="a checkpoint written by train.py (default: the newest noteLearning_*.pth here)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: the whole network)")
    parser.add_argument("--port", type=commands.bounded_int(0, 65535), default=8000, help="port (0: any free one)")
    commands.add_device_flag(parser)
    args = parser.parse_args(argv)
    args.checkpoint = commands.existing_file(args.checkpoint or newest_checkpoint(), "checkpoint")
    return args


PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mnist_mlp_tools", "draw.html")
# What the server shares, bounded: a classroom's network must not exhaust the machine.
MAX_BODY = 2 * 1024 * 1024  # a drawn digit is a few kilobytes; a photo of one, well under this
MAX_DRAWING_PIXELS = 8_000_000  # decoded at most this large (a JPEG first shrunk on decode): ~32 MB
DECODES_AT_ONCE = 2  # pictures decoded together; the others wait up to DECODE_WAIT seconds, then 503
DECODE_WAIT = 5.0
MAX_CONNECTIONS = 64  # open at once; past it, the oldest one still sending its request is dropped
REQUEST_DEADLINE = 10.0  # seconds to send a whole request, however slowly it trickles in
DATA_URL_PREFIX = b"data:image/png;base64,"


class DigitReader:
    """The model, loaded once (weights only) and in eval mode, and what it reads in a picture."""

    def __init__(self, path, device="cpu"):
        checkpoint = checkpoints.load_checkpoint(path)
        self.model = models.model_from_checkpoint(path, checkpoint, device).eval()
        self.classes, self.scaling = checkpoints.dataset_classes(checkpoint), checkpoints.input_scaling(checkpoint)
        self.checkpoint_text = f"reading with {os.path.basename(path)} (epoch {checkpoint['epoch']})"

    def read(self, body):
        """The answer for one picture's bytes (a PNG, or any image PIL reads); ValueError if there is none."""
        if body.startswith(DATA_URL_PREFIX):
            try:
                body = base64.b64decode(body[len(DATA_URL_PREFIX) :], validate=True)
            except binascii.Error:
                raise ValueError("the data URL's base64 is not valid") from None
        image = handwriting.decode_image(io.BytesIO(body), MAX_DRAWING_PIXELS)
        pixels = handwriting.digit_pixels(image)
        probabilities = handwriting.class_probabilities(self.model, pixels, self.scaling)
        seen = io.BytesIO()
        Image.frombytes("L", (28, 28), bytes(pixels.flatten().tolist())).save(seen, format="PNG")
        top = probabilities.argsort(descending=True, stable=True)[:3]  # ties: the lower class first
        return {
            "prediction": self.classes[int(probabilities.argmax())],
            "probabilities": [float(value) for value in probabilities],
            "top3": [{"class": self.classes[int(index)], "probability": float(probabilities[index])} for index in top],
            "classes": self.classes,
            "image": "data:image/png;base64," + base64.b64encode(seen.getvalue()).decode(),
        }


def in_script(value):
    """JSON for a <script> element: a "</script>" in a file name must not end it."""
    return json.dumps(value).replace("<", "\\u003c")


def read_page(reader):
    """draw.html with the checkpoint's class names and name filled in; a UsageError if it is missing."""
    try:
        with open(PAGE, encoding="utf-8") as file:
            page = file.read()
    except OSError as error:
        raise UsageError(
            f"cannot read the page {PAGE} ({error.strerror or error}): draw.html belongs in "
            "mnist_mlp_tools/ beside draw.py"
        ) from None
    page = page.replace("__CLASSES__", in_script(reader.classes))
    return page.replace("__CHECKPOINT__", in_script(reader.checkpoint_text)).encode()


class Server(ThreadingHTTPServer):
    """A thread a connection, at most MAX_CONNECTIONS of them; a listen backlog for a classroom's burst
    (the standard 5 resets connections); IPv4 or IPv6 as the host is written."""

    request_queue_size = 128
    daemon_threads = True

    def __init__(self, address, reader, page=None):
        self.reader = reader
        self.page = page if page is not None else read_page(reader)
        self.decoding = threading.BoundedSemaphore(DECODES_AT_ONCE)
        # the decodes run on these threads, not the connections': the memory a decode frees is reused by
        # the next one, where each of many threads would keep its own (malloc's per-thread arenas)
        self.decoder = concurrent.futures.ThreadPoolExecutor(DECODES_AT_ONCE, thread_name_prefix="decode")
        self.receiving = {}  # socket -> when it connected, while its request is still coming in
        self.counted = set()  # the connections held open: at most MAX_CONNECTIONS (a dropped one is not)
        self.lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    def process_request(self, request, client_address):
        """Give the connection a thread; past MAX_CONNECTIONS, first drop the oldest one still sending its
        request (a slow client), or, if every one is being answered, answer this one 503 at once."""
        with self.lock:
            self._drop_late(time.monotonic())
            if len(self.counted) >= MAX_CONNECTIONS and self.receiving:
                self._drop(min(self.receiving, key=self.receiving.get))
            busy = len(self.counted) >= MAX_CONNECTIONS
            if not busy:
                self.counted.add(request)
                self.receiving[request] = time.monotonic()
        if busy:  # not counted, so closed here rather than by shutdown_request
            with contextlib.suppress(OSError):
                request.sendall(
                    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Connection: close\r\n\r\n" + json.dumps({"error": "busy: try again"}).encode()
                )
                request.shutdown(socket.SHUT_WR)
            request.close()
            return
        super().process_request(request, client_address)

    def request_received(self, request):
        """Its whole request is in: the connection is no longer one that a flood may drop."""
        with self.lock:
            self.receiving.pop(request, None)

    def server_close(self):
        super().server_close()
        self.decoder.shutdown(wait=False)

    def close_request(self, request):
        with self.lock:
            self.receiving.pop(request, None)
            self.counted.discard(request)
        super().close_request(request)

    def service_actions(self):
        """Between polls (every half second): drop the connections past their request's deadline."""
        with self.lock:
            self._drop_late(time.monotonic())

    def _drop_late(self, now):
        for late in [request for request, since in self.receiving.items() if now - since > REQUEST_DEADLINE]:
            self._drop(late)

    def _drop(self, request):
        """End a connection whose request is still coming in: its thread's read fails and it closes."""
        self.receiving.pop(request, None)
        self.counted.discard(request)  # its slot is free now; its thread ends within moments
        with contextlib.suppress(OSError):
            request.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request, client_address):
        """A client that went away mid-answer is no error of ours; anything else is reported in one line."""
        error = sys.exc_info()[1]
        if not isinstance(error, (ConnectionError, TimeoutError)):
            print(f"error: a request from {client_address[0]} failed ({commands.error_text(error)})", file=sys.stderr)


class Handler(BaseHTTPRequestHandler):
    """GET / is the page; POST /predict reads a picture; every error is JSON {"error": ...}."""

    timeout = 10  # seconds a client may take to send its request: a slow one cannot hold a thread forever
    server_version = "draw.py"

    def send(self, status, body, content_type="application/json", headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status, value, headers=()):
        self.send(status, json.dumps(value, ensure_ascii=False).encode(), headers=headers)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a garbage request line, 414, 431, 501) as JSON too, as every answer."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # a line too garbled to name a version: answer as HTTP/1.0
            self.request_version = "HTTP/1.0"
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self.send_json(code, {"error": message or phrase})

    def parse_request(self):
        """A GET's request is whole once its headers are in (a POST's once its body is: do_POST)."""
        whole = super().parse_request()
        if whole and self.command != "POST":
            self.server.request_received(self.request)
        return whole

    def do_GET(self):
        if self.path in ("/", "/index.html"):
            self.send(200, self.server.page, "text/html; charset=utf-8")
        elif self.path == "/predict":
            self.send_json(405, {"error": "POST a PNG to /predict"}, [("Allow", "POST")])
        else:
            self.send_json(404, {"error": f"no page {self.path}"})

    do_HEAD = do_GET

    def do_POST(self):
        if self.path != "/predict":
            status = 405 if self.path in ("/", "/index.html") else 404
            return self.send_json(
                status, {"error": f"nothing to POST to at {self.path}"}, [("Allow", "GET")] if status == 405 else ()
            )
        length = commands.whole_number(self.headers.get("Content-Length"))
        if length is None:
            return self.send_json(411, {"error": "a Content-Length in ASCII digits is needed"})
        if int(length) > MAX_BODY:  # refused before reading a byte of it
            self.close_connection = True
            return self.send_json(413, {"error": f"the picture is over {MAX_BODY // 1024 // 1024} MB"})
        try:
            body = self.rfile.read(int(length))
        except (TimeoutError, ConnectionError):  # a client too slow, or gone: free the thread
            self.close_connection = True
            return None
        if len(body) < int(length):
            return self.send_json(400, {"error": "the body is shorter than its Content-Length"})
        self.server.request_received(self.request)
        if not self.server.decoding.acquire(timeout=DECODE_WAIT):  # a few pictures at a time: bounded memory
            return self.send_json(503, {"error": "busy reading other drawings: try again"}, [("Retry-After", "1")])
        try:
            answer = self.server.decoder.submit(self.server.reader.read, body).result()
        except ValueError as error:
            return self.send_json(400, {"error": str(error)})
        finally:
            self.server.decoding.release()
        self.send_json(200, answer)

    def do_other(self):
        self.send_json(405, {"error": f"{self.command} is not served here"}, [("Allow", "GET, POST")])

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_other

    def log_message(self, format, *args):  # quiet: the page is the output
        pass


def is_loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv=None):
    def body(argv):
        args = parse_args(argv)
        path = args.checkpoint
        reader = DigitReader(path, commands.resolve_device(args.device))
        page = read_page(reader)  # a missing draw.html is its own error, not "cannot listen"
        try:
            server = Server((args.host, args.port), reader, page)
        except OSError as error:
            raise UsageError(f"cannot listen on {args.host}:{args.port} ({error.strerror or error})") from None
        with server, commands.torch_threads(1):  # one drawing is tiny work: more threads only wait for each other
            if not is_loopback(args.host):
                print(
                    f"warning: --host {args.host}: the page is open to every machine on that network, "
                    "not only this one",
                    file=sys.stderr,
                )
            shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
            shown = f"[{shown}]" if ":" in shown else shown
            print(f"http://{shown}:{server.server_address[1]}/  (reading with {path}; Ctrl-C stops it)", flush=True)
            server.serve_forever()
        return 0

    return commands.run_main(body, argv)


if __name__ == "__main__":
    commands.script(main)
