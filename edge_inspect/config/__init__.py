"""The daemon's one config file: a typed schema, validated at load, errors that point at the line.

Example:
    from edge_inspect.config import load_config
    config = load_config("/etc/edge-inspect/line1.yaml")   # raises ConfigError naming file:line, key, value, fix
    config.cameras[0].source.type                          # "v4l2" | "url" | "gstreamer" | "replay"

Secrets are never required in the file: the MQTT password comes from an environment variable or a
systemd credential (see the `mqtt` section). `config_json_schema()` feeds docs/config.md.
"""

from __future__ import annotations

import difflib
import logging
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError
from .base import Section
from .capture import (
    NAME_PATTERN,
    CameraConfig,
    GStreamerSourceConfig,
    PipelineConfig,
    ReconnectConfig,
    ReplaySourceConfig,
    RoiConfig,
    TriggerConfig,
    UrlSourceConfig,
    V4l2SourceConfig,
)
from .evidence import EvidenceConfig
from .feedback import FeedbackConfig
from .mqtt import MqttConfig, SpoolConfig
from .scoring import ScoringConfig
from .stream import StreamConfig
from .threshold import ThresholdConfig
from .vlm import VlmConfig

log = logging.getLogger(__name__)

__all__ = [
    "AppConfig",
    "CameraConfig",
    "ConfigProblem",
    "EvidenceConfig",
    "FeedbackConfig",
    "GStreamerSourceConfig",
    "MqttConfig",
    "PipelineConfig",
    "ReconnectConfig",
    "ReplaySourceConfig",
    "RoiConfig",
    "ScoringConfig",
    "SpoolConfig",
    "StreamConfig",
    "ThresholdConfig",
    "TriggerConfig",
    "UrlSourceConfig",
    "V4l2SourceConfig",
    "VlmConfig",
    "config_json_schema",
    "load_config",
    "parse_config",
]


class AppConfig(Section):
    """Everything `edge-inspect run` needs: the station, its cameras, the scorer, MQTT, the spool, the
    evidence kept on disk and the VLM that explains flagged frames."""

    station: str = Field(
        pattern=NAME_PATTERN,
        description="Station (line position) id; the root of every MQTT topic this daemon publishes.",
    )
    cameras: list[CameraConfig] = Field(
        min_length=1, max_length=16, description="The cameras this daemon inspects, each with its own product."
    )
    scoring: ScoringConfig = Field(default_factory=ScoringConfig, description="Scorer runtime and calibration folders.")
    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="Broker connection, topics and QoS.")
    spool: SpoolConfig = Field(default_factory=SpoolConfig, description="On-disk spool that keeps results through broker outages and restarts.")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="Queues between the stages, stop drain, stats.")
    evidence: EvidenceConfig = Field(
        default_factory=EvidenceConfig,
        description="Flagged frames kept on disk (frame, heatmap overlay, anomaly map, result JSON); on by default.",
    )
    vlm: VlmConfig = Field(
        default_factory=VlmConfig,
        description="The vision-language model that explains flagged frames; off by default.",
    )
    threshold: ThresholdConfig = Field(
        default_factory=ThresholdConfig,
        description="The live stream as evidence: per product a drift alarm on the OK scores, and the optional "
        "`adapt` that lets the threshold follow them within calibrated bounds.",
    )
    feedback: FeedbackConfig = Field(
        default_factory=FeedbackConfig,
        description="Operator feedback (ok / ng for an inspection): refits on overruled false rejects, labelled defects.",
    )
    stream: StreamConfig = Field(
        default_factory=StreamConfig,
        description="Learning from the line: each product's bank and threshold grow from its own OK frames, guarded, "
        "checked and versioned.",
    )

    @model_validator(mode="before")
    @classmethod
    def _deprecated_vlm_queue_size(cls, data: Any) -> Any:
        """vlm.queue_size (frames waiting for the VLM, in a second queue behind the flagged-frame queue)
        became pipeline.flagged_queue_size, the one queue: N waiting + the one being explained = N + 1."""
        vlm = data.get("vlm") if isinstance(data, dict) else None
        if not isinstance(vlm, dict) or "queue_size" not in vlm:
            return data
        data = dict(data)
        vlm = dict(vlm)
        old = vlm.pop("queue_size")
        data["vlm"] = vlm
        pipeline = data.get("pipeline")
        pipeline = dict(pipeline) if isinstance(pipeline, dict) else {}
        if "flagged_queue_size" in pipeline:
            log.warning("vlm.queue_size is deprecated and ignored: pipeline.flagged_queue_size (%s) is the one "
                        "flagged-frame queue; remove vlm.queue_size", pipeline["flagged_queue_size"])
        elif isinstance(old, int) and not isinstance(old, bool):
            pipeline["flagged_queue_size"] = old + 1
            data["pipeline"] = pipeline
            log.warning("vlm.queue_size is deprecated: read as pipeline.flagged_queue_size: %d (%d waiting + the one "
                        "being explained); write that instead", old + 1, old)
        else:
            raise ValueError(f"vlm.queue_size (deprecated; use pipeline.flagged_queue_size): {old!r} is not an integer")
        return data

    @field_validator("cameras")
    @classmethod
    def _unique_names(cls, cameras: list[CameraConfig]) -> list[CameraConfig]:
        seen: set[str] = set()
        for camera in cameras:
            if camera.name in seen:
                raise ValueError(f"camera name {camera.name!r} is used twice; give every camera its own name")
            seen.add(camera.name)
        return cameras


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong in a config file, located as precisely as the YAML allows."""

    line: int | None
    key: str
    message: str

    def render(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line else source
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigValidationError(ConfigError):
    """A config that does not validate; `problems` lists each one (the message has them all)."""

    def __init__(self, source: str, problems: list[ConfigProblem]):
        self.source = source
        self.problems = problems
        head = f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''} in the config"
        super().__init__("\n".join([head] + ["  " + p.render(source) for p in problems]))


def config_json_schema() -> dict[str, Any]:
    """The JSON Schema of the config file (docs/config.md is generated from it)."""
    return AppConfig.model_json_schema()


def load_config(path: str | Path) -> AppConfig:
    """Read, parse and validate a config file; every problem is reported with its line number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; start from examples/config.yaml") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc})") from None
    return parse_config(text, source=str(path))


