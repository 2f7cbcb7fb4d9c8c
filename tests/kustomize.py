"""Render deploy/kubernetes/ the way `kubectl kustomize` does, for the tests, without the binary.

CI's machine may have no kubectl, and no kustomize binary may be downloaded, so the manifest tests
render the overlays with this: the subset of Kustomize the manifests use, nothing more.
- `resources` (files and directories), `components` (kind Component: its resources join the
  parent's, then its generators and patches apply to all of them);
- `configMapGenerator` with `literals` and `behavior: create|merge`, and Kustomize's content-hash
  name suffix (sigs.k8s.io/kustomize/api/hasher), with the references to it renamed
  (`envFrom.configMapRef`, `env.valueFrom.configMapKeyRef`, `volumes.configMap`);
- `patches` from files: strategic merge patches, matched by kind and name, with the merge keys of
  the Kubernetes API for the lists they touch (containers and env by name, ports by containerPort,
  volumeMounts by mountPath; other lists are replaced), `null` deleting a key and `$patch: delete`
  deleting the resource;
- `images` (`newName`, `newTag`).
Anything else in a kustomization.yaml is an error here, so a manifest cannot silently use a
feature this renderer ignores. tests/test_kubernetes.py also checks that its output equals
`kubectl kustomize` wherever kubectl is installed.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import yaml

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "components", "configMapGenerator", "patches", "images"}
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort", "envFrom": None}
GENERATED = "keel.test/generated"  # marks a generated ConfigMap until its name gets the hash


class KustomizeError(ValueError):
    pass


def render(directory: Path) -> list[dict]:
    """Every resource of the kustomization in `directory`, as `kubectl kustomize` would emit them."""
    resources = _build(Path(directory), [])
    renames = {}
    for resource in resources:
        if resource["metadata"].get("annotations", {}).pop(GENERATED, None) is not None:
            if not resource["metadata"]["annotations"]:
                del resource["metadata"]["annotations"]
            name = resource["metadata"]["name"]
            resource["metadata"]["name"] = renames[name] = f"{name}-{config_map_hash(resource)}"
    for resource in resources:
        for pod in _pod_specs(resource):
            _rename_config_maps(pod, renames)
    return resources


def _build(directory: Path, accumulated: list[dict], component: bool = False) -> list[dict]:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    kustomization = yaml.safe_load(path.read_text())
    unknown = set(kustomization) - KUSTOMIZATION_KEYS
    if unknown:
        raise KustomizeError(f"{path}: fields this renderer does not implement: {sorted(unknown)}")
    expected = "Component" if component else "Kustomization"
    if kustomization.get("kind", "Kustomization") != expected:
        raise KustomizeError(f"{path}: kind {kustomization.get('kind')!r}, expected {expected}")
    resources = accumulated if component else []
    for entry in kustomization.get("resources", []):
        target = directory / entry
        resources += _build(target, []) if target.is_dir() else _load(target)
    for entry in kustomization.get("components", []):
        resources = _build(directory / entry, resources, component=True)
    for generator in kustomization.get("configMapGenerator", []):
        _generate(resources, generator, path)
    for patch in kustomization.get("patches", []):
        if set(patch) != {"path"}:
            raise KustomizeError(f"{path}: only file patches ({{path: ...}}) are implemented, not {patch}")
        for document in _load(directory / patch["path"]):
            resources = _patch(resources, document, directory / patch["path"])
    for image in kustomization.get("images", []):
        _set_image(resources, image)
    return resources


def _load(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def _generate(resources: list[dict], generator: dict, path: Path) -> None:
    name, behavior = generator["name"], generator.get("behavior", "create")
    if set(generator) - {"name", "behavior", "literals"}:
        raise KustomizeError(f"{path}: configMapGenerator fields beyond name, behavior, literals: {generator}")
    data = dict(literal.split("=", 1) for literal in generator.get("literals", []))
    existing = [r for r in resources if r["kind"] == "ConfigMap" and r["metadata"]["name"] == name]
    if behavior == "create":
        if existing:
            raise KustomizeError(f"{path}: ConfigMap {name} exists already (behavior: merge?)")
        resources.append({"apiVersion": "v1", "kind": "ConfigMap",
                          "metadata": {"name": name, "annotations": {GENERATED: "true"}}, "data": data})
    elif behavior == "merge":
        if not existing:
            raise KustomizeError(f"{path}: no ConfigMap {name} to merge into")
        existing[0]["data"].update(data)
    else:
        raise KustomizeError(f"{path}: behavior {behavior!r} is not implemented")


def _patch(resources: list[dict], patch: dict, path: Path) -> list[dict]:
    key = (patch.get("kind"), patch.get("metadata", {}).get("name"))
    targets = [r for r in resources if (r["kind"], r["metadata"]["name"]) == key]
    if len(targets) != 1:
        raise KustomizeError(f"{path}: patch for {key} matches {len(targets)} resources")
    if patch.get("$patch") == "delete":
        return [r for r in resources if r is not targets[0]]
    _merge(targets[0], patch)
    return resources


def _merge(base: dict, patch: dict) -> None:
    for key, value in patch.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        elif isinstance(value, list) and MERGE_KEYS.get(key) and isinstance(base.get(key), list):
            merge_key = MERGE_KEYS[key]
            for item in value:
                match = next((b for b in base[key] if b.get(merge_key) == item.get(merge_key)), None)
                if match is None:
                    base[key].append(copy.deepcopy(item))
                else:
                    _merge(match, item)
        else:
            base[key] = copy.deepcopy(value)


def _pod_specs(resource: dict) -> list[dict]:
    template = resource.get("spec", {}).get("template", {}).get("spec")
    return [template] if template else []


def _set_image(resources: list[dict], image: dict) -> None:
    for resource in resources:
        for pod in _pod_specs(resource):
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                name = container["image"].split("@")[0].rsplit(":", 1)[0] if ":" in container["image"].split("/")[-1] \
                    else container["image"].split("@")[0]
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image['newTag']}" if "newTag" in image \
                        else image.get("newName", name)


def _rename_config_maps(pod: dict, renames: dict[str, str]) -> None:
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                ref = source["configMapRef"]
                ref["name"] = renames.get(ref["name"], ref["name"])
        for variable in container.get("env", []):
            ref = variable.get("valueFrom", {}).get("configMapKeyRef")
            if ref:
                ref["name"] = renames.get(ref["name"], ref["name"])
    for volume in pod.get("volumes", []):
        if "configMap" in volume:
            volume["configMap"]["name"] = renames.get(volume["configMap"]["name"], volume["configMap"]["name"])


def config_map_hash(config_map: dict) -> str:
    """Kustomize's name suffix for a generated ConfigMap (sigs.k8s.io/kustomize/api/hasher): the sha256
    of {"data", "kind", "name"} as Go's encoding/json writes it (sorted keys, no spaces), its first 10
    hex digits with 0, 1, 3, a, e mapped to g, h, k, m, t. The name is always "": kustomize looks it
    up as one field called "metadata/name", which no ConfigMap has (checked against kubectl kustomize
    by tests/test_kubernetes.py)."""
    encoded = json.dumps({"data": config_map.get("data", {}), "kind": "ConfigMap", "name": ""},
                         sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))
