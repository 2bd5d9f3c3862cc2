"""Shared click pieces: ``--config`` merging, slide inputs, shards, exit-code mapping.

Commands stay thin: parse options, build a config dataclass, call one library
function, turn its result into an exit code.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource

from wsi_mil.config import load_config_file

F = Callable[..., Any]


def _option_names(command: click.Command) -> dict[str, str]:
    """Normalised long option name (``patch_size``) -> click parameter name (``patch_size``)."""
    names: dict[str, str] = {}
    for p in command.params:
        if p.name:
            names.setdefault(p.name, p.name)
        for opt in getattr(p, "opts", []) + getattr(p, "secondary_opts", []):
            if opt.startswith("--"):
                names[opt[2:].replace("-", "_")] = p.name  # type: ignore[assignment]
    return names


#: top-level sections that are not commands: the Snakefile reads ``workflow:``
EXTRA_SECTIONS = ("workflow",)


def known_config_keys(command: click.Command | None = None) -> set[str]:
    """Every key a config file may hold at top level: an option of any ``wsi-mil`` command
    (config files are shared by all stages of ``wsi-mil run``), a command's section, or a
    section read by the workflows."""
    from wsi_mil.cli import cli
    from wsi_mil.config import COMMANDS

    known = set(COMMANDS) | set(EXTRA_SECTIONS)
    for cmd in [*cli.commands.values(), *([command] if command else [])]:
        known |= set(_option_names(cmd))
    return known


def _unknown_key_error(path: str, where: str, keys: list[str], known: set[str], hint: str) -> Any:
    """ConfigError naming the unknown keys, with difflib's closest known key for each."""
    import difflib

    from wsi_mil.errors import ConfigError

    shown = []
    for k in keys:
        close = difflib.get_close_matches(_norm_key(k), sorted(known), n=1, cutoff=0.6)
        if close:
            guess = close[0] if "_" in str(k) else close[0].replace("_", "-")
            shown.append(f"{k} (did you mean '{guess}'?)")
        else:
            shown.append(str(k))
    return ConfigError(f"{path}: unknown {where}: {', '.join(shown)}", hint)


def _norm_key(key: Any) -> str:
    return str(key).strip().lstrip("-").replace("-", "_")


def _check_top_level_keys(path: str, command: click.Command) -> None:
    """Top-level keys no command and no section knows are typos: refuse them."""
    from pathlib import Path

    import yaml

    from wsi_mil.cli import cli
    from wsi_mil.config import COMMANDS
    from wsi_mil.errors import ConfigError

    data = yaml.safe_load(Path(path).read_text()) or {}  # load_config_file validated it
    known = known_config_keys(command)
    options = {o for c in [*cli.commands.values(), command] for o in _option_names(c)}
    # a command's section that is not a mapping (unless an option has its name, as --run)
    sections = {*COMMANDS, *EXTRA_SECTIONS} - options
    for k, v in data.items():
        if k in sections and v is not None and not isinstance(v, dict):
            raise ConfigError(
                f"{path}: '{k}:' must be a section of option names and values, got {v!r}",
                f"e.g. '{k}:' followed by indented lines such as '  workers: 4'",
            )
    unknown = [k for k in data if _norm_key(k) not in known]
    if unknown:
        raise _unknown_key_error(
            path,
            "top-level key(s)",
            unknown,
            known,
            "top-level keys are long option names of the wsi-mil commands or sections named "
            "after a command; see 'wsi-mil <command> --help'",
        )


def _check_values(
    ctx: click.Context,
    path: str,
    values: dict[str, Any],
    top_level: dict[str, Any],
    names: dict[str, str],
) -> None:
    """Each config value must suit its option's type; the error names the file and the key
    (click's own "Invalid value for '--norm'" would not say where the value came from)."""
    from wsi_mil.errors import ConfigError

    params = {p.name: p for p in ctx.command.params}
    cmd = ctx.command.name
    for k, v in values.items():
        p = params.get(names.get(k, ""))
        if p is None or p.name == "config" or v is None:
            continue
        try:
            _check_yaml_scalar(p, v)
            p.type_cast_value(ctx, v)
        except click.BadParameter as e:
            key = k.replace("_", "-")
            if k in top_level and top_level[k] == v:
                raise ConfigError(
                    f"{path}: top-level key '{key}': {e.format_message()} (for 'wsi-mil {cmd}')",
                    f"a top-level key applies to every command with that option; to set it for "
                    f"one command only, move it under that command's section (e.g. '{cmd}:')",
                ) from None
            raise ConfigError(
                f"{path}: '{cmd}:' section key '{key}': {e.format_message()}",
                f"see 'wsi-mil {cmd} --help'",
            ) from None


