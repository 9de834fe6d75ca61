"""The documentation says what the code does: every settings table in docs/configuration.md is
exactly what the settings classes declare (flags, variables, defaults, descriptions), and the
README and docs/architecture.md describe the packages that exist."""

from __future__ import annotations

import re

import pytest
from helpers import REPO_ROOT
from pydantic.fields import FieldInfo

from llm_server.launcher import ServeSettings
from llm_server.settings import LLMSettings
from vision_server.settings import VisionSettings

SECTIONS = {
    "dvd-vision-server": VisionSettings,
    "dvd-llm-server": LLMSettings,
    "dvd-serve": ServeSettings,
}
PACKAGES = [
    "protos",
    "checkpoints",
    "telemetry",
    "vision_server",
    "llm_server",
    "clients",
    "benchmarks",
]


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return str(field.default_factory())  # type: ignore[call-arg]
    return "—" if field.default is None else str(field.default)


def settings_table(settings: type) -> list[str]:
    """The rows docs/configuration.md must have for ``settings``, in declaration order."""
    return [
        f"| `--{name.replace('_', '-')}` | `DVD_{name.upper()}` | `{_default(field)}` | "
        f"{field.description} |"
        for name, field in settings.model_fields.items()
    ]


def documented_table(doc: str, command: str) -> list[str]:
    section = doc.split(f"(`{command}`")[1].split("\n## ")[0]
    return [line for line in section.splitlines() if line.startswith("| `--")]


@pytest.mark.parametrize("command", sorted(SECTIONS))
def test_configuration_tables_match_the_settings(command):
    doc = (REPO_ROOT / "docs" / "configuration.md").read_text()
    expected = settings_table(SECTIONS[command])
    assert documented_table(doc, command) == expected, (
        f"docs/configuration.md's table for {command} is stale; it should read:\n"
        + "\n".join(expected)
    )


def test_readme_gives_the_two_commands():
    readme = (REPO_ROOT / "README.md").read_text()
    assert "make serve" in readme and "make test" in readme
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


@pytest.mark.parametrize("doc", ["README.md", "docs/architecture.md"])
def test_layout_sections_name_every_package(doc):
    text = (REPO_ROOT / doc).read_text()
    layout = text.split("## Layout")[1].split("\n## ")[0]
    named = set(re.findall(r"^\s*([a-z_]+)/", layout, flags=re.MULTILINE))
    packages = {p.name for p in REPO_ROOT.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(PACKAGES), "a package was added: describe it in the layout sections"
    assert set(PACKAGES) <= named, f"{doc}'s layout lacks {set(PACKAGES) - named}"
    assert named <= packages | {"tests", "docs", "deploy"}, f"{doc} names {named - packages}"
