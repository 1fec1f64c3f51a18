"""The console of nnscreener's commands: the lines a person reads and one progress bar; stock chatter goes to logs.

nnU-Net prints its trainer search, citation banner, plans and per-epoch lines, and libraries print warnings
(`torch.jit`, `hiddenlayer`, ...). Where a command of ours calls nnU-Net, `output_to_log` sends both output streams
into a log file: Python's `sys.stdout`/`sys.stderr` and the file descriptors 1 and 2, so worker processes,
subprocesses and C code follow. The terminal stays reachable through `console()` for progress bars.
"""
import io
import os
import sys
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from datetime import datetime

from tqdm import tqdm

_terminal = None  # while output goes to a log file: a stream on the terminal it replaced


def console():
    """Where progress bars go: the terminal, also inside `output_to_log`."""
    return _terminal if _terminal is not None else sys.stderr


def progress_bar(iterable=None, desc: str = None, **kwargs) -> tqdm:
    """A tqdm bar on the console; desc names what runs (the model, the stage, the fold)."""
    return tqdm(iterable, desc=desc, file=console(), dynamic_ncols=True, **kwargs)


@contextmanager
def output_to_log(log_file: str, title: str):
    """Everything printed inside goes to the end of log_file (created with its folder), after a line with the time
    and title; the terminal stays reachable through console(). Nests: the innermost log wins."""
    global _terminal
    outer = _terminal
    if outer is None:
        _terminal = _copy_of(sys.stderr)
    os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(log_file, 'a', buffering=1) as log:
            log.write(f'\n==== {datetime.now():%Y-%m-%d %H:%M:%S} {title} ====\n')
            log.flush()
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                with redirect_stdout(log), redirect_stderr(log):
                    yield
            finally:
                log.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)
        if outer is None and _terminal is not sys.stderr:
            _terminal.close()
        _terminal = outer


def _copy_of(stream):
    """A stream on the same file as `stream` that survives redirecting fd 1 and 2 (a duplicate of its descriptor), or
    the stream itself where it has none (e.g. pytest's capsys buffers)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return stream
    return os.fdopen(os.dup(fd), 'w', buffering=1, encoding=getattr(stream, 'encoding', None) or 'utf-8')
