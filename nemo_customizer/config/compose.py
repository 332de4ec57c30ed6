"""Compose one typed :class:`Config` from ``conf/`` + Hydra overrides, or from ``customize(**kwargs)``.

Both entry points end in :func:`compose_config`, so a YAML file, a command-line override and a Python keyword give
the same config and the same errors. Hydra's compose API is used directly (no ``hydra.main``, no cwd change, no
output directory). Every override key is checked against the schema first: Hydra's ``+key=`` would otherwise add
keys that the dataclasses do not have.

A user's job file (``--config-path DIR --config-name my_job``, ``customize(config="my_job.yaml")``) is composed on
top of the shipped defaults: it names its model in its own defaults list (``- model: NAME``) and overrides anything.
Its folder and each ``--config-dir`` folder come before ``conf/`` on Hydra's search path, so a ``model/NAME.yaml``
there is a model config like the shipped ones (and takes the place of a shipped one of the same name).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError
from .schema import MISSING_PATH, Config

DEFAULT_MODEL = "smollm2-135m-instruct"
_CONFIG_NAME = "config"
_SCHEMA_NAME = "base_config"  # the name conf/config.yaml's defaults list uses for the schema
_GROUPS = ("model",)  # config groups: directories under conf/ selected with `group=name`
_JOB_PRIMARY = "_nemo_customizer_job"  # the in-memory primary config that puts a user's job file over conf/
JOB_FILE_SUFFIX = ".yaml"  # Hydra finds a config by its name plus this suffix


def conf_dir() -> Path:
    """The directory holding ``config.yaml`` and ``model/``.

    Installed wheels carry it as package data at ``nemo_customizer/conf``; source and editable checkouts use the
    repository's top-level ``conf/``.
    """
    package_dir = Path(__file__).resolve().parents[1]
    for candidate in (package_dir / "conf", package_dir.parent / "conf"):
        if (candidate / f"{_CONFIG_NAME}.yaml").is_file():
            return candidate
    raise ConfigError(
        f"cannot find the nemo_customizer config directory (looked for {package_dir / 'conf'} and "
        f"{package_dir.parent / 'conf'}); reinstall the package so its conf/ package data is present."
    )


def available_models(config_dirs: Sequence[str | Path] = ()) -> list[str]:
    """Names accepted by ``model=NAME`` / ``customize(config=NAME)``: the files in ``conf/model/`` and in the
    ``model/`` folder of each of ``config_dirs``."""
    folders = [Path(d) / "model" for d in config_dirs] + [conf_dir() / "model"]
    return sorted({p.stem for folder in folders for p in folder.glob(f"*{JOB_FILE_SUFFIX}")})


@dataclasses.dataclass(frozen=True)
class ConfigSearch:
    """Where configs come from besides the shipped ``conf/``: a user's job file and extra config folders."""

    job_file: Optional[Path] = None
    """The job's YAML (absolute), composed over the shipped defaults; None composes ``conf/config.yaml`` alone."""
    config_dirs: tuple[Path, ...] = ()
    """Extra folders (absolute) searched before ``conf/``, for ``model/NAME.yaml`` files of the user's own."""

    @property
    def user_dirs(self) -> list[Path]:
        """The job file's folder, then ``config_dirs``: Hydra's search path ahead of ``conf/``."""
        dirs = ([self.job_file.parent] if self.job_file else []) + list(self.config_dirs)
        return list(dict.fromkeys(dirs))


def config_search(job_file: str | Path | None = None, config_dirs: Sequence[str | Path] = ()) -> ConfigSearch:
    """A checked :class:`ConfigSearch`: the job file exists and is a ``.yaml`` file, each folder exists."""
    dirs = []
    for folder in config_dirs:
        path = Path(folder).expanduser().resolve()
        if not path.is_dir():
            raise ConfigError(f"config directory {folder} does not exist; pass a folder holding model/NAME.yaml "
                              "files (or your job files).")
        dirs.append(path)
    job = None
    if job_file is not None:
        job = Path(job_file).expanduser()
        if not job.suffix:
            job = job.with_suffix(JOB_FILE_SUFFIX)
        job = job.resolve()
        if job.suffix != JOB_FILE_SUFFIX:
            raise ConfigError(f"job file {job_file}: name it NAME{JOB_FILE_SUFFIX} (Hydra looks configs up by that "
                              "suffix).")
        if not job.is_file():
            raise ConfigError(f"job file {job} does not exist; pass the path of your job YAML (--config-path DIR "
                              "--config-name NAME reads DIR/NAME.yaml).")
    return ConfigSearch(job, tuple(dirs))


