"""The building blocks of the plan schema: the strict base model and the field types whose values
the harness writes into files and command lines (injection-safe), and the secrets rule."""
from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]*$"


def _text(pattern: str, allowed: str) -> Any:
    """A str type whose value must match pattern in full; its error says what is allowed."""

    def check(value: str) -> str:
        if re.fullmatch(pattern, value) is None:
            raise ValueError(allowed)
        return value

    return Annotated[str, AfterValidator(check)]


# Plan values the harness writes into files and command lines (.deepspeed_env, hostfiles, sbatch
# scripts, the launcher's argv) must not add lines or options there; those a shell reads must be
# one plain word: DeepSpeed's pdsh runner puts the host list and `export KEY=VALUE;` for every
# .deepspeed_env line into a remote shell command, unquoted.
OneLine = _text(r"[^\n\r\0]*", "one line: no newline, carriage return or NUL")
ShellWord = _text(r"[^\s\0;&|<>()$`\\\"']*", "one shell word: no whitespace, quotes, NUL or ; & | < > ( ) $ ` \\ "
                  "(DeepSpeed's pdsh runner exports it unquoted in a remote shell)")
SECRET_IN_PLAN = ("secrets do not belong in the plan (it is copied into the run folder): "
                  "export it in the shell that runs harness")


# A secret is a variable whose name has one of these words (WANDB_API_KEY, HF_TOKEN,
# AWS_SECRET_ACCESS_KEY, ...; not TOKENIZERS_PARALLELISM). Secrets never land in the run
# folder: users keep it on shared file systems and hand it to colleagues.
SECRET_WORDS = re.compile(r"(?:^|_)(?:TOKEN|SECRET|PASSWORD|API_KEY)(?:_|$)", re.IGNORECASE)


def is_secret(name: str) -> bool:
    return SECRET_WORDS.search(name) is not None


def _not_secret(name: str) -> str:
    if is_secret(name):
        raise ValueError(SECRET_IN_PLAN)
    return name


EnvName = Annotated[_text(r"[A-Za-z_][A-Za-z0-9_]*", "a variable name: a letter or _, then letters, digits or _"), AfterValidator(_not_secret)]
HOST_PATTERN = r"[A-Za-z0-9_.:-]+"
HostName = _text(HOST_PATTERN, "a host name or address: letters, digits and . _ - : (no whitespace or shell metacharacters)")
HostSelection = _text(r"[A-Za-z0-9_.:@,-]+", "hosts and slots as DeepSpeed takes them (node1:0,1@node2): letters, digits and "
                      ". _ - : @ , (no whitespace or shell metacharacters)")
SbatchValue = _text(r"[^\s\0]+", "one word: no whitespace or NUL (an #SBATCH line takes one value)")
SlurmTime = _text(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|(?i:UNLIMITED|INFINITE)",
                  "a SLURM time: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or UNLIMITED")


class Strict(BaseModel):
    """Base for every plan block: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)
