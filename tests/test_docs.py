"""The documentation lists every setting the services accept."""

from __future__ import annotations

import pytest
from helpers import REPO_ROOT

from llm_server.launcher import ServeSettings
from llm_server.settings import LLMSettings
from vision_server.settings import VisionSettings


@pytest.mark.parametrize("settings", [VisionSettings, LLMSettings, ServeSettings])
def test_configuration_doc_lists_every_flag(settings):
    doc = (REPO_ROOT / "docs" / "configuration.md").read_text()
    missing = [name for name in settings.model_fields if f"`--{name.replace('_', '-')}`" not in doc]
    assert not missing, f"docs/configuration.md lacks {missing}"


def test_readme_gives_the_two_commands():
    readme = (REPO_ROOT / "README.md").read_text()
    assert "make serve" in readme and "make test" in readme
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
