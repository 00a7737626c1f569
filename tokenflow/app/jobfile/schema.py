"""``tokenflow schema``: the JSON Schema (draft 2020-12) of one job file, generated from the
EditConfig fields (``tokenflow.config.field_specs``: types from the annotations, limits, choices
and patterns from each field's Rule) plus the job-only keys ``name`` and ``preset``.

The schema checks each value on its own; what it cannot express (steps <= inversion_steps, resume
needing a checkpoint folder, a ``WIDTHxHEIGHT`` string's sides being multiples of 8, the input
existing, clashes between jobs, YAML-level problems, the output's extension, outputs aliasing
inputs, the roots) is checked by ``tokenflow run --check``.
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Dict

from tokenflow.app.flags import field_help
from tokenflow.app.jobfile.load import EXTRA_KEYS, NAME_PATTERN, REQUIRED
from tokenflow.config import NONEMPTY_PATTERN, PRESETS, FieldSpec, Rule, field_specs


def add_parser(sub) -> None:
    sub.add_parser("schema", help="print the JSON Schema of a job file",
                   description="Print the JSON Schema (draft 2020-12) of one job file, for validating jobs "
                   "before submitting them. Cross-field rules are checked by `tokenflow run --check`.")


def main(args: argparse.Namespace) -> int:
    print(json.dumps(job_schema(), indent=2))
    return 0


def job_schema() -> dict:
    """JSON Schema (draft 2020-12) of one job file; dashed spellings are aliases of the fields."""
    properties: Dict[str, dict] = {}
    help_text = field_help()
    for name, spec in field_specs().items():
        prop = field_schema(spec, required=name in REQUIRED)
        if name == "frames":   # job files spell "every frame" as 0 (or null), like --frames 0
            prop["minimum"] = 0
            prop["description"] = "number of frames to edit (default 40; 0 or null = every selected frame)"
        else:
            prop["description"] = (REQUIRED.get(name) or spec.rule.description or help_text.get(name)
                                   or name.replace("_", " "))
        if name not in REQUIRED:
            prop["default"] = list(spec.default) if isinstance(spec.default, tuple) else spec.default
        properties[name] = prop
    properties["name"] = {"type": "string", "pattern": NAME_PATTERN, "description": EXTRA_KEYS["name"][1]}
    properties["preset"] = {"enum": sorted(PRESETS), "description": EXTRA_KEYS["preset"][1]}
    aliases = {name.replace("_", "-"): name for name in properties if "_" in name}
    for alias, name in aliases.items():
        properties[alias] = {"$ref": f"#/properties/{name}"}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "tokenflow job",
        "description": "One `tokenflow run` job: an input video, an output and edit settings (docs/jobs.md). "
                       "Relative paths resolve against the job file's folder. Not expressible here, checked by "
                       "`tokenflow run --check`: steps <= inversion_steps, resume needs checkpoint_dir, the sides "
                       "of a WIDTHxHEIGHT size are multiples of 8, files exist, `output` names a .mp4/.m4v/.mov "
                       "file or a folder (ending in '/' or existing), no output is, contains or lies inside an "
                       "input, and paths stay inside --output-root / --input-root.",
        "type": "object",
        "properties": properties,
        "required": list(REQUIRED),
        "additionalProperties": False,
        "dependentSchemas": {alias: {"not": {"required": [name]}} for alias, name in aliases.items()},
    }


def field_schema(spec: FieldSpec, required: bool = False) -> Dict[str, Any]:
    """The JSON Schema of one field's value. A required field is neither null nor empty."""
    rule = spec.rule
    if spec.choices:
        return {"enum": list(spec.choices) + ([None] if spec.nullable and not required else [])}
    options = []
    for kind in spec.kinds:
        if kind == "array":
            items = {"type": spec.items, **_limits(rule, spec.items), **_nonempty(required)}
            sizes = {"minItems": spec.length, "maxItems": spec.length} if spec.length else {"minItems": 1}
            options.append({"type": "array", "items": items, **sizes})
        else:
            options.append({"type": kind, **_limits(rule, kind),
                            **(_nonempty(required) if kind == "string" and not rule.pattern else {})})
    if rule.spelled:
        options.append({"type": "string", "pattern": rule.spelled})
    null = spec.nullable and not required
    if len(options) == 1:
        return {**options[0], "type": [options[0]["type"], "null"]} if null else options[0]
    return {"anyOf": options + ([{"type": "null"}] if null else [])}


def _limits(rule: Rule, kind: str) -> Dict[str, Any]:
    if kind in ("integer", "number"):
        limits = {"minimum": rule.minimum, "maximum": rule.maximum, "exclusiveMinimum": rule.above,
                  "multipleOf": rule.multiple_of}
        return {k: v for k, v in limits.items() if v is not None}
    if kind == "string" and rule.pattern:
        return {"pattern": rule.pattern}
    return {}


def _nonempty(required: bool) -> Dict[str, Any]:
    return {"pattern": NONEMPTY_PATTERN} if required else {}
