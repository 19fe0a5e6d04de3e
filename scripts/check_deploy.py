#!/usr/bin/env python3
"""Consistency checks of the built Kubernetes manifests that the API schemas cannot make.

Usage: check_deploy.py README BUILT.yaml...   (the output of `kubectl kustomize` of each
kustomization; run by scripts/validate-deploy.sh with the venv's Python, which has PyYAML).

The schemas accept any string where the manifests name each other: etcd's DNS names, the host
paths shared by the agent and the application pods, Secrets created by hand. These checks
tie them together:
  - every --etcd=URL names a member of a StatefulSet in the output, through its headless
    Service, namespace and client port;
  - every agent --mount=VOLUME=DIR lies under a Bidirectional mount whose host path is the
    same as its path inside the container, and the volume-creating Job creates VOLUME;
  - every other pod's hostPath under a mounted volume names the DIR of a --mount and is
    mounted with HostToContainer (it must regain the volume when the agent mounts it again);
  - hostPath types are ones Kubernetes knows (the schemas do not list them);
  - every Secret a pod needs that the output does not define is named in deploy/README.md,
    which must tell the reader to create it.
Prints one line per problem and exits 1 if there is any.
"""
import re
import sys

import yaml

HOSTPATH_TYPES = {"", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket",
                  "CharDevice", "BlockDevice"}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "ReplicaSet", "Pod"}


def pod_spec(obj):
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]["spec"]
    return spec["template"]["spec"]


def containers(spec):
    return (spec.get("initContainers") or []) + (spec.get("containers") or [])


def words(container):
    return [str(w) for w in (container.get("command") or []) + (container.get("args") or [])]


def flag_values(container, flag):
    """Values of --flag=VALUE and --flag VALUE among a container's command and args."""
    ws, out = words(container), []
    for i, w in enumerate(ws):
        if w.startswith(flag + "="):
            out.append(w[len(flag) + 1:])
        elif w == flag and i + 1 < len(ws):
            out.append(ws[i + 1])
    return out