def _check_yaml_scalar(param: click.Parameter, value: Any) -> None:
    """click.BadParameter for YAML values click would quietly convert where the command line
    refuses them: ``1.5`` for an integer option (int() gives 1) and ``true``/``false`` for a
    number (int(True) gives 1)."""
    kinds = param.type.types if isinstance(param.type, click.Tuple) else [param.type]
    values = value if isinstance(value, list | tuple) else [value]
    for kind, v in zip(kinds * len(values) if len(kinds) == 1 else kinds, values, strict=False):
        number = isinstance(kind, click.types.IntParamType | click.types.FloatParamType)
        if number and isinstance(v, bool):
            raise click.BadParameter(f"{v!r} is a boolean, not a number")
        if isinstance(kind, click.types.IntParamType) and isinstance(v, float):
            if not v.is_integer():
                raise click.BadParameter(f"{v!r} is not a whole number")


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value:
        defaults = load_config_file(value, ctx.command.name or "")
        _check_top_level_keys(value, ctx.command)
        names = _option_names(ctx.command)
        # top-level keys may belong to other commands and are ignored here; keys in this
        # command's own section must be options of this command
        top_level = load_config_file(value, "__none__")
        unknown = sorted(k for k in defaults if k not in names and k not in top_level)
        if unknown:
            raise _unknown_key_error(
                value,
                f"option(s) for '{ctx.command.name}'",
                unknown,
                set(names),
                f"see 'wsi-mil {ctx.command.name} --help' for the option names",
            )
        mapped = {names[k]: v for k, v in defaults.items() if k in names and names[k] != "config"}
        _check_values(ctx, value, defaults, top_level, names)
        ctx.default_map = {**(ctx.default_map or {}), **mapped}
    return value


def config_option(f: F) -> F:
    """``--config FILE.yaml``: keys = long option names; flags on the command line win."""
    return click.option(
        "--config",
        type=click.Path(dir_okay=False),
        is_eager=True,
        expose_value=False,
        callback=_load_config,
        help="YAML file of option values (keys = long option names, top level or under a section named after the command). Command-line flags win.",
    )(f)


def slide_inputs(f: F) -> F:
    """``--slides CSV`` and/or ``SLIDES...`` (paths or globs; slide_id = file stem)."""
    f = click.argument("slide_paths", nargs=-1, type=str, metavar="[SLIDES]...")(f)
    f = click.option(
        "--slides",
        "slides_csv",
        type=click.Path(dir_okay=False),
        help="Slide table CSV: a header row slide_id,path[,label][,split], or two columns "
        "filename,label with or without a header row (label 0, 1 or empty). Relative paths "
        "are relative to the CSV's folder.",
    )(f)
    return f


def shard_option(f: F) -> F:
    return click.option(
        "--shard",
        default=None,
        metavar="I/N",
        help="Process shard I of N (0-based). Default: from SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, else all.",
    )(f)


def work_option(f: F) -> F:
    return click.option(
        "--work",
        "-w",
        type=click.Path(file_okay=False),
        default="work",
        show_default=True,
        help="Work folder holding patches/, masks/, features/ and failures.csv.",
    )(f)


def backend_option(f: F) -> F:
    return click.option(
        "--backend",
        type=click.Choice(["auto", "openslide", "tiff", "zarr", "image"]),
        default="auto",
        show_default=True,
        help="Slide reader; auto picks by file type.",
    )(f)


def progress_enabled() -> bool:
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx else None
    quiet = bool(root and root.obj and root.obj.get("quiet"))
    return not quiet


def debug_enabled() -> bool:
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx else None
    return bool(root and root.obj and root.obj.get("debug"))


#: the BatchResult of the last per-slide command run in this process (``wsi-mil run`` reads it)
_LAST_BATCH: list[Any] = []


