#!/usr/bin/env python3
"""Offline validation of Berth's Kubernetes manifests.

Run by tests/manifests/validate.sh, which renders deploy/kubernetes
(kustomize) and deploy/helm/berth (helm template, several value sets) and
passes the rendered files here.

Every YAML document is checked
  1. against the Kubernetes OpenAPI schemas bundled with kubernetes-validate
     (strict: unknown fields are errors), for each --k8s-version; objects of
     a custom resource (VolumeSnapshotClass) against the openAPIV3Schema of
     its CRD (--crd, the CRDs of the external-snapshotter release deploy/
     uses), also strictly;
  2. by Berth-specific rules: berth flags, CSI sockets shared between berth
     and its sidecars, kubelet registration paths, mount propagation, ports,
     probes, RBAC that grants what each sidecar needs, CSIDriver fields,
     StorageClass and VolumeSnapshotClass parameters, a csi-resizer for
     the driver of every StorageClass that allows expansion, a
     csi-snapshotter for every driver that has snapshot classes (and none
     for a driver whose kinds have no snapshots: it would exit), sidecar image tags pinned to
     the versions the test cluster builds (--pin), and, in examples,
     PVC/Pod wiring.
A document passes when all of that holds. Cross-document checks (Helm and
kustomize produce the same workloads, the berth-args fixture is current)
count as one item each.

The last line printed is "N passed, M failed"; the exit code is 0 only when
M is 0.
"""
import argparse
import copy
import json
import os
import posixpath
import re
import sys

import yaml

try:
    import kubernetes_validate
except ImportError:  # pragma: no cover
    kubernetes_validate = None

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import extract_berth_args  # noqa: E402

# ---------------------------------------------------------------------------
# What berth accepts (src/config.rs); tests/manifest_flags.rs
# the_validators_flag_list_is_berths fails when this differs from the CLI.
BERTH_FLAGS = {
    "endpoint", "node-id", "driver-name", "mode", "kinds", "data-dir",
    "state-dir", "local-root", "block-root", "disk-pool", "disk-wipe",
    "max-volumes-per-node", "socket-group", "log-format", "log-level",
    "metrics-address", "shutdown-timeout", "nfs-timeout",
    "nfs-allowed-shares", "allow-missing-storage", "busy-poll-us",
    "local-spare-dirs", "preface-timeout", "keepalive-interval",
    "keepalive-timeout", "write-stall-timeout", "request-arrival-timeout",
}
BERTH_MODES = {"controller", "node", "all"}
BERTH_KINDS = {"local", "block", "nfs"}
LOG_FORMATS = {"text", "json"}

# StorageClass parameters per volume kind (besides csi.storage.k8s.io/*).
SC_PARAMS = {
    "local": {"kind", "capacityEnforcement"},
    "block": {"kind", "allocation", "pool", "fsType", "mkfsOptions"},
    "nfs": {"kind", "server", "share", "subDir", "mountPermissions", "onDelete"},
}
SC_ALLOCATIONS = {"thin", "thick"}
SC_POOLS = {"disk"}
SC_ON_DELETE = {"delete", "retain", "archive"}
SC_FSTYPES = {"ext4", "xfs"}
SC_ENFORCEMENT = {"required", "bestEffort"}
SUBDIR_VARS = {"pvc.metadata.namespace", "pvc.metadata.name", "pv.metadata.name"}
# CSI keys the external-provisioner understands and Berth may meet.
CSI_PARAM_KEYS = {"csi.storage.k8s.io/fstype"}

# Kinds whose volumes have snapshots, restores and clones (VolumeKind::
# snapshots() in src/kinds/): a driver serving one advertises
# CREATE_DELETE_SNAPSHOT; csi-snapshotter exits at start against a driver
# that does not.
SNAPSHOT_KINDS = {"local", "block", "nfs"}
SNAPSHOT_DELETION_POLICIES = {"Delete", "Retain"}

# Driver names -> kinds when no berth container is in the same render
# (examples/).
DEFAULT_DRIVER_KINDS = {
    "local.berth.csi.io": {"local", "block"},
    "nfs.berth.csi.io": {"nfs"},
}

SIDECARS = {
    "csi-provisioner": "provisioner",
    "csi-attacher": "attacher",
    "csi-resizer": "resizer",
    "csi-snapshotter": "snapshotter",
    "csi-node-driver-registrar": "registrar",
    "livenessprobe": "livenessprobe",
}

# Minimal API permissions each sidecar needs: (apiGroup, resource, verb).
NEEDS = {
    "provisioner": [
        ("", "persistentvolumes", "create"), ("", "persistentvolumes", "delete"),
        ("", "persistentvolumes", "watch"), ("", "persistentvolumes", "patch"),
        ("", "persistentvolumeclaims", "watch"), ("", "persistentvolumeclaims", "update"),
        ("storage.k8s.io", "storageclasses", "list"), ("storage.k8s.io", "csinodes", "list"),
        ("", "nodes", "list"), ("", "events", "create"),
    ],
    "attacher": [
        ("", "persistentvolumes", "watch"), ("storage.k8s.io", "volumeattachments", "watch"),
        ("storage.k8s.io", "volumeattachments", "patch"),
        ("storage.k8s.io", "volumeattachments/status", "patch"),
        ("storage.k8s.io", "csinodes", "list"),
    ],
    "resizer": [
        ("", "persistentvolumes", "watch"), ("", "persistentvolumes", "patch"),
        ("", "persistentvolumeclaims", "watch"), ("", "persistentvolumeclaims/status", "patch"),
        ("", "pods", "watch"), ("", "events", "create"),
    ],
    # a provisioner of a driver with snapshots: restores read the
    # VolumeSnapshot and its content; a finalizer protects the snapshot
    # while a PVC is restored from it
    "provisioner-snapshots": [
        ("snapshot.storage.k8s.io", "volumesnapshots", "get"),
        ("snapshot.storage.k8s.io", "volumesnapshots", "update"),
        ("snapshot.storage.k8s.io", "volumesnapshotcontents", "get"),
    ],
    "snapshotter": [
        ("", "events", "create"),
        ("snapshot.storage.k8s.io", "volumesnapshotclasses", "watch"),
        ("snapshot.storage.k8s.io", "volumesnapshotcontents", "watch"),
        ("snapshot.storage.k8s.io", "volumesnapshotcontents", "update"),
        ("snapshot.storage.k8s.io", "volumesnapshotcontents", "patch"),
        ("snapshot.storage.k8s.io", "volumesnapshotcontents/status", "patch"),
    ],
    # csi-snapshotter with volume group snapshots on (its default)
    "group-snapshotter": [
        ("groupsnapshot.storage.k8s.io", "volumegroupsnapshotclasses", "watch"),
        ("groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents", "watch"),
        ("groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents", "patch"),
    ],
}
NEEDS_NAMESPACED = {
    "leader-election": [("coordination.k8s.io", "leases", "create"), ("coordination.k8s.io", "leases", "update")],
    "capacity": [("storage.k8s.io", "csistoragecapacities", "create"),
                 ("storage.k8s.io", "csistoragecapacities", "delete"), ("", "pods", "get")],
}