def main():
    readme_path, files = sys.argv[1], sys.argv[2:]
    readme = open(readme_path, encoding="utf-8").read()
    objs = [d for f in files for d in yaml.safe_load_all(open(f, encoding="utf-8")) if d]
    problems = []

    def ns(o):
        return (o.get("metadata") or {}).get("namespace", "default")

    def name(o):
        return "%s %s/%s" % (o["kind"], ns(o), o["metadata"]["name"])

    workloads = [o for o in objs if o.get("kind") in WORKLOADS]
    services = {(ns(o), o["metadata"]["name"]): o for o in objs if o.get("kind") == "Service"}
    statefulsets = [o for o in objs if o.get("kind") == "StatefulSet"]
    secrets = {(ns(o), o["metadata"]["name"]) for o in objs if o.get("kind") == "Secret"}

    # etcd member URLs: <sts>-<i>.<service>.<namespace>.svc[.cluster.local]:<port>
    etcd_urls = 0
    for w in workloads:
        for c in containers(pod_spec(w)):
            for url in flag_values(c, "--etcd"):
                etcd_urls += 1
                m = re.fullmatch(r"https?://([a-z0-9-]+)-(\d+)\.([a-z0-9-]+)\.([a-z0-9-]+)"
                                 r"\.svc(?:\.cluster\.local)?:(\d+)", url)
                if not m:
                    problems.append(f"{name(w)}: --etcd={url} is not a StatefulSet member's DNS name")
                    continue
                sts, idx, svc, nspace, port = m.group(1), int(m.group(2)), m.group(3), m.group(4), int(m.group(5))
                match = [s for s in statefulsets if s["metadata"]["name"] == sts and ns(s) == nspace]
                if not match:
                    problems.append(f"{name(w)}: --etcd={url}: no StatefulSet {nspace}/{sts}")
                    continue
                s = match[0]["spec"]
                if idx >= s.get("replicas", 1):
                    problems.append(f"{name(w)}: --etcd={url}: {sts} has only {s.get('replicas', 1)} replicas")
                if s.get("serviceName") != svc:
                    problems.append(f"{name(w)}: --etcd={url}: {sts}'s serviceName is {s.get('serviceName')}")
                service = services.get((nspace, svc))
                if not service or service["spec"].get("clusterIP") != "None":
                    problems.append(f"{name(w)}: --etcd={url}: no headless Service {nspace}/{svc}")
                elif port not in [p.get("port") for p in service["spec"].get("ports", [])]:
                    problems.append(f"{name(w)}: --etcd={url}: Service {nspace}/{svc} has no port {port}")

    # Volumes mounted by agents, and where.
    mounted = {}  # host dir -> volume
    created = set()
    for w in workloads:
        spec = pod_spec(w)
        host_paths = {v["name"]: v["hostPath"] for v in spec.get("volumes") or [] if "hostPath" in v}
        for v in host_paths.values():
            if v.get("type", "") not in HOSTPATH_TYPES:
                problems.append(f"{name(w)}: hostPath {v['path']}: unknown type {v.get('type')!r}")
        for c in containers(spec):
            text = " ".join(words(c))
            created.update(re.findall(r"twinfs volume create ([A-Za-z0-9_.-]+)", text))
            for spec_ in flag_values(c, "--mount"):
                volume, _, d = spec_.partition("=")
                # The innermost hostPath mount that holds DIR.
                holders = [vm for vm in c.get("volumeMounts") or [] if vm["name"] in host_paths
                           and (d + "/").startswith(vm["mountPath"].rstrip("/") + "/")]
                vm = max(holders, key=lambda vm: len(vm["mountPath"]), default=None)
                if not vm or vm.get("mountPropagation") != "Bidirectional" \
                        or host_paths[vm["name"]]["path"].rstrip("/") != vm["mountPath"].rstrip("/"):
                    problems.append(f"{name(w)}: --mount={spec_}: {d} is not under a Bidirectional "
                                    "hostPath mount with the same path inside and out")
                mounted[d] = volume
    for d, volume in mounted.items():
        if volume not in created:
            problems.append(f"no Job runs `twinfs volume create {volume}` (mounted at {d})")

    # Pods that use a mounted volume through a hostPath.
    users = 0
    for w in workloads:
        spec = pod_spec(w)
        host_paths = {v["name"]: v["hostPath"]["path"].rstrip("/")
                      for v in spec.get("volumes") or [] if "hostPath" in v}
        agent = any(flag_values(c, "--mount") for c in containers(spec))
        for c in containers(spec):
            for vm in c.get("volumeMounts") or []:
                p = host_paths.get(vm["name"])
                if agent or p is None or not any(p == d or d.startswith(p + "/") or p.startswith(d + "/")
                                                  for d in mounted):
                    continue
                users += 1
                if p not in mounted:
                    problems.append(f"{name(w)}: hostPath {p} is not the directory of a mounted volume")
                if vm.get("mountPropagation") != "HostToContainer":
                    problems.append(f"{name(w)}: container {c['name']} mounts {p} without "
                                    "mountPropagation: HostToContainer")

    # Secrets the output does not define must be created by hand, as the README says.
    for w in workloads:
        spec = pod_spec(w)
        refs = [(v["secret"]["secretName"], v["secret"].get("optional", False))
                for v in spec.get("volumes") or [] if "secret" in v]
        for c in containers(spec):
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    refs.append((ref["name"], ref.get("optional", False)))
        for secret, optional in refs:
            if (ns(w), secret) not in secrets and secret not in readme:
                problems.append(f"{name(w)}: Secret {secret} is neither in the manifests nor "
                                f"explained in {readme_path}" + (" (optional)" if optional else ""))

    if not mounted or not etcd_urls or not users:
        problems.append(f"found {len(mounted)} agent mounts, {etcd_urls} etcd URLs and {users} "
                        "application mounts of a volume: expected some of each")
    for p in problems:
        print(f"check_deploy: {p}")
    if problems:
        return 1
    print(f"check_deploy: {len(objs)} objects consistent: {etcd_urls} etcd URLs, "
          f"{len(mounted)} agent mounts, {users} application mounts of a volume")
    return 0


if __name__ == "__main__":
    sys.exit(main())
