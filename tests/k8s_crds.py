"""Validate custom resources (KServe, Kubeflow Trainer) strictly against their CRDs, with no cluster.

`kubernetes-validate` knows only the built-in kinds. The CRDs are in ../shared/k8s-crds/ (copied
unchanged from their projects; README there): each version's openAPIV3Schema is checked with
jsonschema, made strict the way an API server is about unknown fields: `additionalProperties: false`
wherever a schema lists `properties` and does not say `x-kubernetes-preserve-unknown-fields`.
Shared by every test that writes a custom resource (KServe export, TrainJob launchers).
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[1]
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are large: libyaml when there


def crd_folder() -> Path | None:
    """$TUNESERVE_K8S_CRDS, else the copy in tests/data/k8s-crds (KServe's and Kubeflow Trainer's, vendored
    so CI always runs these checks), else the first `shared/k8s-crds` beside the repository or above it."""
    if os.environ.get("TUNESERVE_K8S_CRDS"):
        return Path(os.environ["TUNESERVE_K8S_CRDS"])
    if (REPO / "tests" / "data" / "k8s-crds").is_dir():
        return REPO / "tests" / "data" / "k8s-crds"
    for parent in REPO.parents:
        if (parent / "shared" / "k8s-crds").is_dir():
            return parent / "shared" / "k8s-crds"
    return None


def errors(document: dict[str, Any]) -> list[str]:
    """Every way `document` breaks its CRD's schema (empty: valid), as 'path: message'."""
    validator = _validator(document.get("apiVersion", ""), document.get("kind", ""))
    found = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in found]


def assert_valid(document: dict[str, Any]) -> None:
    problems = errors(document)
    assert not problems, f"{document.get('kind')} is not valid against its CRD:\n" + "\n".join(problems)


def strict(schema: Any) -> Any:
    """A copy of an openAPIV3Schema that refuses unknown fields (see the module docstring)."""
    schema = copy.deepcopy(schema)
    _tighten(schema)
    return schema


def _tighten(node: Any) -> None:
    if isinstance(node, list):
        for item in node:
            _tighten(item)
        return
    if not isinstance(node, dict):
        return
    if (
        "properties" in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in node
    ):
        node["additionalProperties"] = False
    for value in node.values():
        _tighten(value)


@functools.cache
def _validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    group, _, version = api_version.rpartition("/")
    for crd in _crds():
        spec = crd["spec"]
        if spec["group"] == group and spec["names"]["kind"] == kind:
            for served in spec["versions"]:
                if served["name"] == version:
                    return jsonschema.Draft7Validator(strict(served["schema"]["openAPIV3Schema"]))
            raise AssertionError(f"the {kind} CRD has no version {version!r}")
    raise AssertionError(f"no CRD for {api_version} {kind} in {crd_folder()}")


@functools.cache
def _crds() -> tuple[dict[str, Any], ...]:
    folder = crd_folder()
    if folder is None:
        raise AssertionError("no shared/k8s-crds folder found; set TUNESERVE_K8S_CRDS")
    return tuple(
        doc
        for path in sorted(folder.glob("*.yaml"))
        for doc in yaml.load_all(path.read_text(), Loader=_LOADER)
        if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition"
    )