# --pin NAME=TAG: sidecar images the test cluster builds (tests/cluster/lib.sh)
PINS = {}

WORKLOAD_KINDS = ("Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job", "CronJob", "Pod")
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


# ---------------------------------------------------------------------------
def name_of(obj):
    return (obj.get("metadata") or {}).get("name", "?")


def ns_of(obj):
    return (obj.get("metadata") or {}).get("namespace")


def label(obj):
    return "%s/%s" % (obj.get("kind"), name_of(obj))


def parse_flags(args):
    """['--a=b', '--c', 'd', '--e'] -> ([('a','b'), ('c','d'), ('e', None)], errors)."""
    flags, errors, i = [], [], 0
    args = [str(a) for a in args]
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            errors.append("unexpected positional argument %r" % a)
            i += 1
            continue
        if "=" in a:
            k, v = a[2:].split("=", 1)
            flags.append((k, v))
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            flags.append((a[2:], args[i + 1]))
            i += 1
        else:
            flags.append((a[2:], None))
        i += 1
    return flags, errors


def flag_map(args):
    flags, _ = parse_flags(args)
    out = {}
    for k, v in flags:
        out[k] = v
    return out


def sidecar_type(container):
    name = extract_berth_args.image_name(str(container.get("image", "")))
    return SIDECARS.get(name)


def env_names(container):
    return {e.get("name") for e in container.get("env") or []}