def compose_config(overrides: Sequence[str] = (), *, search: ConfigSearch = ConfigSearch()) -> Config:
    """Compose ``conf/config.yaml`` with Hydra ``overrides`` (``["model=llama-3.2-1b-instruct", "a.b=1"]``); with
    ``search`` (see :func:`config_search`), the user's job file over it and the user's model folders before it.

    Returns a typed :class:`Config`; an unset ``dataset.path`` stays the ``"???"`` sentinel (validation reports it
    where a dataset is needed). Unknown keys, unknown model names and ill-typed values raise :class:`ConfigError`.
    Value checks (ranges, divisibility) are :func:`nemo_customizer.config.validate.validate_config`'s job.
    """
    overrides = list(overrides)
    _check_overrides(overrides, search)
    node = _compose(overrides, search)
    # OmegaConf.to_object refuses MISSING ("???") fields; keep the sentinel instead so that commands which need no
    # dataset (generate, --cfg) still get a typed config.
    missing = sorted(OmegaConf.missing_keys(node))
    try:
        for key in missing:
            OmegaConf.update(node, key, "", merge=False)
        cfg = OmegaConf.to_object(node)
    except Exception as exc:  # a missing non-string value, say: report it like any other config mistake
        raise _translate(exc) from None
    for key in missing:
        *parents, leaf = key.split(".")
        obj = cfg
        for part in parents:
            obj = getattr(obj, part)
        setattr(obj, leaf, MISSING_PATH)
    assert isinstance(cfg, Config)
    return cfg


def config_from_kwargs(
    config: str = DEFAULT_MODEL,
    dataset: str | Mapping[str, Any] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    output_dir: str | None = None,
    **overrides: Any,
) -> Config:
    """Build the config for ``customize(config=..., dataset=..., hyperparameters={...}, output_dir=...)``.

    ``config`` is a model name (see :func:`available_models`) or the path of a job file (``my_job.yaml``, composed
    as ``--config-name`` composes it); ``dataset`` a path or a dict of ``dataset`` fields; other keywords are
    top-level fields, nested as dicts (``model={"checkpoint": "/ckpt"}``, ``device="cpu"``). The keywords become
    Hydra override strings, so the result equals the command line's for the same settings.
    """
    if "model" in overrides and not isinstance(overrides["model"], Mapping):
        raise ConfigError(
            f"model={overrides['model']!r}: pass the model name as config={overrides['model']!r}; "
            "model= takes a dict of model fields such as {'checkpoint': '/path'}."
        )
    fields: dict[str, Any] = dict(overrides)
    if dataset is not None:
        fields["dataset"] = {"path": dataset} if isinstance(dataset, (str, Path)) else dataset
    if hyperparameters is not None:
        fields["hyperparameters"] = hyperparameters
    if output_dir is not None:
        fields["output_dir"] = output_dir
    if is_job_file(config):
        return compose_config(overrides_from_dict(fields), search=config_search(job_file=config))
    return compose_config([f"model={config}", *overrides_from_dict(fields)])


def is_job_file(config: str | Path) -> bool:
    """Whether ``customize(config=...)`` names a job file (a ``.yaml`` path) rather than a model config."""
    return isinstance(config, Path) or str(config).endswith((JOB_FILE_SUFFIX, ".yml"))


def config_from_file(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """A job's saved ``config.yaml`` (fully resolved) with ``key=value`` overrides applied on top."""
    overrides = list(overrides)
    _check_overrides(overrides)
    try:
        node = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path),
                               OmegaConf.from_dotlist(overrides))
        cfg = OmegaConf.to_object(node)
    except Exception as exc:
        raise _translate(exc) from None
    assert isinstance(cfg, Config)
    return cfg


def overrides_from_dict(values: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Flatten nested ``values`` into Hydra override strings: ``{"a": {"b": 1}}`` → ``["a.b=1"]``."""
    out: list[str] = []
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out += overrides_from_dict(value, prefix=dotted + ".")
        else:
            out.append(f"{dotted}={_format_value(dotted, value)}")
    return out


def _format_value(key: str, value: Any) -> str:
    """One value in Hydra's override grammar; strings are always quoted so paths with spaces or commas survive."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        text = str(value)
        # Inside '...' only a quote and the backslashes right before a quote (or the closing quote) are escaped.
        text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)
        return "'" + text.replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_value(key, v) for v in value) + "]"
    if isinstance(value, Mapping):  # a dict inside a list (dataset.mix entries), or an empty dict
        return "{" + ",".join(f"{k}:{_format_value(f'{key}.{k}', v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"{key}: cannot use a value of type {type(value).__name__} in a config; use str, number, "
                      "bool, None, list or dict.")


