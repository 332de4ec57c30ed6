"""Where a job's weights and tokenizer come from: an HF checkpoint directory (or a Hub model ID's cached snapshot),
an embedded model, or nothing."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from nemo_customizer.checkpoints.hub import hub_snapshot, snapshot_commit, split_hub_id
from nemo_customizer.config import ConfigError, ModelConfig, merge_checkpoint_architecture, model_source, read_hf_config
from nemo_customizer.config.validate import validate_model


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """The model config with the checkpoint's authoritative architecture, and its directories."""

    config: ModelConfig
    checkpoint_dir: Optional[Path]
    """HF checkpoint directory, or None for random weights."""
    tokenizer_dir: Optional[Path]


def resolve_model(model: ModelConfig, cache_dir: Optional[str]) -> ResolvedModel:
    """Locate (and for embedded models, convert once) the checkpoint; reconcile its config.json with the YAML."""
    kind, where = model_source(model)
    checkpoint: Optional[Path] = None
    if kind == "checkpoint":
        checkpoint = checkpoint_directory(where, model.checkpoint_revision)
        if _is_hub_id(where):
            # The commit this job trains on, recorded in its config.yaml: a resume or rerun asks for it again.
            model = dataclasses.replace(model, checkpoint_revision=snapshot_commit(checkpoint))
        if not (checkpoint / "config.json").is_file():
            raise ConfigError(f"model.checkpoint={where}: no config.json there; point it at an HF checkpoint "
                              "directory (config.json, *.safetensors, tokenizer files) or a Hugging Face Hub model "
                              "ID (org/name).")
    elif kind == "embedded":
        from nemo_customizer.checkpoints.embedded import resolve_embedded_checkpoint

        checkpoint = resolve_embedded_checkpoint(where, cache_dir)
    if checkpoint is not None:
        config_json = checkpoint / "config.json"
        if model.architecture_from_checkpoint:
            model = dataclasses.replace(model, architecture=read_hf_config(config_json),
                                        architecture_from_checkpoint=False)
            validate_model(model)  # the checks validate_config skipped, now against the real architecture
        else:
            model = merge_checkpoint_architecture(model, read_hf_config(config_json), source=str(config_json))
    tokenizer = Path(model.tokenizer).expanduser() if model.tokenizer else checkpoint
    return ResolvedModel(model, checkpoint, tokenizer)


def checkpoint_directory(value: str, revision: Optional[str] = None) -> Path:
    """``model.checkpoint``'s folder: a local path when it exists, else the cached snapshot of a Hub model ID
    (``org/name[@revision]``, ``checkpoints.hub``; ``revision``, a recorded ``model.checkpoint_revision``, names
    the commit), else the path as given (the caller reports what is missing)."""
    if not _is_hub_id(value):
        if revision:
            raise ConfigError(f"model.checkpoint_revision={revision} pins a Hugging Face Hub model ID's commit, but "
                              f"model.checkpoint={value} names a local folder, not a Hub model ID; drop "
                              "model.checkpoint_revision.")
        return Path(value).expanduser()
    return hub_snapshot(value, revision)


def _is_hub_id(value: str) -> bool:
    """``model.checkpoint`` reads as a Hub model ID and no local folder of that name exists."""
    return split_hub_id(value) is not None and not Path(value).expanduser().exists()


def load_tokenizer(directory: Optional[Path], chat_template: Optional[str] = None):
    """The HF tokenizer in ``directory`` (local files only; no hub access)."""
    if directory is None:
        raise ConfigError("no tokenizer: model.random_weights=true needs model.tokenizer=/path/to/tokenizer_dir")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    if chat_template:
        tokenizer.chat_template = read_chat_template(chat_template)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{directory}: the tokenizer has no eos token; completions need one to end on")
    return tokenizer


def read_chat_template(value: str) -> str:
    """``model.chat_template``: a shipped template's name (``conf/chat_templates/<name>.jinja``), a path to a Jinja
    file, or the Jinja text itself."""
    from nemo_customizer.config import conf_dir

    shipped = conf_dir() / "chat_templates" / f"{value}.jinja"
    if "\n" not in value and "{" not in value:
        for candidate in (shipped, Path(value).expanduser()):
            if candidate.is_file():
                return candidate.read_text(encoding="utf-8")
        names = sorted(p.stem for p in (conf_dir() / "chat_templates").glob("*.jinja"))
        raise ConfigError(f"model.chat_template={value!r} is neither a file nor a shipped template ({', '.join(names)})"
                          "; pass a template name, a .jinja path, or the Jinja text.")
    return value
