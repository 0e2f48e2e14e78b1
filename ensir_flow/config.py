"""Task configs: a YAML file of per-task defaults (models, bin width, solver, metric settings).

A config only sets defaults; command-line options override it. Every key is checked: an unknown
key or a value of the wrong kind is refused with the file and the key named, because a misspelt
key that is silently ignored changes a run without anyone noticing.

The configs of the repository's `configs/` folder are installed with the package (as
`ensir_flow.configs`) and can be named without a path: `--config deblurring-gopro`.
"""

from importlib import resources
from pathlib import Path

import yaml

from .errors import InputError, first_line
from .lsq import MAX_SHRINKAGE, is_shrinkage
from .lut import SOLVERS

#: Top-level keys and, for `metrics`, its sub-keys; each with a check of its value.
CHECKS = {
    "models": ("a list of model names", lambda v: isinstance(v, list) and v and all(isinstance(m, str) and m for m in v)),
    "bin_width": ("an integer from 1 to 256", lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 256),
    "solver": (f"one of {', '.join(SOLVERS)}", lambda v: v in SOLVERS),
    "shrinkage": (f"'auto' or a non-negative number up to {MAX_SHRINKAGE:g}", lambda v: v == "auto" or is_shrinkage(_number(v))),
}
METRIC_CHECKS = {
    "y_channel": ("true or false", lambda v: isinstance(v, bool)),
    "crop_border": ("a non-negative integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
}


def _number(value):
    """`value`, or the number a string spells: YAML 1.1 reads 1e4 (no dot) as a string."""
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


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


#: The package that holds the installed configs (the repository's `configs/` folder).
INSTALLED_CONFIGS = "ensir_flow.configs"
CONFIG_SUFFIX = ".yaml"


def installed_configs() -> dict[str, Path]:
    """The configs installed with ensir-flow, by name (file name without `.yaml`), sorted."""
    folder = resources.files(INSTALLED_CONFIGS)
    return {
        entry.name.removesuffix(CONFIG_SUFFIX): Path(str(entry))
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(CONFIG_SUFFIX)
    }


def config_summary(path) -> str:
    """The first line of a config's leading comment: what task it is for."""
    for line in Path(path).read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def resolve_config(name_or_path) -> Path:
    """The config file `name_or_path` designates: an existing file, else the installed config of
    that name (`installed_configs`); neither is an InputError listing the installed names. A bare
    installed name that is also a file in the working folder is refused as ambiguous: whichever
    won, a stray file would silently change (or hide) the settings the user named."""
    path = Path(name_or_path)
    installed = installed_configs()
    if str(name_or_path) in installed:
        if path.is_file():
            raise InputError(
                f"{name_or_path}: both an installed config and a file in {Path.cwd()}; "
                f"name the file as ./{name_or_path}, or the installed one as {installed[str(name_or_path)]}"
            )
        return installed[str(name_or_path)]
    if path.is_file():
        return path
    raise InputError(
        f"{name_or_path}: neither a config file nor an installed config "
        f"({', '.join(installed) or 'none installed'}; `ensir-flow configs` lists them)"
    )


def load_config(path) -> dict:
    """The checked contents of the YAML config at `path` (or installed under that name, see
    `resolve_config`)."""
    path = resolve_config(path)
    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise InputError(
            f"{path}: not a readable YAML config (not UTF-8 text: byte {error.object[error.start]:#04x} at offset {error.start})"
        ) from None
    except (OSError, yaml.YAMLError) as error:
        raise InputError(f"{path}: not a readable YAML config ({first_line(error)})") from None
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