@contextmanager
def _hydra_context(main_dir: Path) -> Iterator[None]:
    """Initialize Hydra with ``main_dir`` as its primary config folder, then put back whatever Hydra state the
    caller's own app had."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.singleton import Singleton
    from hydra.version import VersionBase

    _register_schema()
    # Hydra keeps its state in process-wide singletons; initialize_config_dir refuses to run while one is set.
    saved_hydra = Singleton._instances.pop(GlobalHydra, None)
    saved_base = VersionBase.instance().getbase()
    try:
        with initialize_config_dir(config_dir=str(main_dir), version_base="1.3", job_name="nemo_customizer"):
            yield
    finally:
        if saved_hydra is not None:
            Singleton._instances[GlobalHydra] = saved_hydra
        VersionBase.instance().version_base = saved_base


def _register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=_SCHEMA_NAME, node=Config)


def _compose(overrides: list[str], search: ConfigSearch):
    from hydra import compose

    user_dirs = search.user_dirs
    try:
        if not user_dirs:
            with _hydra_context(conf_dir()):
                return compose(config_name=_CONFIG_NAME, overrides=overrides)
        # The user's folders first (the first one is Hydra's primary folder), conf/ after them.
        searchpath = [f"file://{d}" for d in [*user_dirs[1:], conf_dir()]]
        if search.job_file:
            _check_list_entries("", _load_job(search.job_file), Config, f" (in {search.job_file})")
        _register_job_primary(search.job_file)
        with _hydra_context(user_dirs[0]):
            return compose(config_name=_JOB_PRIMARY,
                           overrides=[*overrides, f"hydra.searchpath={_format_value('hydra.searchpath', searchpath)}"])
    except ConfigError:
        raise
    except Exception as exc:
        error = _translate(exc, user_dirs)
        section = _optional_section_in(overrides) if "NoneType" in str(error) else None
        if section:
            # OmegaConf cannot merge into an optional section that is null (a model without rope scaling).
            error = ConfigError(f"cannot override inside {section}: it is null for this model; take such "
                                "settings from a model YAML or the checkpoint's config.json.")
        elif overrides and "full_key" not in str(exc):  # no key to blame: show what was applied
            error = ConfigError(f"{str(error).rstrip('.')} (while applying {' '.join(overrides)}).")
        raise error from None


def _register_job_primary(job_file: Optional[Path]) -> None:
    """Store the primary config that composes like ``conf/config.yaml`` with the job file merged just before its
    ``_self_``. A job that selects its model (``- model: NAME``) replaces the default model's entry; one that says
    ``- override model: NAME``, or nothing, keeps it to override or use. The schema is listed once."""
    from hydra.core.config_store import ConfigStore

    shipped = OmegaConf.to_container(OmegaConf.load(conf_dir() / f"{_CONFIG_NAME}.yaml"))["defaults"]
    job_entries = _job_defaults(job_file) if job_file else []
    job_groups = {key for key in map(_default_key, job_entries) if key}
    defaults: list[Any] = []
    for entry in shipped:
        if entry == "_self_" and job_file:
            defaults.append(job_file.stem)
        if _default_key(entry) not in job_groups:
            defaults.append(entry)
    ConfigStore.instance().store(name=_JOB_PRIMARY, node={"defaults": defaults})


def _job_defaults(job_file: Path) -> list[Any]:
    """The job file's defaults list (for which of the shipped entries it takes over)."""
    entries = _load_job(job_file).get("defaults") or []
    return entries if isinstance(entries, list) else []  # a malformed list is Hydra's to report


def _load_job(job_file: Path) -> dict:
    try:
        job = OmegaConf.load(job_file)
    except Exception as exc:
        raise ConfigError(f"job file {job_file} is not valid YAML: {_first_line(str(exc))}.") from None
    if not isinstance(job, DictConfig):
        raise ConfigError(f"job file {job_file} must be a mapping of config keys (defaults:, model:, dataset:, "
                          "hyperparameters:, ...).")
    return OmegaConf.to_container(job)


