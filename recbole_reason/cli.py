"""What the scripts share: reading a `key=value` setting, and ending bad input with one line, not a traceback."""

import os
import sys

import yaml
from recbole.config import Config


def parse_setting(text):
    """A command line's 'key=value' -> (key, value). The value is read as YAML with RecBole's own loader, as the
    config files are: `1e-3` is a float (plain YAML reads a string), `[1, 2]`, `True`, `~` mean what they mean there,
    anything else stays a string. One reader for every script's settings (run_compare's `--key=value` and
    `--variant`, the bench scripts' `--set`)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"a setting is key=value (e.g. learning_rate=0.001), got {text!r}")
    return key, yaml.load(value, Loader=Config._build_yaml_loader(None))


def keep_config_overrides(argv, script_args):
    """RecBole's Config reads `--key=value` from sys.argv: leave it only those, not the script's own options."""
    argv = argv if argv is not None else sys.argv[1:]
    sys.argv = [sys.argv[0]] + [
        a for a in argv if a.startswith("--") and "=" in a and a.split("=")[0][2:] not in vars(script_args)
    ]


def run_cli(main):
    """Run a script's `main()`: bad input (unknown model, missing dataset, invalid setting, a NaN stop) ends with one
    clear line instead of a traceback; `RECBOLE_REASON_TRACEBACK=1` shows the traceback."""
    try:
        return main()
    except (ValueError, KeyError, FileNotFoundError, FloatingPointError) as error:
        if os.environ.get("RECBOLE_REASON_TRACEBACK"):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        sys.exit(f"error: {message}\n(set RECBOLE_REASON_TRACEBACK=1 to see the full traceback)")

