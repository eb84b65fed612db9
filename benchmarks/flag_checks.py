"""Command-line checks shared by the benchmark scripts: a bad flag is refused as the flags are parsed, before any
compile or timing, with a message naming the flag and what would be valid."""

from collections.abc import Sequence

from absl import flags


def define_positive_integers(name: str, default: list[str], help_text: str) -> None:
  """A comma-separated list flag of integers >= 1, such as batch sizes or input channels."""
  flags.DEFINE_list(name, default, help_text)
  flags.register_validator(
    name,
    lambda values: _one_or_more_distinct(values) and all(value.isdecimal() and int(value) >= 1 for value in values),
    f'--{name} must be one or more distinct comma-separated integers >= 1.',
  )


def define_choices(name: str, default: list[str] | None, choices: Sequence[str] | None, help_text: str) -> None:
  """A comma-separated list flag of names from `choices` (None: not known here, so not checked)."""
  flags.DEFINE_list(name, default, help_text)
  if choices is not None:
    flags.register_validator(
      name,
      lambda values: values is None or (_one_or_more_distinct(values) and set(values) <= set(choices)),
      f'--{name} must be one or more of {tuple(choices)}, comma-separated, each once.',
    )


def _one_or_more_distinct(values: list[str]) -> bool:
  """At least one value, and none twice: a repeat would be measured again, or its row overwritten."""
  return bool(values) and len({int(v) if v.isdecimal() else v for v in values}) == len(values)
