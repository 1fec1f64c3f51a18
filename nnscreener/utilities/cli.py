"""argparse of the console scripts: `-h` states the default of every option."""
import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' to an option's help, unless the help states its default in words already (e.g.
    'default: as planned'), the option is required or has no default value, or it is an on/off flag (off unless
    given)."""

    def _get_help_string(self, action):
        text = action.help or ''
        if 'default' in text.lower() or action.required or action.default is None or action.nargs == 0:
            return text
        return super()._get_help_string(action)


def argument_parser(description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=description, formatter_class=DefaultsHelpFormatter)


def add_device_argument(parser: argparse.ArgumentParser, default: str = 'cuda') -> None:
    parser.add_argument('-device', default=default, choices=['cuda', 'cpu', 'mps'],
                        help='device to run on: cuda (a GPU), cpu (slow) or mps (Apple GPU)')
