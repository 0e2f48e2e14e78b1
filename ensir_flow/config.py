"""Task configs: a YAML file of per-task defaults (models, bin width, solver, metric settings).

A config only sets defaults; command-line options override it. Every key is checked: an unknown
key or a value of the wrong kind is refused with the file and the key named, because a misspelt
key that is silently ignored changes a run without anyone noticing.
"""

from pathlib import Path

import yaml

from .errors import InputError
from .lut import SOLVERS

#: Top-level keys and, for `metrics`, its sub-keys; each with a check of its value.
CHECKS = {
    "models": ("a list of model names", lambda v: isinstance(v, list) and v and all(isinstance(m, str) and m for m in v)),
    "bin_width": ("an integer from 1 to 256", lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 256),
    "solver": (f"one of {', '.join(SOLVERS)}", lambda v: v in SOLVERS),
    "shrinkage": ("'auto' or a non-negative number",
                  lambda v: v == "auto" or (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0)),
}
METRIC_CHECKS = {
    "y_channel": ("true or false", lambda v: isinstance(v, bool)),
    "crop_border": ("a non-negative integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
}


def _checked(mapping, checks: dict, path, prefix: str = "") -> dict:
    if not isinstance(mapping, dict):
        raise InputError(f"{path}: {prefix.rstrip('.') or 'the config'} must be a mapping of keys to values")
    for key, value in mapping.items():
        if key not in checks:
            raise InputError(f"{path}: unknown key '{prefix}{key}' (known: {', '.join(prefix + k for k in checks)})")
        kind, valid = checks[key]
        if not valid(value):
            raise InputError(f"{path}: '{prefix}{key}' must be {kind}, not {value!r}")
    return mapping


def load_config(path) -> dict:
    """The checked contents of the YAML config at `path`."""
    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise InputError(f"{path}: not a readable YAML config ({str(error).splitlines()[0]})") from None
    metrics = config.pop("metrics", {}) if isinstance(config, dict) else {}
    checked = _checked(config, CHECKS, path)
    if metrics:
        checked["metrics"] = _checked(metrics, METRIC_CHECKS, path, "metrics.")
    return checked


def command_defaults(config: dict) -> dict[str, dict]:
    """Per command, the option defaults a checked config sets (click's `default_map` form).

    The bin width and solver set both `fit`'s options and the candidates of `evaluate --cv`.
    """
    metrics = config.get("metrics", {})
    defaults = {
        "ingest": {"models": ",".join(config["models"])} if "models" in config else {},
        "fit": {key: config[key] for key in ("bin_width", "solver", "shrinkage") if key in config},
        "evaluate": {key: metrics[key] for key in METRIC_CHECKS if key in metrics},
    }
    if "bin_width" in config:
        defaults["evaluate"]["bin_widths"] = str(config["bin_width"])
    if "solver" in config:
        defaults["evaluate"]["solvers"] = config["solver"]
    return {command: values for command, values in defaults.items() if values}