def _default_key(entry: Any) -> Optional[str]:
    """What a defaults-list entry selects, if it takes a shipped entry's place: a plain group selection
    (``{model: NAME}``, ``{optional model: NAME}``) gives its group, the schema its name; ``override`` entries and
    other configs give None."""
    if isinstance(entry, str):
        return entry if entry == _SCHEMA_NAME else None
    if isinstance(entry, dict) and len(entry) == 1:
        words = str(next(iter(entry))).split()
        if words[0] != "override":
            return words[-1].split("@")[0]
    return None


def _optional_section_in(overrides: list[str]) -> str | None:
    """The first overridden ``Optional[dataclass]`` section (``model.architecture.rope_scaling``), if any."""
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        node: Any = Config
        parts = key.split(".")
        for depth, part in enumerate(parts):
            hints = typing.get_type_hints(node) if _dataclass_of(node) else {}
            if part not in hints:
                break
            annotation = hints[part]
            node = _dataclass_of(annotation)
            if node is not None and type(None) in typing.get_args(annotation):
                return ".".join(parts[: depth + 1])
    return None


def _check_overrides(overrides: list[str], search: ConfigSearch = ConfigSearch()) -> None:
    """Reject unknown keys and model names before Hydra sees them (``+key=`` would silently add a key)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError(f"cannot parse override: {_first_line(str(exc))}") from None
    for override in parsed:
        key = override.key_or_group
        if override.is_sweep_override():  # one config is one job; a sweep is several (nemo_customizer.sweep)
            raise ConfigError(f"{override.input_line} gives several values: add -m (--multirun) to run one job per "
                              "value, or write a list as key=[a,b] (a string with commas in quotes).")
        if key in _GROUPS and not override.is_delete():
            if key == "model":
                _check_model_name(str(override.value()), search.user_dirs)
            continue
        annotation = _check_key(key)
        if not override.is_delete():
            _check_list_entries(key, override.value(), annotation)


def _check_list_entries(dotted: str, value: Any, annotation: Any, where: str = "") -> None:
    """Unknown keys in the entries of a list of sections (``dataset.mix``) inside ``value``, named by their full
    path, index included: OmegaConf's own error names the entry's key alone (``weigth``). Elsewhere its errors
    name the full key, so only the lists are looked into. ``where`` ends the message (`` (in FILE)``)."""
    entry_type = _list_entry_dataclass(annotation)
    if entry_type is not None and isinstance(value, (list, tuple)):
        for i, entry in enumerate(value):
            if isinstance(entry, Mapping):
                _check_section_keys(f"{dotted}[{i}]", entry, entry_type, where)
        return
    node = _dataclass_of(annotation)
    if node is not None and isinstance(value, Mapping):
        hints = typing.get_type_hints(node)
        for key, item in value.items():
            if key in hints:
                _check_list_entries(f"{dotted}.{key}" if dotted else str(key), item, hints[key], where)


def _check_section_keys(dotted: str, value: Mapping, node: type, where: str) -> None:
    """Every key of ``value`` (a section of type ``node`` at ``dotted``) and of its subsections is in the schema."""
    hints = typing.get_type_hints(node)
    for key, item in value.items():
        if key not in hints:
            names = [f.name for f in dataclasses.fields(node)]
            raise ConfigError(f"unknown config key '{dotted}.{key}'{_did_you_mean(str(key), names)}; valid keys "
                              f"under '{dotted}': {', '.join(names)}{where}.")
        if _dataclass_of(hints[key]) is not None and isinstance(item, Mapping):
            _check_section_keys(f"{dotted}.{key}", item, _dataclass_of(hints[key]), where)
        else:
            _check_list_entries(f"{dotted}.{key}", item, hints[key], where)


def _list_entry_dataclass(annotation: Any) -> type | None:
    """``X`` for a ``List[X]`` (or ``Optional[List[X]]``) of a dataclass ``X``, else None."""
    for candidate in (annotation, *typing.get_args(annotation)):  # Optional[List[X]]: its arguments
        if typing.get_origin(candidate) is list:
            return _dataclass_of(typing.get_args(candidate)[0]) if typing.get_args(candidate) else None
    return None


def _check_model_name(name: str, config_dirs: Sequence[Path] = ()) -> None:
    names = available_models(config_dirs)
    if name not in names:
        own = (" A model YAML of your own goes in DIR/model/NAME.yaml: pass --config-dir DIR model=NAME, or put "
               "the model/ folder next to your job file." if "/" in name or name.endswith((".yaml", ".yml")) else "")
        raise ConfigError(f"unknown model {name!r}{_did_you_mean(name, names)}; available models: "
                          f"{', '.join(names)}.{own}")


def _check_key(dotted: str) -> Any:
    """Raise ConfigError unless ``dotted`` names a field of the schema; returns the field's type annotation."""
    node: Any = Config
    annotation: Any = Config
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        parent = ".".join(parts[:depth])
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            raise ConfigError(f"unknown config key {dotted!r}: {parent!r} is a value, not a section.")
        hints = typing.get_type_hints(node)
        if part not in hints:
            raise _unknown_key_error(dotted)
        annotation = hints[part]
        node = _dataclass_of(annotation)
    return annotation


