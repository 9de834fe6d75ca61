"""vLLM's engine arguments on DvD's command lines (``dvd-llm-server``, ``dvd-serve``).

The parser is vLLM's own, built when the command runs: ``AsyncEngineArgs.add_cli_args`` on
vLLM's ``FlexibleArgumentParser``. Every engine argument of the installed vLLM is therefore
accepted with vLLM's name, type, choices, default and help, in vLLM's spellings too
(``--max_num_seqs``, ``--compilation-config.mode 3``, ``-O3``, JSON values), and follows vLLM
from version to version. Each one is of one of three kinds:

- passed through: handed to ``AsyncEngineArgs`` as given (only those given: the others keep
  vLLM's defaults, exactly as ``vllm serve`` leaves them);
- DvD's own (``DVD_SETTINGS``): DvD has a setting for it, with a flag and a ``DVD_*``
  variable, and that setting is the one source of the value. vLLM's spellings are accepted as
  aliases of DvD's flag (``-tp 2`` is ``--tensor-parallel-size 2``, ``--enable-prefix-caching``
  is ``--prefix-caching``);
- refused (``REFUSED``, ``REFUSED_GROUPS``): DvD sets it from the checkpoint, or relies on its
  value; the command stops at once and says why.

A command line is split token by token: an option goes to the side that owns its name, and
the values after it go with it. DvD's own flags are parsed by the settings (pydantic), the
rest by vLLM's parser.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, NoReturn

from pydantic_settings import BaseSettings, CliSettingsSource

# vLLM engine argument (its ``AsyncEngineArgs`` field) -> the DvD setting that provides it.
DVD_SETTINGS: dict[str, str] = {
    "model": "model",  # the InternVL checkpoint; vLLM gets its language model
    "revision": "revision",
    "served_model_name": "served_model_name",  # one name (vLLM takes several)
    "dtype": "dtype",  # auto: the checkpoint's own dtype (vLLM's auto would pick bfloat16)
    "seed": "seed",
    "max_model_len": "max_model_len",
    "enforce_eager": "enforce_eager",
    "tensor_parallel_size": "tensor_parallel_size",
    "pipeline_parallel_size": "pipeline_parallel_size",
    "gpu_memory_utilization": "gpu_memory_utilization",  # coupled mode takes the ViT's share
    "max_num_seqs": "max_num_seqs",
    "enable_prefix_caching": "prefix_caching",  # on by default in DvD
    # The same name in both: DvD's is the service's log level. vLLM's own logger is set with
    # --logging-config.log_level (passed through) or VLLM_LOGGING_LEVEL.
    "log_level": "log_level",
}

_TOKENIZER = (
    "the language service renders and tokenizes chats with the checkpoint's own tokenizer, "
    "and vLLM must decode with that same tokenizer"
)
_MEDIA = (
    "DvD fetches images and videos itself: use --allowed-image-hosts and --allowed-image-networks"
)

# vLLM engine arguments DvD sets itself -> why.
REFUSED: dict[str, str] = {
    "hf_config_path": "DvD writes the language model's config from the checkpoint (a plain "
    "causal-LM view of its llm_config/text_config) and points vLLM at it",
    "tokenizer": _TOKENIZER,
    "tokenizer_revision": _TOKENIZER,
    "tokenizer_mode": _TOKENIZER,
    "skip_tokenizer_init": "vLLM needs the tokenizer: it decodes answers and applies stop "
    "strings and grammars",
    "enable_prompt_embeds": "always on: images reach vLLM as embedding rows of the prompt",
    "runner": "DvD serves text generation with the checkpoint's language model",
    "convert": "DvD serves text generation with the checkpoint's language model",
    "config_format": "DvD writes the language model's config in Hugging Face's format",
    "model_class_overrides": "DvD picks the vLLM model class that reads the language model out "
    "of the InternVL checkpoint (llm_server/engine/vllm_models.py)",
    "allowed_local_media_path": _MEDIA,
    "allowed_media_domains": _MEDIA,
}

# Groups of vLLM's parser (titled by vLLM's config class) refused whole -> why.
REFUSED_GROUPS: dict[str, str] = {
    "MultiModalConfig": "vLLM serves only the language model here; the vision service encodes "
    "images and videos (DvD's --max-images-per-request, --max-tiles, --num-frames, ... "
    "set their limits)",
}

# argparse reads these as values, not options.
_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


class EngineArgumentRefused(ValueError):
    """A vLLM engine argument that DvD sets itself was given."""


def dvd_flag(setting: str, negative: bool = False) -> str:
    """The command-line flag of a DvD setting (``--no-...`` for a boolean's negative)."""
    name = setting.replace("_", "-")
    return f"--no-{name}" if negative else f"--{name}"


def settings_options(settings_cls: type[BaseSettings], prog: str) -> tuple[set[str], str]:
    """The option strings of a settings class's command line, and its help text."""
    parser: argparse.ArgumentParser = CliSettingsSource(
        settings_cls, cli_prog_name=prog
    ).root_parser
    return set(parser._option_string_actions), parser.format_help()


def _drop(parser: argparse.ArgumentParser, action: argparse.Action) -> None:
    """Remove ``action`` from ``parser`` (its option strings, its group)."""
    # argparse's own way to take an option out (its "resolve" conflict handler).
    parser._handle_conflict_resolve(action, [(option, action) for option in action.option_strings])


def _canonical(option: str) -> str:
    """An option's name as vLLM's parser reads it: ``--a_b=1`` and ``--a-b.c`` -> ``--a-b``."""
    name = option.split("=", 1)[0]
    if not name.startswith("--"):
        return name
    return "--" + name[2:].split(".", 1)[0].replace("_", "-")


def _is_option(token: str) -> bool:
    return token.startswith("-") and len(token) > 1 and not _NEGATIVE_NUMBER.match(token)


@dataclass
class SplitCommandLine:
    """A command line, shared out: ``own``: the command's own flags; ``dvd_engine``: DvD's
    spellings of engine settings the command does not own (``dvd-serve`` forwards them to the
    language service); ``vllm``: vLLM's engine arguments, passed through."""

    own: list[str] = field(default_factory=list)
    dvd_engine: list[str] = field(default_factory=list)
    vllm: list[str] = field(default_factory=list)


class EngineArguments:
    """vLLM's engine-argument parser, less the arguments DvD owns or refuses."""

    def __init__(self, dvd_options: Collection[str], prog: str) -> None:
        """``dvd_options``: the language service's own option strings (``LLMSettings``)."""
        import vllm
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        self.version = str(vllm.__version__)
        # No abbreviations: a prefix of one side's flag must not be read as the other's.
        parser = FlexibleArgumentParser(prog=prog, add_help=False, allow_abbrev=False)
        AsyncEngineArgs.add_cli_args(parser)
        self.parser = parser
        # vLLM option string -> DvD's flag; vLLM option string -> why it is refused.
        self.aliases: dict[str, str] = {}
        self.refused: dict[str, str] = {}
        # vLLM dest -> its option strings, for the help's lists.
        self.owned_options: dict[str, list[str]] = {}
        self.refused_options: dict[str, list[str]] = {}
        self.dvd_flags: set[str] = set()
        for group in list(parser._action_groups):
            group_refusal = REFUSED_GROUPS.get(group.title or "")
            for action in list(group._group_actions):
                if not action.option_strings:
                    continue
                setting = DVD_SETTINGS.get(action.dest)
                collides = any(option in dvd_options for option in action.option_strings)
                if setting is None and collides:
                    # A vLLM argument under one of DvD's own names (a vLLM newer than this
                    # table): DvD's flag keeps its meaning.
                    setting = next(o for o in action.option_strings if o in dvd_options)[2:]
                    setting = setting.removeprefix("no-").replace("-", "_")
                reason = REFUSED.get(action.dest) or group_refusal
                if setting is not None:
                    for option in action.option_strings:
                        target = dvd_flag(setting, negative=option.startswith("--no-"))
                        self.aliases[option] = target
                        self.dvd_flags.add(target)
                    self.owned_options[action.dest] = list(action.option_strings)
                elif reason is not None:
                    for option in action.option_strings:
                        self.refused[option] = reason
                    self.refused_options[action.dest] = list(action.option_strings)
                else:
                    continue
                _drop(parser, action)
        self.dvd_flags.update(
            dvd_flag(setting, negative)
            for setting in DVD_SETTINGS.values()
            for negative in (False, True)
        )
        self.dvd_flags &= set(dvd_options)

    # ---- command lines ----------------------------------------------------------------------

    def split(self, argv: Sequence[str], own_options: Collection[str]) -> SplitCommandLine:
        """Share ``argv`` out between the command's own flags (``own_options``), DvD's engine
        settings and vLLM's parser. Raises ``EngineArgumentRefused`` for an argument DvD sets
        itself."""
        split = SplitCommandLine()
        side = split.own
        for token in argv:
            if not _is_option(token):
                side.append(token)  # a value of the option before it
                continue
            head, equals, value = token.partition("=")
            name = _canonical(token)
            if name in own_options:
                side = split.own
                token = head.replace("_", "-") + equals + value
            elif name in self.aliases or name in self.dvd_flags:
                target = self.aliases.get(name, name)
                side = split.own if target in own_options else split.dvd_engine
                token = target + equals + value
            elif name in self.refused:
                raise EngineArgumentRefused(
                    f"argument {name}: DvD sets this vLLM engine argument itself "
                    f"({self.refused[name]})"
                )
            else:
                side = split.vllm  # vLLM's parser reads (or refuses) it as written
            side.append(token)
        return split

    def parse(self, argv: Sequence[str]) -> dict[str, Any]:
        """The engine arguments given in ``argv`` (vLLM's part of a command line), by
        ``AsyncEngineArgs`` field, as vLLM's parser reads them. Exits with vLLM's usage error
        on a bad one."""
        actions = [action for action in self.parser._actions if action.option_strings]
        defaults = [action.default for action in actions]
        # Only what was given: the rest keeps AsyncEngineArgs' defaults.
        for action in actions:
            action.default = argparse.SUPPRESS
        try:
            namespace = self.parser.parse_args(list(argv))
        finally:
            for action, default in zip(actions, defaults, strict=True):
                action.default = default
        return dict(vars(namespace))

    def error(self, message: str) -> NoReturn:
        """Report a usage error the way argparse does (exit status 2)."""
        self.parser.error(message)

    # ---- help -----------------------------------------------------------------------------

    def format_help(self) -> str:
        """vLLM's engine arguments as DvD accepts them: those passed through, by vLLM's group,
        then those that are DvD's own settings and those DvD refuses."""
        formatter = self.parser._get_formatter()
        formatter.add_text(
            f"vLLM engine arguments (vLLM {self.version}): names, defaults and help are "
            "vLLM's own, read from the installed vLLM. Those given are handed to vLLM's "
            "AsyncEngineArgs; the others keep vLLM's defaults. JSON arguments also take "
            "dotted fields (--compilation-config.mode 3)."
        )
        for group in self.parser._action_groups:
            if not group._group_actions:
                continue
            formatter.start_section(f"vLLM engine arguments: {group.title}")
            formatter.add_text(_first_paragraph(group.description))
            formatter.add_arguments(group._group_actions)
            formatter.end_section()
        text = formatter.format_help()
        owned = "\n".join(
            f"  {', '.join(options)}  ->  {self.aliases[options[0]]}"
            for options in self.owned_options.values()
        )
        refused = "\n".join(
            f"  {', '.join(options)}: {self.refused[options[0]]}"
            for options in self.refused_options.values()
        )
        return (
            f"{text}\nvLLM engine arguments that are DvD settings (vLLM's spelling is accepted "
            f"for DvD's flag above, which is the one source of the value):\n{owned}\n\n"
            f"vLLM engine arguments DvD sets itself (refused):\n{refused}\n"
        )


def _first_paragraph(text: str | None) -> str:
    return (text or "").strip().split("\n\n", 1)[0]


@cache
def engine_arguments(prog: str) -> EngineArguments:
    """vLLM's engine arguments against the language service's settings (built once: importing
    vLLM takes seconds)."""
    from llm_server.settings import LLMSettings

    options, _ = settings_options(LLMSettings, prog)
    return EngineArguments(options, prog)


def _wants_help(argv: Sequence[str]) -> bool:
    return any(token in ("-h", "--help") for token in argv)


def _split_or_exit(
    engine: EngineArguments, argv: Sequence[str], own_options: Collection[str]
) -> SplitCommandLine:
    try:
        return engine.split(argv, own_options)
    except EngineArgumentRefused as exc:
        engine.error(str(exc))


def _show_help(own_help: str, engine: EngineArguments) -> NoReturn:
    sys.stdout.write(own_help + "\n" + engine.format_help())
    sys.stdout.flush()
    raise SystemExit(0)


def parse_llm_command_line(
    argv: Sequence[str], prog: str = "dvd-llm-server"
) -> tuple[Any, dict[str, Any]]:
    """``dvd-llm-server``'s command line -> (``LLMSettings``, vLLM engine arguments given)."""
    from llm_server.settings import LLMSettings

    engine = engine_arguments(prog)
    own_options, own_help = settings_options(LLMSettings, prog)
    split = _split_or_exit(engine, argv, own_options)
    if _wants_help(split.own):
        _show_help(own_help, engine)
    if split.dvd_engine:  # DVD_SETTINGS names a setting LLMSettings lacks
        engine.error(f"unrecognized arguments: {' '.join(split.dvd_engine)}")
    engine_values = engine.parse(split.vllm)
    settings = LLMSettings(  # type: ignore[call-arg]
        _cli_parse_args=split.own, _cli_prog_name=prog
    )
    return settings, engine_values


def split_serve_command_line(
    argv: Sequence[str], settings_cls: type[BaseSettings], prog: str = "dvd-serve"
) -> tuple[list[str], list[str]]:
    """``dvd-serve``'s command line -> (its own flags, the engine arguments it forwards to the
    language service: DvD's engine settings and vLLM's, checked here first)."""
    engine = engine_arguments(prog)
    own_options, own_help = settings_options(settings_cls, prog)
    split = _split_or_exit(engine, argv, own_options)
    if _wants_help(split.own):
        _show_help(own_help, engine)
    engine.parse(split.vllm)  # a bad vLLM argument stops here, before any service starts
    return split.own, [*split.dvd_engine, *split.vllm]


def iter_given(values: dict[str, Any]) -> Iterator[str]:
    """``name=value`` lines of engine arguments, for the log."""
    for name, value in sorted(values.items()):
        yield f"{name}={value!r}"
