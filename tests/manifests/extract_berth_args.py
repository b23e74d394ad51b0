#!/usr/bin/env python3
"""Print the args of every berth container in rendered Kubernetes YAML.

Usage:
    python3 tests/manifests/extract_berth_args.py RENDERED.yaml [MORE.yaml ...]
    kubectl kustomize deploy/kubernetes | python3 tests/manifests/extract_berth_args.py -

Output: one JSON list of argument lists (argv without the program name),
one container per line, in document order, e.g.

    [
    ["--mode=all", "--kinds=local,block", ...],
    ["--mode=node", "--kinds=nfs", ...]
    ]

A berth container is one whose image name (last path component, without
tag or digest) is "berth". Pod templates of Deployments, DaemonSets,
StatefulSets, ReplicaSets, Jobs, CronJobs and bare Pods are searched, init
containers included. Arguments are printed verbatim: Kubernetes variable
references such as $(KUBE_NODE_NAME) are not expanded.

Options:
    --unique    drop argument lists already printed (keeps first occurrence)
    --names     print objects {"object": "DaemonSet/berth-node",
                "container": "berth-local", "args": [...]} instead of bare lists

Needs PyYAML; when it is missing and tests/manifests/validate.sh has set up
target/tools/venv, the script re-runs itself with that interpreter.
"""
import json
import os
import sys

try:
    import yaml
except ImportError:  # pragma: no cover - depends on the machine
    here = os.path.dirname(os.path.abspath(__file__))
    venv_python = os.path.join(here, "..", "..", "target", "tools", "venv", "bin", "python")
    venv_python = os.path.normpath(venv_python)
    if os.path.exists(venv_python) and os.path.realpath(sys.executable) != os.path.realpath(venv_python):
        os.execv(venv_python, [venv_python] + sys.argv)
    sys.exit("extract_berth_args.py needs PyYAML (pip install PyYAML, or run tests/manifests/validate.sh once)")


def image_name(image):
    """'registry:5000/org/berth:0.1@sha256:..' -> 'berth'."""
    ref = image.split("@", 1)[0]
    last = ref.rsplit("/", 1)[-1]
    return last.split(":", 1)[0]


def is_berth_container(container):
    return image_name(str(container.get("image", ""))) == "berth"


def pod_spec(obj):
    """The pod spec of a workload object, or None."""
    if not isinstance(obj, dict):
        return None
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        return (((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get("spec")
    if kind in ("Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job", "ReplicationController"):
        return (spec.get("template") or {}).get("spec")
    return None


def berth_containers(docs):
    """Yield (object label, container) for every berth container."""
    for obj in docs:
        spec = pod_spec(obj)
        if not spec:
            continue
        label = "%s/%s" % (obj.get("kind"), (obj.get("metadata") or {}).get("name"))
        for key in ("initContainers", "containers"):
            for c in spec.get(key) or []:
                if is_berth_container(c):
                    yield label, c


def load_docs(paths):
    docs = []
    for path in paths:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        for doc in yaml.safe_load_all(text):
            if doc is None:
                continue
            if doc.get("kind") == "List":
                docs.extend(doc.get("items") or [])
            else:
                docs.append(doc)
    return docs


def extract(paths, unique=False, names=False):
    out, seen = [], set()
    for label, c in berth_containers(load_docs(paths)):
        args = [str(a) for a in (c.get("command") or [])[1:]] + [str(a) for a in c.get("args") or []]
        key = json.dumps(args)
        if unique and key in seen:
            continue
        seen.add(key)
        out.append({"object": label, "container": c.get("name"), "args": args} if names else args)
    return out


def dumps(items):
    """A JSON list with one item per line."""
    if not items:
        return "[]"
    return "[\n" + ",\n".join(json.dumps(i) for i in items) + "\n]"


def main(argv):
    opts = [a for a in argv if a in ("--unique", "--names")]
    paths = [a for a in argv if a not in opts]
    if not paths or any(p in ("-h", "--help") for p in paths):
        print(__doc__.strip())
        return 0 if paths else 2
    print(dumps(extract(paths, unique="--unique" in opts, names="--names" in opts)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
