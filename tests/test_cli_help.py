"""`-h` of every console script in setup.py: a description, help for every option, and the option's default where
it has one (a new user reads `-h` before the docs)."""
import argparse
import importlib
import re
import sys
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / 'setup.py'
SCRIPTS = re.findall(r"'(nnScreener_\w+) = ([\w.]+):(\w+)'", SETUP.read_text())


def _squeezed(text: str) -> str:
    return re.sub(r'\s', '', text)  # argparse wraps lines, also at hyphens


def test_setup_lists_the_console_scripts():
    assert len(SCRIPTS) >= 8 and 'nnScreener_demo' in [s for s, _, _ in SCRIPTS]


def _help_of(script, module, function, monkeypatch, capsys):
    """Runs `<script> -h` -> (its parser, the printed help without whitespace)."""
    parsers = []
    parse_args = argparse.ArgumentParser.parse_args

    def recording_parse_args(self, *args, **kwargs):
        parsers.append(self)
        return parse_args(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, 'parse_args', recording_parse_args)
    monkeypatch.setattr(sys, 'argv', [script, '-h'])
    with pytest.raises(SystemExit) as exit_info:
        getattr(importlib.import_module(module), function)()
    assert exit_info.value.code == 0
    (parser,) = parsers
    return parser, _squeezed(capsys.readouterr().out)


@pytest.mark.parametrize('script, module, function', SCRIPTS, ids=[s for s, _, _ in SCRIPTS])
def test_help_explains_every_option_and_its_default(script, module, function, monkeypatch, capsys):
    parser, printed = _help_of(script, module, function, monkeypatch, capsys)
    assert parser.description and _squeezed(parser.description) in printed
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        option = action.option_strings[0]
        assert action.help, f'{script} {option}: no help text'
        text = parser._get_formatter()._expand_help(action)
        assert _squeezed(text) in printed, f'{script} {option}: help not printed'
        if action.default is not None and not action.required and action.nargs != 0:  # flags are off by default
            values = action.default if isinstance(action.default, list) else [action.default]
            assert 'default' in text.lower() and all(str(v) in text for v in values), \
                f'{script} {option}: help {text!r} does not state the default {action.default!r}'


def test_every_seed_option_is_spelled_double_dash_and_pretrain_still_takes_single(monkeypatch, capsys):
    for script, module, function in SCRIPTS:
        parser, _ = _help_of(script, module, function, monkeypatch, capsys)
        for action in parser._actions:
            if action.dest == 'seed':
                assert action.option_strings[0] == '--seed', f'{script}: {action.option_strings}'
    import nnscreener.run.pretrain as pretrain_module
    seeds = []
    monkeypatch.setattr(pretrain_module, 'pretrain', lambda *args: seeds.append(args[-1]) or {})
    for spelling, seed in (('--seed', 3), ('-seed', 4)):  # -seed: what earlier versions documented
        monkeypatch.setattr(sys, 'argv', ['nnScreener_pretrain', '-d', '500', '-device', 'cpu', spelling, str(seed)])
        pretrain_module.pretrain_entry()
    assert seeds == [3, 4]


def test_output_to_log_keeps_chatter_off_the_console(tmp_path, capfd):
    """Python's stdout and stderr (warnings print there) and a subprocess's output inside go to the log; console() still reaches the terminal,
    and everything is back on the console after the block (nested blocks too)."""
    import subprocess
    from nnscreener.utilities.console import console, output_to_log
    log = tmp_path / 'logs' / 'run.log'
    with output_to_log(str(log), 'outer'):
        print('python chatter')
        print('library warning', file=sys.stderr)
        subprocess.run([sys.executable, '-c', 'import sys; print("child stdout"); print("child stderr", file=sys.stderr)'])
        with output_to_log(str(tmp_path / 'inner.log'), 'inner'):
            print('inner chatter')
            console().write('progress line\n')
        console().write('outer progress\n')
    print('after')
    out, err = capfd.readouterr()
    assert out == 'after\n' and err == 'progress line\nouter progress\n'
    text = log.read_text()
    assert all(s in text for s in ('outer', 'python chatter', 'library warning', 'child stdout', 'child stderr'))
    assert 'inner chatter' in (tmp_path / 'inner.log').read_text() and 'inner chatter' not in text
