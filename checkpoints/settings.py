"""Settings both services share: how they are read, and which checkpoint they serve."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CheckpointSettings(BaseSettings):
    """Each field is a ``--kebab-case`` flag and a ``DVD_*`` environment variable (flags win)."""

    model_config = SettingsConfigDict(
        env_prefix="DVD_",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        extra="ignore",
        env_ignore_empty=True,  # DVD_MODEL= (empty) means "unset", as compose files write it
    )

    model: str | None = Field(
        None,
        description="InternVL checkpoint: a local folder or a hub id (safetensors only). "
        "Unset: the generated tiny checkpoint.",
    )
    revision: str | None = Field(None, description="hub revision of --model")
