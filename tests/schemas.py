"""The one JSON Schema validator of the suite: every `--json` output is checked against docs/<tool>.schema.json."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, validators
from referencing import Registry, Resource

DOCS = Path(__file__).resolve().parents[1] / "docs"
ENVELOPE = ("schema_version", "tool", "xq_version")

# JSON Schema lets 3.0 pass as an integer; xq writes counts as ints, so 3.0 where a count belongs is a bug.
_STRICT_TYPES = Draft202012Validator.TYPE_CHECKER.redefine(
    "integer", lambda _checker, v: isinstance(v, int) and not isinstance(v, bool))
StrictValidator = validators.extend(Draft202012Validator, type_checker=_STRICT_TYPES)


@functools.cache
def _registry() -> Registry:
    """Every docs/*.schema.json under its $id, so one schema can $ref another (inspect -> convert)."""
    resources = []
    for path in sorted(DOCS.glob("*.schema.json")):
        schema = json.loads(path.read_text(encoding="utf-8"))
        resources.append((schema["$id"], Resource.from_contents(schema)))
    return Registry().with_resources(resources)


@functools.cache
def validator(name: str, definition: str | None = None) -> Draft202012Validator:
    """A validator for docs/<name>.schema.json (or one of its $defs), itself checked against the meta-schema."""
    schema = json.loads((DOCS / f"{name}.schema.json").read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    if definition is not None:
        schema = {"$ref": f"{schema['$id']}#/$defs/{definition}"}
    return StrictValidator(schema, registry=_registry())


def errors(obj: Any, name: str, definition: str | None = None) -> list[str]:
    """Every violation of `obj` against the schema, as 'path: message' lines (empty when valid)."""
    found = validator(name, definition).iter_errors(obj)
    return sorted(f"{e.json_path}: {e.message}" for e in found)


def assert_valid(obj: Any, name: str, definition: str | None = None) -> None:
    """`obj` satisfies docs/<name>.schema.json (every violation in the failure message)."""
    problems = errors(obj, name, definition)
    assert not problems, "\n".join(problems)