def take_last_batch() -> Any:
    """The last per-slide stage's BatchResult since the previous call (None if none)."""
    r = _LAST_BATCH[-1] if _LAST_BATCH else None
    _LAST_BATCH.clear()
    return r


def finish_batch(result: Any) -> None:
    """Print a batch summary and exit 0 (all done) or 1 (some slides failed)."""
    _LAST_BATCH[:] = [result]
    click.echo(result.summary(), err=True)
    sys.exit(result.exit_code)


def not_implemented(name: str) -> F:
    """Body for a command that is part of the surface but not built yet: says so, exits 2."""

    def body(**_: Any) -> None:
        from wsi_mil.errors import NotImplementedYet

        raise NotImplementedYet(
            f"'wsi-mil {name}' is not implemented yet", "see the README's status table"
        )

    return body


def setup_logging(verbose: int, quiet: int) -> None:
    """Log level and format from -v/-q counts; called again when a subcommand adds some."""
    level = max(logging.DEBUG, min(logging.CRITICAL, logging.INFO - 10 * verbose + 10 * quiet))
    fmt = "%(levelname)s %(name)s: %(message)s" if verbose else "%(levelname)s: %(message)s"
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
        for h in root.handlers:
            h._wsi_mil = True  # type: ignore[attr-defined]
        return
    root.setLevel(level)
    for h in root.handlers:
        if getattr(h, "_wsi_mil", False):
            h.setFormatter(logging.Formatter(fmt))


#: set when --debug came after the subcommand or from a config file (main() reads it)
_DEBUG_REQUESTED: list[bool] = []


def _global_option_callback(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """-v/-q/--debug given after the subcommand (or in its config): merge them into the root's.

    Counts typed after the subcommand add to those before it (``-q tile -q`` = ``-qq``); a
    count from a config file sets a floor instead of adding. ``wsi-mil run`` forwards its
    counts to each stage, which reads the same config again: adding would count a config's
    ``quiet: 1`` twice (and a command-line ``-q`` plus the config's ``quiet: 1`` is one
    ``-q``, as a flag wins over the config)."""
    if not value:
        return
    obj = ctx.find_root().ensure_object(dict)
    if param.name == "debug":
        obj["debug"] = True
        _DEBUG_REQUESTED.append(True)
    elif ctx.get_parameter_source(param.name) is ParameterSource.COMMANDLINE:
        obj[param.name] = int(obj.get(param.name) or 0) + int(value)
    else:
        obj[param.name] = max(int(obj.get(param.name) or 0), int(value))
    setup_logging(int(obj.get("verbose") or 0), int(obj.get("quiet") or 0))


def debug_requested() -> bool:
    return bool(_DEBUG_REQUESTED)


def global_options() -> list[click.Option]:
    """``-v``, ``-q`` and ``--debug`` for a subcommand, so they work after it too
    (``wsi-mil tile -q ...`` = ``wsi-mil -q tile ...``)."""
    common = {"expose_value": False, "callback": _global_option_callback}
    return [
        click.Option(
            ["-v", "--verbose"], count=True, help="More log output (-vv for debug).", **common
        ),
        click.Option(
            ["-q", "--quiet"],
            count=True,
            help="Less output: no progress bars, warnings and errors only.",
            **common,
        ),
        click.Option(["--debug"], is_flag=True, help="Show full tracebacks on errors.", **common),
    ]


def wraps_command(f: F) -> F:
    @functools.wraps(f)
    def inner(*a: Any, **kw: Any) -> Any:
        return f(*a, **kw)

    return inner


def run_slide_stage(
    config_cls: type,
    stage_fn: Callable[..., Any],
    slides_csv: str | None,
    slide_paths: tuple[str, ...],
    shard: str | None,
    backend: str,
    kw: dict[str, Any],
) -> None:
    """Body shared by the per-slide commands: slide table -> config -> stage -> exit code."""
    from pathlib import Path

    from wsi_mil.batch import parse_shard
    from wsi_mil.slides import read_slide_table

    entries = read_slide_table(slides_csv, slide_paths)
    cfg = config_cls(
        **{**kw, "work": Path(kw["work"]), "backend": None if backend == "auto" else backend}
    )
    result = stage_fn(
        cfg, entries, parse_shard(shard), progress=progress_enabled(), debug=debug_enabled()
    )
    finish_batch(result)