def parse_config(text: str, source: str = "<config>") -> AppConfig:
    """Validate config text (what load_config does after reading the file)."""
    node, data = _compose(text, source)
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigValidationError(
            source, [ConfigProblem(_line(node), "", f"the top level must be a mapping of sections (station:, cameras:, ...), got a {kind}")]
        )
    try:
        return AppConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigValidationError(source, [_problem(error, node) for error in exc.errors()]) from None


# --- YAML -------------------------------------------------------------------------------------


def _compose(text: str, source: str) -> tuple[yaml.Node, Any]:
    """Parse YAML keeping the node tree (for line numbers); reject duplicate keys."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigValidationError(source, [ConfigProblem(None, "", "the file is empty; start from examples/config.yaml")])
        _bound_expansion(node, source)
        problems = list(_duplicate_keys(node, ""))
        if problems:
            raise ConfigValidationError(source, problems)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        what = " ".join(part for part in (exc.context, exc.problem) if part)
        raise ConfigValidationError(
            source, [ConfigProblem(line, "", f"not valid YAML: {what}; check indentation, colons and quotes")]
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigValidationError(source, [ConfigProblem(None, "", f"not valid YAML: {exc}")]) from None
    finally:
        loader.dispose()
    return node, data


# A config is a few hundred values; aliases (*name) that expand to more than this are an alias bomb.
MAX_EXPANDED_NODES = 20_000


def _bound_expansion(root: yaml.Node, source: str) -> None:
    """Count the nodes the document expands to (an alias counts its whole subtree again), stopping early."""
    count = 0
    stack = [root]
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_EXPANDED_NODES:
            raise ConfigValidationError(source, [ConfigProblem(
                _line(node), "", f"the YAML expands to more than {MAX_EXPANDED_NODES} values through anchors and aliases "
                "(&name / *name); write the values out instead of nesting aliases")])
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                stack.append(key_node)
                stack.append(value_node)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def _duplicate_keys(node: yaml.Node, path: str):
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            child = f"{path}.{key}" if path else key
            if key in seen:
                yield ConfigProblem(
                    key_node.start_mark.line + 1, child,
                    f"duplicate key (first set on line {seen[key]}); keep one of them",
                )
            else:
                seen[key] = key_node.start_mark.line + 1
            yield from _duplicate_keys(value_node, child)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _duplicate_keys(item, f"{path}[{index}]")


def _line(node: yaml.Node | None) -> int | None:
    return node.start_mark.line + 1 if node is not None else None


def _locate(root: yaml.Node, loc: tuple[Any, ...]) -> tuple[yaml.Node, yaml.Node | None, list[Any]]:
    """Follow a pydantic error location through the YAML tree.

    Returns (deepest node reached, the key node when the last step was a mapping key, the location
    as the user wrote it). Steps that are not in the file (a union's tag, a missing key) are
    skipped unless they are the last one.
    """
    node, key_node, shown = root, None, []
    for position, step in enumerate(loc):
        last = position == len(loc) - 1
        found = None
        if not last and isinstance(node, yaml.MappingNode) and _is_tag(node, step):
            continue  # a tagged union's branch name (e.g. source -> "url"), not a key of the file
        if isinstance(node, yaml.MappingNode) and isinstance(step, str):
            for k, v in node.value:
                if str(k.value) == step:
                    found, key_node = v, k
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and 0 <= step < len(node.value):
            found, key_node = node.value[step], None
        if found is not None:
            node = found
            shown.append(step)
        elif last:
            shown.append(step)
            key_node = None
    return node, key_node, shown


def _is_tag(node: yaml.MappingNode, step: Any) -> bool:
    return any(str(k.value) == "type" and getattr(v, "value", None) == step for k, v in node.value)


def _dotted(parts: list[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --- schema walking (for descriptions and allowed keys) ----------------------------------------


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found.extend(_models_in(arg))
    return found


def _schema_at(loc: tuple[Any, ...]) -> tuple[list[type[BaseModel]], Any]:
    """The model(s) holding the last step of loc, and that step's FieldInfo (or None)."""
    candidates: list[type[BaseModel]] = [AppConfig]
    field = None
    for position, step in enumerate(loc):
        if isinstance(step, int):
            continue
        owners = [m for m in candidates if step in m.model_fields]
        if owners:
            if position == len(loc) - 1:
                return owners, owners[0].model_fields[step]
            field = owners[0].model_fields[step]
            inner = _models_in(field.annotation)
            if not inner:
                return owners, field
            candidates = inner
            continue
        tagged = [
            m for m in candidates
            if "type" in m.model_fields and step in typing.get_args(m.model_fields["type"].annotation)
        ]
        if tagged:
            candidates = tagged
        elif position == len(loc) - 1:
            return candidates, None
    return candidates, field


def _problem(error: dict[str, Any], root: yaml.Node) -> ConfigProblem:
    loc = tuple(error.get("loc", ()))
    node, key_node, shown = _locate(root, loc)
    key = _dotted(shown)
    kind = error.get("type", "")
    value = error.get("input")
    message = str(error.get("msg", "invalid"))
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    owners, field = _schema_at(loc)
    hint = (field.description or "") if field is not None else ""
    line = _line(key_node) if key_node is not None else _line(node)

    if kind == "extra_forbidden":
        unknown = str(loc[-1])
        allowed = sorted({name for model in owners for name in model.model_fields})
        close = difflib.get_close_matches(unknown, allowed, n=1, cutoff=0.6)
        fix = f"did you mean `{close[0]}`?" if close else "remove it"
        text = f"unknown key `{unknown}`; {fix} (allowed here: {', '.join(allowed)})"
    elif kind == "missing":
        if loc and isinstance(loc[-1], int):
            text = f"needs more items (item {loc[-1]} is missing)" + (f"; {hint}" if hint else "")
        else:
            text = f"required key is missing; add `{loc[-1]}:`" + (f" ({hint})" if hint else "")
    elif kind == "union_tag_not_found":
        tags = _tags(owners, loc)
        text = f"needs a `type:` key, one of {', '.join(tags)}" if tags else message
    elif kind == "union_tag_invalid":
        tags = _tags(owners, loc)
        if isinstance(node, yaml.MappingNode):
            for k, _ in node.value:
                if k.value == "type":
                    line, key = _line(k), f"{key}.type"
        got = error.get("ctx", {}).get("tag", value)
        text = f"{got!r} is not a known type; use one of {', '.join(tags)}" if tags else message
    elif kind == "value_error" and isinstance(value, (list, dict)):
        text = message  # our own validator on a whole section or list: its message names the item and the fix
    else:
        described = hint and kind != "value_error"  # our own validators already say how to fix it
        text = f"{_show(value)} is not valid: {message}" + (f". ({hint})" if described else "")
    return ConfigProblem(line, key, text)


def _tags(owners: list[type[BaseModel]], loc: tuple[Any, ...]) -> list[str]:
    field = None
    for model in owners:
        if loc and loc[-1] in model.model_fields:
            field = model.model_fields[loc[-1]]
    if field is None:
        return []
    tags = []
    for model in _models_in(field.annotation):
        if "type" in model.model_fields:
            tags.extend(str(t) for t in typing.get_args(model.model_fields["type"].annotation))
    return tags


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
