"""One-line, actionable errors for bad input, and the wrapper that turns them into a non-zero exit."""
import functools
import sys


class ScreenerInputError(Exception):
    """Bad user input (data, paths, arguments). The message must say what is wrong and what to do."""


EXIT_CODE_BAD_INPUT = 2


def exit_on_input_error(entry):
    """Decorator for `*_entry` functions: a ScreenerInputError becomes one line on stderr and exit code 2."""

    @functools.wraps(entry)
    def wrapped(*args, **kwargs):
        try:
            return entry(*args, **kwargs)
        except ScreenerInputError as e:
            _close_progress_bars()
            print(f'nnScreener error: {e}', file=sys.stderr)
            sys.exit(EXIT_CODE_BAD_INPUT)

    return wrapped


def _close_progress_bars() -> None:
    """Ends a progress bar the error interrupted, so the error starts a line of its own."""
    from tqdm import tqdm
    for bar in list(getattr(tqdm, '_instances', ())):
        bar.close()