def env_field(container, name):
    for e in container.get("env") or []:
        if e.get("name") == name:
            return ((e.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
    return None


def mount_for_path(container, path):
    """The volumeMount containing path (longest mountPath prefix) and the rest."""
    best = None
    for m in container.get("volumeMounts") or []:
        mp = m.get("mountPath", "").rstrip("/") or "/"
        if path == mp or path.startswith(mp + "/") or mp == "/":
            if best is None or len(mp) > len(best[0].get("mountPath", "").rstrip("/")):
                best = (m, posixpath.relpath(path, mp))
    return best


def socket_key(pod, container, path):
    """(volume name, path inside the volume) of a socket path, or None."""
    hit = mount_for_path(container, path)
    if not hit:
        return None
    m, rel = hit
    sub = m.get("subPath")
    if sub:
        rel = posixpath.normpath(posixpath.join(sub, rel))
    return (m.get("name"), rel)


def volume_by_name(pod, name):
    for v in pod.get("volumes") or []:
        if v.get("name") == name:
            return v
    return None


# ---------------------------------------------------------------------------
class Render:
    """All documents of one rendered file plus indexes."""

    def __init__(self, label, path, docs, kind):
        self.label = label
        self.path = path
        self.docs = docs
        self.kind = kind  # "deploy" or "example" or "fragment"
        self.by_kind = {}
        for d in docs:
            self.by_kind.setdefault(d.get("kind"), []).append(d)
        # driver name -> kinds, from the berth containers of this render
        self.driver_kinds = {}
        for d in docs:
            spec = extract_berth_args.pod_spec(d)
            for c in (spec or {}).get("containers") or []:
                if extract_berth_args.is_berth_container(c):
                    f = flag_map(c.get("args") or [])
                    drv = f.get("driver-name", "berth.csi.io")
                    kinds = set((f.get("kinds") or "local").split(","))
                    self.driver_kinds.setdefault(drv, set()).update(kinds)
        if not self.driver_kinds:
            self.driver_kinds = copy.deepcopy(DEFAULT_DRIVER_KINDS)

    def get(self, kind, name, namespace=None):
        for d in self.by_kind.get(kind, []):
            if name_of(d) == name and (namespace is None or ns_of(d) in (None, namespace)):
                return d
        return None

    def csidrivers(self):
        return {name_of(d): d for d in self.by_kind.get("CSIDriver", [])}


# ---------------------------------------------------------------------------
class CRDs:
    """openAPIV3Schemas of custom resources: (group, version, kind) -> schema."""

    def __init__(self):
        self.schemas = {}

    def load(self, path):
        for crd in load(path):
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd.get("spec") or {}
            kind = (spec.get("names") or {}).get("kind")
            for v in spec.get("versions") or []:
                if v.get("served"):
                    schema = ((v.get("schema") or {}).get("openAPIV3Schema"))
                    self.schemas[(spec.get("group"), v.get("name"), kind)] = schema

    def schema_of(self, doc):
        group, _, version = str(doc.get("apiVersion", "")).rpartition("/")
        return self.schemas.get((group, version, doc.get("kind")))

    def known_group(self, doc):
        group = str(doc.get("apiVersion", "")).rpartition("/")[0]
        return any(g == group for g, _, _ in self.schemas)


CRD_SCHEMAS = CRDs()


def unknown_fields(value, schema, path=""):
    """Fields of value that schema does not declare (the API server would
    prune them: a typo that silently does nothing)."""
    out = []
    if not isinstance(schema, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return out
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for k, v in value.items():
            if props is not None and k in props:
                out += unknown_fields(v, props[k], "%s.%s" % (path, k))
            elif isinstance(extra, dict):
                out += unknown_fields(v, extra, "%s.%s" % (path, k))
            elif props is not None and path != ".metadata":
                out.append("%s.%s" % (path, k))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            out += unknown_fields(v, schema["items"], "%s[%d]" % (path, i))
    return out


def check_crd_schema(doc):
    schema = CRD_SCHEMAS.schema_of(doc)
    if schema is None:
        return ["no CRD serves %s %s (pass its CRD with --crd)" % (doc.get("apiVersion"), doc.get("kind"))]
    import jsonschema  # a dependency of kubernetes-validate
    errs = ["CRD schema: %s (at %s)" % (e.message, "/".join(str(p) for p in e.path) or "/")
            for e in jsonschema.Draft4Validator(schema).iter_errors(doc)]
    errs += ["CRD schema: unknown field %s" % f for f in unknown_fields(doc, schema)]
    return errs


def check_schema(doc, versions):
    errs = []
    if CRD_SCHEMAS.known_group(doc):
        return check_crd_schema(doc)
    if kubernetes_validate is None:
        return ["kubernetes-validate is not installed"]
    for v in versions:
        try:
            kubernetes_validate.validate(doc, v, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(p) for p in e.path)
            errs.append("schema %s: %s%s" % (v, e.message, (" (at %s)" % path) if path else ""))
        except kubernetes_validate.SchemaNotFoundError as e:
            errs.append("schema %s: no schema for %s" % (v, e))
        except Exception as e:  # noqa: BLE001 - report anything else as failure
            errs.append("schema %s: %s: %s" % (v, type(e).__name__, e))
    return errs


def check_berth_container(render, pod, c, errs):
    args = c.get("args") or []
    flags, perrs = parse_flags(args)
    where = "container %s" % c.get("name")
    errs += ["%s: %s" % (where, e) for e in perrs]
    seen = set()
    for k, v in flags:
        if k not in BERTH_FLAGS:
            errs.append("%s: unknown berth flag --%s" % (where, k))
        if k in seen:
            errs.append("%s: --%s given twice" % (where, k))
        seen.add(k)
        if v is None:
            errs.append("%s: --%s has no value" % (where, k))
    f = dict(flags)
    mode = f.get("mode", "all")
    if mode not in BERTH_MODES:
        errs.append("%s: --mode=%s is not one of %s" % (where, mode, sorted(BERTH_MODES)))
    kinds = [k for k in (f.get("kinds") or "local").split(",")]
    if not kinds or any(k not in BERTH_KINDS for k in kinds):
        errs.append("%s: --kinds=%s must be a comma list of %s" % (where, f.get("kinds"), sorted(BERTH_KINDS)))
    if len(set(kinds)) != len(kinds):
        errs.append("%s: --kinds repeats a kind" % where)
    if "nfs" in kinds and len(kinds) > 1:
        errs.append("%s: nfs must be served under its own driver name, not with %s" % (where, kinds))
    if f.get("log-format", "text") not in LOG_FORMATS:
        errs.append("%s: --log-format must be text or json" % where)
    if "max-volumes-per-node" in f and not re.fullmatch(r"\d+", f["max-volumes-per-node"] or ""):
        errs.append("%s: --max-volumes-per-node must be a non-negative integer" % where)
    ep = f.get("endpoint")
    if not ep:
        errs.append("%s: --endpoint is not set (the default socket is not in a shared volume)" % where)
    elif not ep.startswith("unix://"):
        errs.append("%s: --endpoint must start with unix://" % where)
    else:
        sock = "/" + ep[len("unix://"):].lstrip("/")
        if len(sock) >= 108:
            errs.append("%s: socket path longer than 107 bytes" % where)
        if not socket_key(pod, c, sock):
            errs.append("%s: socket %s is not inside a mounted volume (sidecars cannot reach it)" % (where, sock))
    if mode in ("node", "all") and not (f.get("node-id") or {"NODE_ID", "KUBE_NODE_NAME"} & env_names(c)):
        errs.append("%s: node mode without --node-id, NODE_ID or KUBE_NODE_NAME" % where)
    if mode in ("node", "all") and not (c.get("securityContext") or {}).get("privileged"):
        errs.append("%s: a node plugin must be privileged (mounts)" % where)
    drv = f.get("driver-name", "berth.csi.io")
    if render.kind == "deploy" and drv not in render.csidrivers():
        errs.append("%s: no CSIDriver object named %s in this render" % (where, drv))
    # Directories berth writes must be on a volume (host path or emptyDir),
    # not the container's writable layer.
    data_dir = f.get("data-dir", "/var/lib/berth")
    for key in ("data-dir", "state-dir", "local-root", "block-root"):
        path = f.get(key) or (data_dir if key == "data-dir" else None)
        if path and not mount_for_path(c, path):
            errs.append("%s: --%s=%s is not inside a mounted volume" % (where, key, path))
    if "metrics-address" in f:
        port = (f["metrics-address"] or "").rsplit(":", 1)[-1]
        ports = {str(p.get("containerPort")) for p in c.get("ports") or []}
        if port not in ports:
            errs.append("%s: metrics port %s is not a containerPort of the container" % (where, port))
    if mode in ("node", "all"):
        # Bidirectional propagation of kubelet's directory, and of nothing
        # else: kubelet refuses Bidirectional and HostToContainer on a host
        # path whose mount is private (as / is on many hosts), and berth
        # mounts nothing under its data directory.
        kubelet = [m for m in c.get("volumeMounts") or [] if m.get("mountPropagation") == "Bidirectional"]
        if not kubelet:
            errs.append("%s: node plugin without a Bidirectional mount of the kubelet directory" % where)
        for m in c.get("volumeMounts") or []:
            if m.get("mountPropagation") not in (None, "None") and m not in kubelet[:1]:
                errs.append("%s: %s propagation on %s (only kubelet's directory needs it)"
                            % (where, m.get("mountPropagation"), m.get("mountPath")))


def berth_sockets(pod):
    """socket key -> (container, flags) of the berth containers of a pod."""
    out = {}
    for c in pod.get("containers") or []:
        if extract_berth_args.is_berth_container(c):
            f = flag_map(c.get("args") or [])
            ep = f.get("endpoint") or ""
            if ep.startswith("unix://"):
                key = socket_key(pod, c, "/" + ep[len("unix://"):].lstrip("/"))
                if key:
                    out[key] = (c, f)
    return out


def expand_env(container, arg):
    """$(NAME) in an argument replaced by the container's env value, as
    kubelet does (only literal values; others stay as written)."""
    values = {e.get("name"): e.get("value") for e in container.get("env") or [] if "value" in e}
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: values.get(m.group(1), m.group(0)), str(arg))


def check_sidecar(render, obj, pod, c, errs, needs):
    st = sidecar_type(c)
    f = flag_map([expand_env(c, a) for a in c.get("args") or []])
    where = "container %s" % c.get("name")
    addr = f.get("csi-address")
    socks = berth_sockets(pod)
    target = None
    if addr:
        key = socket_key(pod, c, addr.replace("unix://", "/", 1) if addr.startswith("unix://") else addr)
        if not key:
            errs.append("%s: --csi-address=%s is not inside a mounted volume" % (where, addr))
        elif key not in socks:
            errs.append("%s: --csi-address=%s is not the socket of any berth container in the pod" % (where, addr))
        else:
            target = socks[key][1]
    elif st != "registrar" or f.get("mode") != "kubelet-registration-probe":
        errs.append("%s: no --csi-address" % where)
    if target is None:
        return
    drv = target.get("driver-name", "berth.csi.io")
    mode = target.get("mode", "all")
    leader = "leader-election" in f and f.get("leader-election") not in ("false",)
    if leader:
        needs.append(("leader-election", c.get("name")))
        lns = f.get("leader-election-namespace") or ""
        for var in VAR_REF.findall(lns):
            if var not in env_names(c):
                errs.append("%s: $(%s) used but not in env" % (where, var))
    driver_kinds = render.driver_kinds.get(drv, set())
    if st == "provisioner":
        needs.append(("provisioner", c.get("name")))
        if driver_kinds & SNAPSHOT_KINDS:
            needs.append(("provisioner-snapshots", c.get("name")))
        if mode not in ("controller", "all"):
            errs.append("%s: provisioner talks to berth --mode=%s (no controller service)" % (where, mode))
        node_dep = "node-deployment" in f and f.get("node-deployment") not in ("false",)
        if node_dep:
            if obj.get("kind") != "DaemonSet":
                errs.append("%s: --node-deployment outside a DaemonSet" % where)
            if env_field(c, "NODE_NAME") != "spec.nodeName":
                errs.append("%s: --node-deployment needs env NODE_NAME from spec.nodeName" % where)
            if leader:
                errs.append("%s: --node-deployment must not use leader election" % where)
            if mode != "all":
                errs.append("%s: per-node provisioning needs berth --mode=all" % where)
        elif obj.get("kind") == "DaemonSet":
            errs.append("%s: central provisioner in a DaemonSet without --node-deployment" % where)
        elif not leader and obj.get("kind") != "Pod":
            errs.append("%s: central provisioner without --leader-election" % where)
        if "enable-capacity" in f and f.get("enable-capacity") != "false":
            needs.append(("capacity", c.get("name")))
            for var, path in (("NAMESPACE", "metadata.namespace"), ("POD_NAME", "metadata.name")):
                if env_field(c, var) != path:
                    errs.append("%s: --enable-capacity needs env %s from %s" % (where, var, path))
            level = f.get("capacity-ownerref-level", "1")
            want = {"DaemonSet": "1", "StatefulSet": "1", "Deployment": "2"}.get(obj.get("kind"))
            if want and level != want:
                errs.append("%s: --capacity-ownerref-level=%s, the %s is at level %s" % (where, level, obj.get("kind"), want))
            drv_obj = render.csidrivers().get(drv)
            if drv_obj is not None and not (drv_obj.get("spec") or {}).get("storageCapacity"):
                errs.append("%s: publishes capacity but CSIDriver %s has storageCapacity false" % (where, drv))
        else:
            drv_obj = render.csidrivers().get(drv)
            if drv_obj is not None and (drv_obj.get("spec") or {}).get("storageCapacity"):
                errs.append("%s: CSIDriver %s has storageCapacity true but no provisioner publishes capacity" % (where, drv))
    elif st == "snapshotter":
        needs.append(("snapshotter", c.get("name")))
        gates = f.get("feature-gates") or ""
        if "CSIVolumeGroupSnapshot=false" not in gates.split(","):
            needs.append(("group-snapshotter", c.get("name")))
        if mode not in ("controller", "all"):
            errs.append("%s: csi-snapshotter talks to berth --mode=%s (no controller service)" % (where, mode))
        if not driver_kinds & SNAPSHOT_KINDS:
            errs.append("%s: driver %s serves %s, which have no snapshots: csi-snapshotter exits at start "
                        "against a driver without CREATE_DELETE_SNAPSHOT" % (where, drv, sorted(driver_kinds)))
        node_dep = "node-deployment" in f and f.get("node-deployment") not in ("false",)
        if node_dep:
            if obj.get("kind") != "DaemonSet":
                errs.append("%s: --node-deployment outside a DaemonSet" % where)
            if env_field(c, "NODE_NAME") != "spec.nodeName":
                errs.append("%s: --node-deployment needs env NODE_NAME from spec.nodeName" % where)
            if leader:
                errs.append("%s: --node-deployment must not use leader election (csi-snapshotter exits)" % where)
        elif obj.get("kind") == "DaemonSet":
            errs.append("%s: central csi-snapshotter in a DaemonSet without --node-deployment" % where)
        elif not leader and obj.get("kind") != "Pod":
            errs.append("%s: central csi-snapshotter without --leader-election" % where)
        # distributed snapshots of node-local volumes go with distributed
        # provisioning: both in the same pod, both per node (or neither)
        provs = [o for o in pod.get("containers") or [] if sidecar_type(o) == "provisioner"
                 and (socket_key(pod, o, flag_map(o.get("args") or []).get("csi-address") or "") ==
                      socket_key(pod, c, addr))]
        if not provs:
            errs.append("%s: no external-provisioner of driver %s in the same pod" % (where, drv))
        elif any(("node-deployment" in flag_map(o.get("args") or [])) != node_dep for o in provs):
            errs.append("%s: --node-deployment differs from the provisioner's of driver %s" % (where, drv))
    elif st == "attacher":
        needs.append(("attacher", c.get("name")))
        if obj.get("kind") == "DaemonSet":
            errs.append("%s: external-attacher has no per-node mode" % where)
    elif st == "resizer":
        needs.append(("resizer", c.get("name")))
        if obj.get("kind") == "DaemonSet" and not leader:
            errs.append("%s: external-resizer in a DaemonSet must use leader election" % where)
    elif st == "registrar":
        if mode not in ("node", "all"):
            errs.append("%s: registers berth --mode=%s (no node service)" % (where, mode))
        reg = f.get("kubelet-registration-path")
        key = socket_key(pod, c, addr)
        vol = volume_by_name(pod, key[0]) if key else None
        host = ((vol or {}).get("hostPath") or {}).get("path")
        if not reg:
            errs.append("%s: no --kubelet-registration-path" % where)
        elif not host:
            errs.append("%s: the CSI socket volume is not a hostPath, kubelet cannot reach it" % where)
        else:
            want = posixpath.normpath(posixpath.join(host, key[1]))
            if reg != want:
                errs.append("%s: --kubelet-registration-path=%s but the socket is %s on the host" % (where, reg, want))
            if posixpath.basename(posixpath.dirname(want)) != drv:
                errs.append("%s: socket directory %s is not named after driver %s" % (where, posixpath.dirname(want), drv))
        regmount = [m for m in c.get("volumeMounts") or [] if m.get("mountPath") == "/registration"]
        if not regmount:
            errs.append("%s: /registration is not mounted" % where)
        else:
            rv = volume_by_name(pod, regmount[0].get("name"))
            rpath = ((rv or {}).get("hostPath") or {}).get("path", "")
            if not rpath.endswith("/plugins_registry"):
                errs.append("%s: /registration is not kubelet's plugins_registry directory" % where)
    elif st == "livenessprobe":
        ep = f.get("http-endpoint") or (":" + f.get("health-port", "9808"))
        port = ep.rsplit(":", 1)[-1]
        probes = []
        for other in pod.get("containers") or []:
            lp = ((other.get("livenessProbe") or {}).get("httpGet") or {})
            if not lp:
                continue
            p = lp.get("port")
            if isinstance(p, str) and not p.isdigit():
                p = next((q.get("containerPort") for q in other.get("ports") or [] if q.get("name") == p), None)
            probes.append(str(p))
        if port not in probes:
            errs.append("%s: no container's livenessProbe uses its port %s" % (where, port))


def check_pod(render, obj, pod, errs, needs):
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    containers = (pod.get("initContainers") or []) + (pod.get("containers") or [])
    names = [c.get("name") for c in containers]
    if len(set(names)) != len(names):
        errs.append("duplicate container names %s" % names)
    port_numbers, port_names = {}, {}
    for c in containers:
        where = "container %s" % c.get("name")
        paths = set()
        for m in c.get("volumeMounts") or []:
            if m.get("name") not in volumes:
                errs.append("%s: volumeMount %s has no volume" % (where, m.get("name")))
            if m.get("mountPath") in paths:
                errs.append("%s: mountPath %s used twice" % (where, m.get("mountPath")))
            paths.add(m.get("mountPath"))
            if m.get("mountPropagation") == "Bidirectional" and not (c.get("securityContext") or {}).get("privileged"):
                errs.append("%s: Bidirectional mount propagation needs a privileged container" % where)
        for d in c.get("volumeDevices") or []:
            if d.get("name") not in volumes:
                errs.append("%s: volumeDevice %s has no volume" % (where, d.get("name")))
        own_ports = {}
        for p in c.get("ports") or []:
            num = (p.get("containerPort"), p.get("protocol", "TCP"))
            if num in port_numbers:
                errs.append("%s: port %s also used by %s" % (where, num[0], port_numbers[num]))
            port_numbers[num] = c.get("name")
            if p.get("name"):
                if p["name"] in port_names:
                    errs.append("%s: port name %s also used by %s" % (where, p["name"], port_names[p["name"]]))
                port_names[p["name"]] = c.get("name")
                own_ports[p["name"]] = p.get("containerPort")
        for probe_key in ("livenessProbe", "readinessProbe", "startupProbe"):
            probe = c.get(probe_key) or {}
            for handler in ("httpGet", "tcpSocket", "grpc"):
                port = (probe.get(handler) or {}).get("port")
                if isinstance(port, str) and not port.isdigit() and port not in own_ports:
                    errs.append("%s: %s uses port %s, not a named port of the container" % (where, probe_key, port))
        defined = env_names(c)
        for a in (c.get("command") or []) + (c.get("args") or []):
            for var in VAR_REF.findall(str(a)):
                if var not in defined:
                    errs.append("%s: $(%s) in args but not in env" % (where, var))
        if extract_berth_args.is_berth_container(c):
            check_berth_container(render, pod, c, errs)
        elif sidecar_type(c):
            check_sidecar(render, obj, pod, c, errs, needs)
            img = str(c.get("image", ""))
            short = extract_berth_args.image_name(img)
            tag = img.split("@", 1)[0].rsplit("/", 1)[-1].partition(":")[2]
            if short in PINS and img.startswith("registry.k8s.io/sig-storage/") and tag != PINS[short]:
                errs.append("%s: %s, but the test cluster builds %s %s (tests/cluster/lib.sh)"
                            % (where, img, short, PINS[short]))
    for name, v in volumes.items():
        claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
        if claim and render.kind != "deploy":
            pvc = render.get("PersistentVolumeClaim", claim)
            if pvc is None:
                errs.append("volume %s: PVC %s is not defined in this file" % (name, claim))
            else:
                block = (pvc.get("spec") or {}).get("volumeMode") == "Block"
                as_dev = any(d.get("name") == name for c in containers for d in c.get("volumeDevices") or [])
                as_mnt = any(m.get("name") == name for c in containers for m in c.get("volumeMounts") or [])
                if block and (as_mnt or not as_dev):
                    errs.append("volume %s: PVC %s has volumeMode Block, use volumeDevices" % (name, claim))
                if not block and as_dev:
                    errs.append("volume %s: PVC %s is a file system, use volumeMounts" % (name, claim))
    sa = pod.get("serviceAccountName")
    if render.kind == "deploy":
        if not sa or not render.get("ServiceAccount", sa, ns_of(obj)):
            errs.append("serviceAccountName %r is not a ServiceAccount of this render" % sa)


def granted(render, sa, namespace):
    """(group, resource, verb, scope) tuples granted to a ServiceAccount."""
    out = set()

    def rules_of(kind, name, ns):
        role = render.get(kind, name, ns if kind == "Role" else None)
        return (role or {}).get("rules") or []

    for b in render.by_kind.get("ClusterRoleBinding", []) + render.by_kind.get("RoleBinding", []):
        subj = [s for s in b.get("subjects") or []
                if s.get("kind") == "ServiceAccount" and s.get("name") == sa and s.get("namespace", ns_of(b)) == namespace]
        if not subj:
            continue
        ref = b.get("roleRef") or {}
        scope = "cluster" if b.get("kind") == "ClusterRoleBinding" else ns_of(b)
        for r in rules_of(ref.get("kind"), ref.get("name"), ns_of(b)):
            for g in r.get("apiGroups") or []:
                for res in r.get("resources") or []:
                    for v in r.get("verbs") or []:
                        out.add((g, res, v, scope))
    return out


def allowed(grants, group, resource, verb, namespace):
    for g, r, v, scope in grants:
        if g in (group, "*") and r in (resource, "*") and v in (verb, "*") and scope in ("cluster", namespace):
            return True
    return False


def check_rbac_for_workload(render, obj, pod, needs, errs):
    sa = pod.get("serviceAccountName") or "default"
    ns = ns_of(obj)
    grants = granted(render, sa, ns)
    for what, cname in needs:
        for group, res, verb in NEEDS.get(what, []) + NEEDS_NAMESPACED.get(what, []):
            if not allowed(grants, group, res, verb, ns):
                errs.append("container %s (%s): ServiceAccount %s may not %s %s%s in %s" % (
                    cname, what, sa, verb, (group + "/") if group else "", res, ns))


def check_binding(render, b, errs):
    ref = b.get("roleRef") or {}
    if ref.get("kind") == "ClusterRole":
        if not render.get("ClusterRole", ref.get("name")):
            errs.append("roleRef ClusterRole %s is not in this render" % ref.get("name"))
    elif ref.get("kind") == "Role":
        if b.get("kind") != "RoleBinding":
            errs.append("a ClusterRoleBinding cannot refer to a Role")
        elif not render.get("Role", ref.get("name"), ns_of(b)):
            errs.append("roleRef Role %s is not in namespace %s of this render" % (ref.get("name"), ns_of(b)))
    if not b.get("subjects"):
        errs.append("no subjects")
    for s in b.get("subjects") or []:
        if s.get("kind") == "ServiceAccount":
            if not s.get("namespace"):
                errs.append("subject ServiceAccount %s has no namespace" % s.get("name"))
            elif not render.get("ServiceAccount", s.get("name"), s.get("namespace")):
                errs.append("subject ServiceAccount %s/%s is not in this render" % (s.get("namespace"), s.get("name")))


def check_csidriver(render, d, errs):
    spec = d.get("spec") or {}
    name = name_of(d)
    kinds = render.driver_kinds.get(name)
    if kinds is None:
        errs.append("no berth container serves driver %s" % name)
        kinds = set()
    if spec.get("attachRequired") is not False:
        errs.append("attachRequired must be false")
    if spec.get("podInfoOnMount") not in (False, None):
        errs.append("podInfoOnMount must be false")
    if spec.get("requiresRepublish") not in (False, None):
        errs.append("requiresRepublish must be false")
    if spec.get("volumeLifecycleModes") != ["Persistent"]:
        errs.append("volumeLifecycleModes must be [Persistent]")
    if "nfs" in kinds:
        if spec.get("storageCapacity") is not False:
            errs.append("NFS driver: storageCapacity must be false")
        if spec.get("fsGroupPolicy") not in ("None", "File"):
            errs.append("NFS driver: fsGroupPolicy must be None or File")
    elif kinds:
        if spec.get("storageCapacity") is not True:
            errs.append("node-local driver: storageCapacity must be true")
        if spec.get("fsGroupPolicy") != "File":
            errs.append("node-local driver: fsGroupPolicy must be File")
    # Every driver needs a node registration and a provisioner in the render.
    has_reg = has_prov = False
    for obj in render.docs:
        pod = extract_berth_args.pod_spec(obj)
        if not pod:
            continue
        socks = berth_sockets(pod)
        for c in pod.get("containers") or []:
            st = sidecar_type(c)
            if st not in ("registrar", "provisioner"):
                continue
            addr = flag_map(c.get("args") or []).get("csi-address") or ""
            key = socket_key(pod, c, addr)
            if key in socks and socks[key][1].get("driver-name", "berth.csi.io") == name:
                has_reg |= st == "registrar"
                has_prov |= st == "provisioner"
    if not has_reg:
        errs.append("no node-driver-registrar registers %s" % name)
    if not has_prov:
        errs.append("no external-provisioner serves %s" % name)


def serving_sidecars(render, driver, sidecar):
    """Containers of type sidecar (SIDECARS values) whose --csi-address is
    the socket of a berth container of driver, in the render's pods."""
    out = []
    for obj in render.docs:
        pod = extract_berth_args.pod_spec(obj)
        if not pod:
            continue
        socks = berth_sockets(pod)
        for c in pod.get("containers") or []:
            if sidecar_type(c) != sidecar:
                continue
            key = socket_key(pod, c, flag_map(c.get("args") or []).get("csi-address") or "")
            if key in socks and socks[key][1].get("driver-name", "berth.csi.io") == driver:
                out.append(c)
    return out


def check_storageclass(render, sc, errs):
    prov = sc.get("provisioner")
    params = sc.get("parameters") or {}
    drivers = render.driver_kinds
    if render.kind == "deploy" and prov not in render.csidrivers():
        errs.append("provisioner %s has no CSIDriver in this render" % prov)
    # A class that allows expansion needs an external-resizer of its
    # driver: without one, a grown PVC is accepted and then never expanded
    # (nothing answers it), where allowVolumeExpansion: false refuses the
    # edit with a message.
    if render.kind == "deploy" and sc.get("allowVolumeExpansion") and not serving_sidecars(render, prov, "resizer"):
        errs.append("allowVolumeExpansion is true but no csi-resizer serves driver %s: "
                    "a grown PVC would wait forever" % prov)
    if prov not in drivers:
        errs.append("provisioner %s is not a Berth driver %s" % (prov, sorted(drivers)))
        return
    kind = params.get("kind")
    if kind not in SC_PARAMS:
        errs.append("parameters.kind must be one of %s" % sorted(SC_PARAMS))
        return
    if kind not in drivers[prov]:
        errs.append("kind %s is not served by driver %s (serves %s)" % (kind, prov, sorted(drivers[prov])))
    for k, v in params.items():
        if k.startswith("csi.storage.k8s.io/"):
            if k not in CSI_PARAM_KEYS:
                errs.append("parameter %s is not used by Berth" % k)
        elif k not in SC_PARAMS[kind]:
            errs.append("parameter %s is not a %s parameter (%s)" % (k, kind, sorted(SC_PARAMS[kind])))
        if not isinstance(v, str):
            errs.append("parameter %s must be a string" % k)
    fstype = params.get("csi.storage.k8s.io/fstype")
    if fstype is not None:
        if kind != "block":
            errs.append("csi.storage.k8s.io/fstype only applies to kind block")
        elif fstype not in SC_FSTYPES:
            errs.append("fstype %s is not one of %s" % (fstype, sorted(SC_FSTYPES)))
    binding = sc.get("volumeBindingMode", "Immediate")
    if kind in ("local", "block"):
        if binding != "WaitForFirstConsumer":
            errs.append("node-local kind %s needs volumeBindingMode WaitForFirstConsumer" % kind)
        if sc.get("mountOptions"):
            errs.append("mountOptions are not used by kind %s" % kind)
    if kind == "local" and params.get("capacityEnforcement", "bestEffort") not in SC_ENFORCEMENT:
        errs.append("capacityEnforcement must be one of %s" % sorted(SC_ENFORCEMENT))
    if kind == "block":
        if params.get("allocation", "thin") not in SC_ALLOCATIONS:
            errs.append("allocation must be one of %s" % sorted(SC_ALLOCATIONS))
        if "pool" in params and params["pool"] not in SC_POOLS:
            errs.append("pool must be one of %s" % sorted(SC_POOLS))
        if params.get("pool") == "disk" and "allocation" in params:
            errs.append("allocation does not apply to whole disks (pool: disk)")
        if "fsType" in params and params["fsType"] not in SC_FSTYPES:
            errs.append("fsType must be one of %s" % sorted(SC_FSTYPES))
    if kind == "nfs":
        for req in ("server", "share"):
            if not params.get(req):
                errs.append("NFS StorageClass needs parameter %s" % req)
        if params.get("share") and not str(params["share"]).startswith("/"):
            errs.append("share must be an absolute export path")
        for var in re.findall(r"\$\{([^}]*)\}", str(params.get("subDir", ""))):
            if var not in SUBDIR_VARS:
                errs.append("subDir uses ${%s}; known: %s" % (var, sorted(SUBDIR_VARS)))
        if str(params.get("subDir", "")).startswith("/") or ".." in str(params.get("subDir", "")).split("/"):
            errs.append("subDir must be relative and stay inside the share")
        if "onDelete" in params and params["onDelete"] not in SC_ON_DELETE:
            errs.append("onDelete must be one of %s" % sorted(SC_ON_DELETE))
        if "mountPermissions" in params and not re.fullmatch(r"0?[0-7]{3,4}", str(params["mountPermissions"])):
            errs.append("mountPermissions must be an octal mode such as 0777")


def check_snapshotclass(render, vsc, errs):
    drv = vsc.get("driver")
    if render.kind == "deploy" and drv not in render.csidrivers():
        errs.append("driver %s has no CSIDriver in this render" % drv)
    kinds = render.driver_kinds.get(drv)
    if kinds is None:
        errs.append("driver %s is not a Berth driver %s" % (drv, sorted(render.driver_kinds)))
        return
    if not kinds & SNAPSHOT_KINDS:
        errs.append("driver %s serves %s, which have no snapshots" % (drv, sorted(kinds)))
    for k in (vsc.get("parameters") or {}):
        if not str(k).startswith("csi.storage.k8s.io/"):
            errs.append("parameter %s: Berth's snapshot classes take no parameters" % k)
    if vsc.get("deletionPolicy") not in SNAPSHOT_DELETION_POLICIES:
        errs.append("deletionPolicy must be one of %s" % sorted(SNAPSHOT_DELETION_POLICIES))
    if render.kind != "deploy":
        return
    # someone must make the snapshots: a csi-snapshotter on this driver's socket
    served = False
    for obj in render.docs:
        pod = extract_berth_args.pod_spec(obj)
        if not pod:
            continue
        socks = berth_sockets(pod)
        for c in pod.get("containers") or []:
            if sidecar_type(c) != "snapshotter":
                continue
            key = socket_key(pod, c, flag_map(c.get("args") or []).get("csi-address") or "")
            if key in socks and socks[key][1].get("driver-name", "berth.csi.io") == drv:
                served = True
    if not served:
        errs.append("no csi-snapshotter serves driver %s: its snapshots would never be made" % drv)
    defaults = [d for d in render.by_kind.get("VolumeSnapshotClass", []) if d.get("driver") == drv and
                ((d.get("metadata") or {}).get("annotations") or {}).get(
                    "snapshot.storage.kubernetes.io/is-default-class") == "true"]
    if len(defaults) > 1:
        errs.append("%d default VolumeSnapshotClasses for driver %s (the snapshot-controller refuses to pick)"
                    % (len(defaults), drv))


def check_pvc(render, pvc, errs):
    spec = pvc.get("spec") or {}
    scn = spec.get("storageClassName")
    sc = render.get("StorageClass", scn) if scn else None
    if sc is None:
        errs.append("storageClassName %s is not defined in this file" % scn)
        return
    kind = (sc.get("parameters") or {}).get("kind")
    modes = set(spec.get("accessModes") or [])
    if kind in ("local", "block") and modes - {"ReadWriteOnce", "ReadWriteOncePod"}:
        errs.append("node-local kind %s supports ReadWriteOnce/ReadWriteOncePod only, not %s" % (kind, sorted(modes)))
    if spec.get("volumeMode") == "Block" and kind != "block":
        errs.append("volumeMode Block needs a kind block StorageClass")


def check_document(render, doc, versions):
    errs = check_schema(doc, versions)
    kind = doc.get("kind")
    try:
        if kind in WORKLOAD_KINDS:
            pod = extract_berth_args.pod_spec(doc) or {}
            needs = []
            check_pod(render, doc, pod, errs, needs)
            if render.kind == "deploy":
                check_rbac_for_workload(render, doc, pod, needs, errs)
        elif kind in ("RoleBinding", "ClusterRoleBinding"):
            check_binding(render, doc, errs)
        elif kind == "CSIDriver":
            check_csidriver(render, doc, errs)
        elif kind == "StorageClass":
            check_storageclass(render, doc, errs)
        elif kind == "VolumeSnapshotClass":
            check_snapshotclass(render, doc, errs)
        elif kind == "PersistentVolumeClaim" and render.kind == "example":
            check_pvc(render, doc, errs)
        if render.kind == "deploy" and kind not in ("Namespace", "CSIDriver", "StorageClass", "ClusterRole",
                                                   "ClusterRoleBinding", "VolumeSnapshotClass") and not ns_of(doc):
            errs.append("namespaced object without metadata.namespace")
    except Exception as e:  # noqa: BLE001 - a crashing check is a failed check
        errs.append("checker error: %s: %s" % (type(e).__name__, e))
    return errs


# ---------------------------------------------------------------------------
def workload_shape(render):
    """Comparable form of the DaemonSet/StatefulSet pod templates."""
    out = {}
    for obj in render.docs:
        if obj.get("kind") not in ("DaemonSet", "StatefulSet"):
            continue
        pod = extract_berth_args.pod_spec(obj) or {}
        cs = {}
        for c in pod.get("containers") or []:
            img = str(c.get("image"))
            short = extract_berth_args.image_name(img)
            cs[c.get("name")] = {
                # The berth tag differs on purpose (kustomize images: vs chart appVersion).
                "image": short if short == "berth" else img,
                "args": c.get("args"),
                "env": c.get("env"),
                "ports": c.get("ports"),
                "volumeMounts": c.get("volumeMounts"),
                "securityContext": c.get("securityContext"),
                "livenessProbe": c.get("livenessProbe"),
            }
        vols = {v.get("name"): v for v in pod.get("volumes") or []}
        keep = {k: pod.get(k) for k in ("hostNetwork", "dnsPolicy", "serviceAccountName", "priorityClassName",
                                         "nodeSelector", "tolerations")}
        out["%s/%s" % (obj.get("kind"), name_of(obj))] = {"containers": cs, "volumes": vols, "pod": keep}
    return out


def object_keys(render):
    return {(d.get("kind"), name_of(d)) for d in render.docs if d.get("kind") != "Namespace"}


def diff_dicts(a, b, path=""):
    """First few differences between two JSON-like values."""
    diffs = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a:
                diffs.append("%s/%s only in helm" % (path, k))
            elif k not in b:
                diffs.append("%s/%s only in kustomize" % (path, k))
            else:
                diffs += diff_dicts(a[k], b[k], "%s/%s" % (path, k))
    elif a != b:
        diffs.append("%s: kustomize %s != helm %s" % (path, json.dumps(a), json.dumps(b)))
    return diffs


# ---------------------------------------------------------------------------
def load(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k8s-version", action="append", default=[], help="schema version (repeatable)")
    ap.add_argument("--crd", action="append", default=[], help="a file of CustomResourceDefinitions (repeatable)")
    ap.add_argument("--pin", action="append", default=[], metavar="IMAGE=TAG",
                    help="the tag every registry.k8s.io/sig-storage/IMAGE must have (repeatable)")
    ap.add_argument("--deploy", action="append", default=[], metavar="LABEL=FILE",
                    help="a complete rendered installation")
    ap.add_argument("--fragment", action="append", default=[], metavar="LABEL=FILE:CONTEXT_LABEL",
                    help="objects applied on top of a deploy render (e.g. the NFS StorageClass)")
    ap.add_argument("--example", action="append", default=[], help="an examples/*.yaml file")
    ap.add_argument("--compare", action="append", default=[], metavar="KUSTOMIZE_LABEL=HELM_LABEL",
                    help="renders that must contain the same workloads")
    ap.add_argument("--args-fixture", help="JSON file with the berth args of all deploy renders")
    ap.add_argument("--update-fixture", action="store_true")
    ap.add_argument("--extra-results", help="file with 'PASS name' / 'FAIL name: reason' lines from the shell")
    ap.add_argument("-v", "--verbose", action="store_true")
    opts = ap.parse_args()
    versions = opts.k8s_version or ["1.33.0"]
    passed = failed = 0
    for path in opts.crd:
        CRD_SCHEMAS.load(path)
    for pin in opts.pin:
        name, _, tag = pin.partition("=")
        PINS[name] = tag

    def report(ok, what, errs=()):
        nonlocal passed, failed
        if ok:
            passed += 1
            if opts.verbose:
                print("PASS %s" % what)
        else:
            failed += 1
            print("FAIL %s" % what)
            for e in errs:
                print("     - %s" % e)

    if opts.extra_results and os.path.exists(opts.extra_results):
        with open(opts.extra_results, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if line.startswith("PASS "):
                    report(True, line[5:])
                elif line.startswith("FAIL "):
                    what, _, why = line[5:].partition(": ")
                    report(False, what, [why] if why else [])

    renders = {}
    for spec in opts.deploy:
        lbl, path = spec.split("=", 1)
        try:
            renders[lbl] = Render(lbl, path, load(path), "deploy")
        except Exception as e:  # noqa: BLE001
            report(False, "%s: load %s" % (lbl, path), [str(e)])
    for lbl, r in renders.items():
        n0 = failed
        for doc in r.docs:
            errs = check_document(r, doc, versions)
            report(not errs, "%s: %s" % (lbl, label(doc)), errs)
        print("%-22s %3d objects%s" % (lbl, len(r.docs), "" if failed == n0 else "  (%d failed)" % (failed - n0)))

    combined = {}
    for spec in opts.fragment:
        lbl, rest = spec.split("=", 1)
        path, ctx = rest.rsplit(":", 1)
        try:
            docs = load(path)
        except Exception as e:  # noqa: BLE001
            report(False, "%s: load %s" % (lbl, path), [str(e)])
            continue
        base = renders.get(ctx)
        if base is None:
            report(False, "%s: context render %s missing" % (lbl, ctx))
            continue
        r = Render(lbl, path, base.docs + docs, "deploy")
        combined["%s+%s" % (ctx, lbl)] = r
        for doc in docs:
            errs = check_document(r, doc, versions)
            report(not errs, "%s: %s" % (lbl, label(doc)), errs)
        print("%-22s %3d objects" % (lbl, len(docs)))

    for path in opts.example:
        lbl = os.path.relpath(path)
        try:
            docs = load(path)
        except Exception as e:  # noqa: BLE001
            report(False, "%s: load" % lbl, [str(e)])
            continue
        r = Render(lbl, path, docs, "example")
        n0 = failed
        for doc in docs:
            errs = check_document(r, doc, versions)
            report(not errs, "%s: %s" % (lbl, label(doc)), errs)
        print("%-22s %3d objects%s" % (lbl, len(docs), "" if failed == n0 else "  (%d failed)" % (failed - n0)))

    for spec in opts.compare:
        a, b = spec.split("=", 1)
        known = dict(renders, **combined)
        if a not in known or b not in known:
            report(False, "compare %s with %s" % (a, b), ["render missing"])
            continue
        errs = []
        ka, kb = object_keys(known[a]), object_keys(known[b])
        for k in sorted(ka - kb):
            errs.append("%s/%s only in %s" % (k[0], k[1], a))
        for k in sorted(kb - ka):
            errs.append("%s/%s only in %s" % (k[0], k[1], b))
        errs += diff_dicts(workload_shape(known[a]), workload_shape(known[b]))
        # Everything but metadata of the other objects (RBAC rules, CSIDriver
        # and StorageClass specs) must match as well.
        for key in sorted(ka & kb):
            if key[0] in ("DaemonSet", "StatefulSet"):
                continue
            da, db = (next(d for d in known[x].docs if (d.get("kind"), name_of(d)) == key) for x in (a, b))
            strip = lambda d: {k: v for k, v in d.items() if k != "metadata"}  # noqa: E731
            errs += diff_dicts(strip(da), strip(db), "%s/%s" % key)
        report(not errs, "compare %s with %s: same objects and pod templates" % (a, b), errs[:20])

    if opts.args_fixture:
        items = []
        for lbl, r in renders.items():
            for obj_label, c in extract_berth_args.berth_containers(r.docs):
                items.append(c.get("args") or [])
        uniq, seen = [], set()
        for args in items:
            key = json.dumps(args)
            if key not in seen:
                seen.add(key)
                uniq.append(args)
        text = extract_berth_args.dumps(uniq) + "\n"
        if opts.update_fixture:
            with open(opts.args_fixture, "w", encoding="utf-8") as f:
                f.write(text)
            report(True, "berth args fixture %s written (%d argument lists)" % (opts.args_fixture, len(uniq)))
        else:
            try:
                with open(opts.args_fixture, encoding="utf-8") as f:
                    current = f.read()
            except OSError as e:
                current = None
                report(False, "berth args fixture %s" % opts.args_fixture,
                       ["%s; run: BERTH_UPDATE_FIXTURES=1 bash tests/manifests/validate.sh" % e])
            if current is not None:
                report(current == text, "berth args fixture %s is current (%d argument lists)" % (opts.args_fixture, len(uniq)),
                       ["it differs from the renders; run: BERTH_UPDATE_FIXTURES=1 bash tests/manifests/validate.sh"])

    print("%d passed, %d failed" % (passed, failed))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
