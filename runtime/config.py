"""The config engine both trainers share: a dataclass filled from its defaults <- a YAML preset <- `--key value` pairs.

One flag style for every trainer: `--key value` or `--key=value`, underscores canonical and dashes accepted
(`--micro-batch-size` == `--micro_batch_size`); booleans take a value (`--ema true`, `--ema false`); a list field takes
every word up to the next flag (`--data_path 0.7 a 0.3 b`, `--scale 0.5 1.0`) or a JSON list, its elements coerced to
the element type; a dict field is a JSON object; an optional field accepts none/null. A YAML preset mirrors the flags
key for key, so a preset is a saved command line.

Every refusal is one line naming the field, the value and the fix (`print_error`), printed once per node
(`first_rank_on_node`): unknown keys with close matches, values of the wrong type, YAML errors as file:line:col, and the
ranges each trainer declares in its tables (choices, integer minimums and maximums, float ranges; every float finite).
The trainer keeps its own checks across fields (budgets, data, model, paths) and its RESUME_POLICY table, which says
for each field what a resume does when its value differs from the checkpoint's: REFUSE, ALLOW or IGNORE.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml

from runtime.checks import FloatRange
from runtime.errors import first_rank_on_node, print_error
from runtime.fields import FALSE_WORDS, NO_VALUE, TRUE_WORDS, canonical, field_shape, flag_text

# A resume compares each field with the value saved in the checkpoint (runtime.checkpoint.resume_differences):
#   REFUSE: the checkpoint means something else under the new value (its weights, optimizer state or data position);
#   ALLOW:  a change made on purpose (how long, how often, how fast), logged as "resume: FIELD OLD -> NEW";
#   IGNORE: where the run is and how it was started, not what it is.
REFUSE, ALLOW, IGNORE = "refuse", "allow", "ignore"
ConfigT = TypeVar("ConfigT")


def opt(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    choices: tuple[Any, ...] | None = None,
    section: str | None = None,
) -> Any:
    """A config field that carries its --help text, its allowed values (checked, and listed in --help) and, on the
    first field of a group, the group's heading: `lr: float = opt(1e-3, "peak learning rate")`."""
    metadata = {"help": help, "choices": choices, "section": section}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class ConfigEngine(Generic[ConfigT]):
    """Fills and checks one trainer's config dataclass. The tables say each field's valid values:

    choices:      field -> the allowed values
    int_minimums: field -> (the smallest valid value, what the edge means, e.g. " (0 = off)"); None, where the type
                  allows it, means "not set" and is not checked
    int_maximums: field -> (the largest valid value, how to show it)
    float_ranges: field -> FloatRange; every other float (and every float in a list) is checked finite
    examples:     field -> a value for the `e.g. --field VALUE` of an error (default: the field's default)
    renamed:      an old field name -> its new name, so that an old flag is answered with the new one
    """

    def __init__(
        self,
        cls: type[ConfigT],
        *,
        preset_dir: Path,
        prog: str | None = None,
        choices: dict[str, tuple[Any, ...]] | None = None,
        int_minimums: dict[str, tuple[int, str]] | None = None,
        int_maximums: dict[str, tuple[int, str]] | None = None,
        float_ranges: dict[str, FloatRange] | None = None,
        examples: dict[str, str] | None = None,
        renamed: dict[str, str] | None = None,
    ) -> None:
        self.cls = cls
        self.preset_dir = preset_dir
        self.preset_label = f"{preset_dir.parent.name}/{preset_dir.name}/"  # e.g. llm/configs/, in messages
        self.prog = prog
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        self.fields: dict[str, dataclasses.Field] = {f.name: f for f in fields}
        hints = typing.get_type_hints(cls)
        self.shapes = {name: field_shape(hints[name]) for name in self.fields}
        self.hints = hints
        self.defaults = cls()
        missing = [name for name, f in self.fields.items() if not f.metadata.get("help")]
        if missing:
            raise KeyError(
                f"{cls.__name__}: fields without help text (declare them with opt(default, help)): {missing}"
            )
        self.choices = {n: f.metadata["choices"] for n, f in self.fields.items() if f.metadata.get("choices")}
        self.choices.update(choices or {})
        self.int_minimums = int_minimums or {}
        self.int_maximums = int_maximums or {}
        self.float_ranges = float_ranges or {}
        self.examples = examples or {}
        self.renamed = renamed or {}
        for table in (self.choices, self.int_minimums, self.int_maximums, self.float_ranges, self.examples):
            stray = set(table) - set(self.fields)
            if stray:
                raise KeyError(f"{cls.__name__}: the engine's tables name fields it does not have: {sorted(stray)}")

    # --- coercion --------------------------------------------------------------------------------------------------

    def example(self, name: str) -> str:
        if name in self.examples:
            return f"--{name} {self.examples[name]}"
        return f"--{name} {flag_text(getattr(self.defaults, name))}"

    def _elements(self, name: str, values: list[Any], shown: str) -> list[Any]:
        element = self.shapes[name].element
        if element is str:
            return [str(v) for v in values]
        out = []
        for v in values:
            if isinstance(v, bool):
                raise ValueError(f"{shown}: expected {self.shapes[name].expected()}, e.g. {self.example(name)}")
            try:
                number = element(v) if isinstance(v, (int, float, str)) else None  # type: ignore[misc]
            except (TypeError, ValueError):
                number = None
            if number is None or (element is int and isinstance(v, float) and not v.is_integer()):
                raise ValueError(f"{shown}: expected {self.shapes[name].expected()}, e.g. {self.example(name)}")
            out.append(number)
        return out

    def coerce(self, name: str, value: Any, from_cli: bool) -> Any:
        """Check `value` against the field's type; a command-line string is parsed first."""
        shape = self.shapes[name]
        origin, expected = shape.origin, shape.expected()
        if from_cli and isinstance(value, str):
            return self._parse_word(name, value)
        if value is None:
            if shape.optional:
                return None
            raise ValueError(f"{name}=None: expected {expected}, e.g. {self.example(name)}")
        if origin is list and isinstance(value, str):  # YAML `data_path: "0.7 a 0.3 b"`, as on the command line
            value = value.split()
        if origin is float and isinstance(value, str):
            # PyYAML reads `1e-3` (no dot: YAML 1.1) as a string; it is the number the user meant.
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"{name}={value!r}: expected a number, e.g. {self.example(name)}") from None
        if origin is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if origin is bool and not isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: expected true or false")
        if origin is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{name}={value!r}: expected an integer, e.g. {self.example(name)}")
        if not isinstance(value, origin) or (origin is float and isinstance(value, bool)):
            raise ValueError(
                f"{name}={value!r}: expected {expected}, got {type(value).__name__}, e.g. {self.example(name)}"
            )
        if origin is list:
            return self._elements(name, list(value), f"{name}={value!r}")
        return value

    def _parse_word(self, name: str, value: str) -> Any:
        shape = self.shapes[name]
        origin = shape.origin
        if shape.optional and value.lower() in NO_VALUE:
            return None
        if origin is bool:
            if value.lower() in TRUE_WORDS:
                return True
            if value.lower() in FALSE_WORDS:
                return False
        elif origin is int:
            try:  # 2e9 is an integer too, as a token budget is usually written
                return int(float(value)) if "e" in value.lower() and float(value).is_integer() else int(value)
            except (ValueError, OverflowError):
                pass
        elif origin is float:
            try:
                return float(value)
            except ValueError:
                pass
        elif origin is list:
            text = value.strip()
            if not text.startswith("["):
                return self._elements(name, text.split(), f"--{name} {value!r}")
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"--{name} {value!r}: not valid JSON ({err.msg} at column {err.colno}); write "
                    f"the words separated by spaces, e.g. {self.example(name)}"
                ) from None
            if isinstance(parsed, list):
                return self._elements(name, parsed, f"--{name} {value!r}")
        elif origin is dict:
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"--{name} {value!r}: not valid JSON ({err.msg} at column {err.colno}); write a "
                    f"JSON object with double-quoted keys, e.g. {self.example(name)}"
                ) from None
            if isinstance(parsed, dict):
                return parsed
            raise ValueError(
                f"--{name} {value!r}: expected a JSON object, got a JSON {type(parsed).__name__}; "
                f"e.g. {self.example(name)}"
            )
        else:
            return value
        raise ValueError(
            f"--{name} {value!r}: expected {shape.expected()}{' or none' if shape.optional else ''}, "
            f"e.g. {self.example(name)}"
        )

    def _unknown(self, key: str, source: str) -> ValueError:
        name = canonical(key)
        if name in self.renamed:
            hint = f" (renamed: use {self.renamed[name]})"
        elif (
            name.startswith("no_")
            and self.shapes.get(name[3:], None) is not None
            and self.shapes[name[3:]].origin is bool
        ):
            hint = f" (booleans take a value: --{name[3:]} false)"
        else:
            close = difflib.get_close_matches(name, self.fields, n=3)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        return ValueError(f"{source}: unknown config key {key!r}{hint}; known keys: {', '.join(self.fields)}")

    def apply(self, config: ConfigT, updates: dict[str, Any], source: str, from_cli: bool) -> None:
        """Set each `key: value` of one layer (a YAML file, a dict, the command line) on `config`, checked."""
        for key, value in updates.items():
            name = canonical(key)
            if name not in self.fields:
                raise self._unknown(str(key), source)
            try:
                setattr(config, name, self.coerce(name, value, from_cli))
            except ValueError as err:
                raise ValueError(str(err) if from_cli else f"{source}: {err}") from None

    # --- the layers ------------------------------------------------------------------------------------------------

    def preset_file(self, path: str | Path) -> Path:
        """A YAML file by path, or a preset by name from the preset directory."""
        file = Path(path)
        if file.is_file():
            return file
        named = self.preset_dir / f"{path}.yaml"
        if named.is_file():
            return named
        presets = sorted(p.stem for p in self.preset_dir.glob("*.yaml"))
        raise ValueError(
            f"config={str(path)!r}: no such file, nor a preset in {self.preset_label} ({', '.join(presets)})"
        )

    def read_preset(self, path: str | Path) -> dict[str, Any]:
        return read_yaml_mapping(self.preset_file(path))

    def parse_cli_pairs(self, argv: list[str]) -> dict[str, str]:
        """['--lr', '3e-4', '--export=false'] -> {'lr': '3e-4', 'export': 'false'}.

        A list field takes every word up to the next --flag, as Megatron's `--data-path W1 P1 W2 P2` does:
        ['--data_path', '0.7', 'a', '0.3', 'b'] -> {'data_path': '0.7 a 0.3 b'} (the quoted one-word form works too).
        """
        pairs: dict[str, str] = {}
        i = 0
        while i < len(argv):
            arg = argv[i]
            if not arg.startswith("--"):
                raise ValueError(f"unexpected argument {arg!r}; overrides are --key value pairs")
            key = arg[2:]
            if "=" in key:
                key, value = key.split("=", 1)
                i += 1
            else:
                name = canonical(key)
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    shape = self.shapes.get(name)
                    if shape is not None and shape.origin is bool:
                        raise ValueError(f"--{key} needs a value: --{key} true or --{key} false")
                    raise ValueError(f"--{key} needs a value")
                end = i + 2
                if name in self.shapes and self.shapes[name].origin is list:
                    while end < len(argv) and not argv[end].startswith("--"):
                        end += 1
                value = " ".join(argv[i + 1 : end])
                i = end
            pairs[key] = value
        return pairs

    def load(
        self,
        path: str | Path | None = None,
        overrides: dict[str, Any] | None = None,
        cli_overrides: list[str] | None = None,
        apply: Callable[[ConfigT, dict[str, Any], str, bool], None] | None = None,
    ) -> ConfigT:
        """Defaults <- YAML file (a path or a preset name) <- `overrides` <- `--key value` pairs; not validated.

        `apply` replaces `self.apply` for a trainer whose layers interact (llm: a budget given replaces the other)."""
        apply = apply or self.apply
        config = self.cls()
        if path is not None:
            file = self.preset_file(path)
            apply(config, read_yaml_mapping(file), str(file), False)
        apply(config, overrides or {}, "overrides", False)
        apply(config, self.parse_cli_pairs(cli_overrides or []), "command line", True)
        return config

    # --- ranges ----------------------------------------------------------------------------------------------------

    def check_ranges(self, config: ConfigT) -> None:
        """The trainer's tables, in this order: choices, integer bounds, float ranges, then every other float finite
        (nan and inf slip through comparisons: each comparison with nan is false)."""
        for name, allowed in self.choices.items():
            value = getattr(config, name)
            if value not in allowed:
                raise ValueError(
                    f"{name}={value!r} is not one of {', '.join(map(str, allowed))}; e.g. {self.example(name)}"
                )
        for name, (minimum, meaning) in self.int_minimums.items():
            value = getattr(config, name)
            if value is not None and value < minimum:
                raise ValueError(f"{name}={value} must be >= {minimum}{meaning}")
        for name, (maximum, shown) in self.int_maximums.items():
            value = getattr(config, name)
            if value is not None and value > maximum:
                raise ValueError(f"{name}={value} must be at most {shown}")
        for name, bounds in self.float_ranges.items():
            value = getattr(config, name)
            if value is not None and not bounds.contains(value):
                raise ValueError(f"{name}={value} must be a finite number in {bounds.shown()}; {bounds.fix}")
        for name, shape in self.shapes.items():
            value = getattr(config, name)
            if name in self.float_ranges or value is None or float not in (shape.origin, shape.element):
                continue
            if not all(math.isfinite(v) for v in (value if shape.origin is list else [value])):
                raise ValueError(f"{name}={value} must be finite (no nan or inf); e.g. {self.example(name)}")

    # --- help ------------------------------------------------------------------------------------------------------

    def usage(self, doc: str) -> str:
        """`doc`, then every field as a flag with its type, default, help and choices, under its group's heading."""
        lines = [
            doc.strip(),
            "",
            f"Fields of {self.cls.__module__}.{self.cls.__name__} (each also a key of the YAML "
            f"presets in {self.preset_label}; --key value or --key=value, dashes or "
            f"underscores):",
        ]
        for name, f in self.fields.items():
            if f.metadata.get("section"):
                lines.append(f"\n {f.metadata['section']}:")
            default = flag_text(getattr(self.defaults, name))
            lines.append(f"  --{name} {self.shapes[name].metavar()}  (default: {default})")
            lines.append(f"        {f.metadata['help']}")
            if name in self.choices:
                lines.append(f"        choices: {' | '.join(flag_text(c) for c in self.choices[name])}")
        return "\n".join(lines) + "\n"

    # --- the command line ------------------------------------------------------------------------------------------

    def split_argv(self, argv: list[str]) -> tuple[str | None, list[str], bool]:
        """(the --config value, the --key value overrides, whether help was asked for). The deepspeed launcher's
        --local_rank=N is dropped: the rank comes from the environment."""
        argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
        wants_help = "-h" in argv or "--help" in argv
        config_path = None
        for i, arg in enumerate(argv):
            if arg == "--config" or arg.startswith("--config="):
                if arg == "--config" and (i + 1 >= len(argv) or argv[i + 1].startswith("--")):
                    presets = ", ".join(sorted(p.stem for p in self.preset_dir.glob("*.yaml")))
                    raise ValueError(f"--config needs a value: a preset name ({presets}) or a YAML file")
                config_path = argv[i + 1] if arg == "--config" else arg.split("=", 1)[1]
                del argv[i : i + (2 if arg == "--config" else 1)]
                break
        return config_path, argv, wants_help

    def parse_command_line(
        self, argv: list[str], load: Callable[[str | None, list[str]], ConfigT], doc: str
    ) -> tuple[ConfigT | None, int]:
        """(config, 0); or (None, 0) after printing the usage for -h/--help; or (None, 2) after printing the error
        once per node. `load(config_path, overrides)` builds and validates the trainer's config."""
        speaks = first_rank_on_node(argv)  # every rank reads the same command line: say it once per node
        try:
            config_path, overrides, wants_help = self.split_argv(list(argv))
            if wants_help:
                if speaks:
                    sys.stdout.write(self.usage(doc))
                return None, 0
            return load(config_path, overrides), 0
        except ValueError as err:
            if speaks:
                print_error(str(err), prog=self.prog)
            return None, 2

    @staticmethod
    def to_dict(config: ConfigT) -> dict[str, Any]:
        return dataclasses.asdict(config)  # type: ignore[call-overload]

    def dump_yaml(self, config: ConfigT) -> str:
        return yaml.safe_dump(self.to_dict(config), sort_keys=False)


def read_yaml_mapping(file: Path) -> dict[str, Any]:
    """A YAML file of `key: value` lines; what is wrong with it, as one line naming the file (and line)."""
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else str(file)
        problem = " ".join(str(err.problem or "parse error").split())
        if err.context and err.context_mark:  # where the broken construct began, e.g. an unclosed [ lines above
            problem = f"{' '.join(err.context.split())} at line {err.context_mark.line + 1}: {problem}"
        raise ValueError(f"{where}: not valid YAML ({problem}); write one `key: value` per line") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{file}: not valid YAML ({' '.join(str(err).split())})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{file}: not UTF-8 text (byte {err.start}); a config is a YAML text file") from None
    except OSError as err:
        raise ValueError(f"{file}: cannot read the config ({err.strerror})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a mapping of config keys (`key: value` lines), got {type(data).__name__}")
    return data
