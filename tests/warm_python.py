"""`python SCRIPT ARGS` for the tests, started in milliseconds instead of seconds.

A new Python spends ~3 s of a core importing torch, and the tests start dozens of scripts to send
them signals, close their output or kill them. So one server process imports torch and the project
once (`python tests/warm_python.py --serve SOCKET`, started by conftest), and each run is a fork of
it: the client (`python -S tests/warm_python.py SCRIPT ARGS`, a real process the test starts, signals
and waits for as it would `python SCRIPT ARGS`) hands the server its standard streams, folder,
environment and arguments; the forked child takes them and runs SCRIPT as __main__, and leaves
through Python's own exit (its exit code, its flush of stdout). The client passes SIGINT and SIGTERM
on, and ends as the child ended: the same exit code, or killed by the same signal. A client killed
takes its child with it.

Only for the project's own scripts (their modules are the server's, already imported). A test of
what a fresh interpreter does (its imports, its start-up, its memory, another folder's copy of a
module) starts `sys.executable` instead. Linux only (fork, pidfds, descriptors sent over a socket);
elsewhere WARM_PYTHON is plain `sys.executable`.
"""

import io
import json
import os
import signal
import socket
import sys
import time

ADDRESS_VARIABLE = "MNIST_MLP_WARM_PYTHON"  # the server's socket, for the clients the tests start
FORWARDED = (signal.SIGINT, signal.SIGTERM)


def is_open(descriptor):
    try:
        os.fstat(descriptor)
        return True
    except OSError:
        return False


def run_client(argv):
    """Have the server fork SCRIPT ARGS with this process's streams, folder and environment; exit as it did."""
    streams = [number for number in (0, 1, 2) if is_open(number)]  # before the socket takes a free number
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    deadline = time.monotonic() + 120  # the server may still be importing torch
    while True:
        try:
            connection.connect(os.environ[ADDRESS_VARIABLE])
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "streams": streams}
    socket.send_fds(connection, [json.dumps(request).encode()], streams)
    child = int(connection.recv(64))
    for number in FORWARDED:
        signal.signal(number, lambda number, frame: os.kill(child, number))
    answer = connection.recv(64)  # the child's exit code, negative for a signal; nothing if the server died
    code = int(answer) if answer else 1
    if code < 0:
        if -code not in (signal.SIGKILL, signal.SIGSTOP):  # those two cannot be caught, nor reset
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


def serve(address):
    """Import what the scripts import, then fork a child for each client, forever."""
    import importlib
    import runpy
    import select
    import threading

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base_path = sys.path[1:]  # a fresh `python SCRIPT` has the script's folder, then these
    sys.path.insert(0, root)
    project = ("checkpoints", "data_files", "fast_step", "handwriting", "pictures", "run_folder")
    for name in (
        "torch",
        "torchvision.datasets",
        "torchvision.transforms",
        "mnist_mlp",
        *(f"mnist_mlp_tools.{module}" for module in project),
    ):
        importlib.import_module(name)  # the seconds this server exists to spend once

    def report_exit(connection, child):
        pidfd = os.pidfd_open(child)
        readable, _, _ = select.select([connection, pidfd], [], [])
        if pidfd not in readable:  # the client is gone (killed): its child goes too
            os.kill(child, signal.SIGKILL)
        _, status = os.waitpid(child, 0)
        try:
            connection.send(str(os.waitstatus_to_exitcode(status)).encode())
        except OSError:
            pass
        connection.close()
        os.close(pidfd)

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(address)
    listener.listen(128)
    while True:
        connection, _ = listener.accept()
        message, descriptors, _, _ = socket.recv_fds(connection, 1 << 20, 3)
        request = json.loads(message)
        child = os.fork()
        if child == 0:
            listener.close()
            connection.close()
            break
        for descriptor in descriptors:
            os.close(descriptor)
        connection.send(str(child).encode())
        threading.Thread(target=report_exit, args=(connection, child), daemon=True).start()
    # The child: the client's streams (one it had closed is closed here too, and its sys stream None,
    # as a fresh interpreter has it), folder, environment and arguments; then SCRIPT as __main__.
    for number, name in enumerate(("stdin", "stdout", "stderr")):
        stream = None
        if number in request["streams"]:
            os.dup2(descriptors[request["streams"].index(number)], number)
            before = getattr(sys, name)  # made for the server's stream: a pipe here is another kind of file
            stream = io.TextIOWrapper(
                io.open(number, "rb" if number == 0 else "wb", closefd=False),
                encoding=before.encoding,
                errors=before.errors,
                newline="\n",
                line_buffering=number == 2 or os.isatty(number),
            )
        else:
            os.close(number)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    for descriptor in descriptors:
        os.close(descriptor)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = request["argv"]
    sys.path[:] = [os.path.dirname(os.path.abspath(sys.argv[0])), *base_path]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2])
    else:
        run_client(sys.argv[1:])