def _unknown_key_error(dotted: str) -> ConfigError:
    """The error for an unknown key: names the full key and lists the valid keys of its section."""
    parts = dotted.split(".")
    node: Any = Config
    for depth, part in enumerate(parts):
        hints = typing.get_type_hints(node)
        if part not in hints:
            section = ".".join(parts[:depth])
            where = f"under {section!r}" if section else "at the top level"
            names = [f.name for f in dataclasses.fields(node)]
            return ConfigError(f"unknown config key {dotted!r}{_did_you_mean(part, names)}; valid keys {where}: "
                               f"{', '.join(names)}.")
        node = _dataclass_of(hints[part])
        if node is None:
            break
    return ConfigError(f"unknown config key {dotted!r}.")


def _dataclass_of(annotation: Any) -> type | None:
    """The dataclass inside ``annotation`` (``Optional[X]`` → X), or None for a plain value."""
    candidates = typing.get_args(annotation) or (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


_FULL_KEY = re.compile(r"full_key: (\S+)")
_IN_FILE = re.compile(r"^In '([^']+)'")
_NOT_IN = re.compile(r"Key '[^']+' not in '|not in struct")


def _translate(exc: BaseException, user_dirs: Sequence[Path] = ()) -> ConfigError:
    """Turn a Hydra / OmegaConf composition error into one readable ConfigError line (naming the YAML file it came
    from: ``conf/...`` for a shipped one, the full path for one of ``user_dirs``)."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue

    if isinstance(exc, MissingConfigException):
        match = re.search(r"Could not find '([^']+)'", str(exc))
        missing = match.group(1) if match else str(exc)
        group, _, name = missing.rpartition("/")
        if group == "model":
            _check_model_name(name, user_dirs)  # raises with the list of models
        return ConfigError(f"cannot find config {missing!r}: {_first_line(str(exc))}")

    # The OmegaConf error is either chained (overrides) or flattened into the message (YAML files).
    cause: BaseException | None = exc
    while cause is not None and getattr(cause, "full_key", None) is None:
        cause = cause.__cause__
    text = str(exc)
    full_key = getattr(cause, "full_key", None)
    if full_key is None:
        match = _FULL_KEY.search(text)
        full_key = match.group(1) if match else None
    origin = _IN_FILE.search(text)
    where = ""
    if origin and origin.group(1) not in (_CONFIG_NAME, _JOB_PRIMARY):
        where = f" (in {_config_file(origin.group(1), user_dirs)})"
    if full_key is None:
        return ConfigError(_first_line(text))
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) or _NOT_IN.search(text):
        error = _unknown_key_error(full_key)
        return ConfigError(str(error)[:-1] + where + ".")
    if isinstance(cause, MissingMandatoryValue):
        return ConfigError(f"{full_key} is required: set {full_key}=VALUE.")
    detail = str(cause) if cause is not None else text.split("composing config:", 1)[-1]
    return ConfigError(f"invalid value for {full_key}{where}: {_first_line(detail.strip())}.")


def _config_file(name: str, user_dirs: Sequence[Path]) -> str:
    """Where Hydra found config ``name`` (``model/foo``): the first of ``user_dirs`` that has it, else ``conf/``."""
    for folder in user_dirs:
        if (folder / f"{name}{JOB_FILE_SUFFIX}").is_file():
            return str(folder / f"{name}{JOB_FILE_SUFFIX}")
    return f"conf/{name}{JOB_FILE_SUFFIX}"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0].rstrip(".") if text.strip() else text
