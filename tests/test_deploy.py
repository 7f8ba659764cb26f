"""The Kubernetes manifests in deploy/, checked offline: every YAML document parses, every kustomization
lists files that exist, every built-in kind validates against the Kubernetes schema (kubernetes-validate,
strict), and the manifests agree with the code and the docs — the training command with
deploy/README.md and torchrun's / ``moeforge.train``'s parsers, the serve probes with the server's
port and ``/health``, the API key with ``moeforge serve``'s env var, the HPA's metric with the gauge
``/metrics`` exports. CRDs (KubeRay's RayJob) have no schema here: they are skipped, with the reason,
and only the expected ones may be."""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.33.0"  # kubernetes-validate 1.37.0 ships schemas for 1.28 … 1.37
# Custom resources: not part of the Kubernetes schema, so kubernetes-validate cannot check them.
EXPECTED_CRDS = {("ray.io/v1", "RayJob"): "KubeRay CRD (ray.io/v1): no schema in kubernetes-validate"}
# Files under a kustomization's directory that it deliberately does not apply.
NOT_APPLIED = {"serve/secret.example.yaml": "a template: applying it would install a known API key"}


@dataclass(frozen=True)
class Doc:
    path: Path
    index: int
    body: dict[str, Any]

    @property
    def rel(self) -> str:
        return self.path.relative_to(DEPLOY).as_posix()

    @property
    def id(self) -> str:
        return f"{self.rel}#{self.index}:{self.body.get('kind')}/{self.body.get('metadata', {}).get('name')}"


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def _manifest_docs() -> list[Doc]:
    out = []
    for path in _yaml_files():
        if path.name == "kustomization.yaml":
            continue
        for i, body in enumerate(yaml.safe_load_all(path.read_text())):
            if body is not None:
                out.append(Doc(path, i, body))
    return out


DOCS = _manifest_docs()


def _one(kind: str, directory: str) -> dict[str, Any]:
    found = [d.body for d in DOCS if d.body["kind"] == kind and d.rel.startswith(f"{directory}/")]
    assert len(found) == 1, f"expected one {kind} in deploy/{directory}, found {len(found)}"
    return found[0]


def _by_name(kind: str, name: str) -> dict[str, Any]:
    found = [d.body for d in DOCS if d.body["kind"] == kind and d.body["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name}, found {len(found)}"
    return found[0]


def _container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in pod_spec["containers"] if c["name"] == name]
    return c


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _mounts(container: dict[str, Any], pod_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath → the volume mounted there."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    return {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}


def _volume_at(path: str, container: dict[str, Any], pod_spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The deepest mount that holds ``path``: (mount path, volume)."""
    hits = [(m, v) for m, v in _mounts(container, pod_spec).items() if path == m or path.startswith(m + "/")]
    assert hits, f"{path} is on no mounted volume"
    return max(hits, key=lambda mv: len(mv[0]))


def _images(node: Any) -> list[str]:
    """The images of every container list anywhere in a manifest (CRDs nest pod templates deeper)."""
    if isinstance(node, list):
        return [i for x in node for i in _images(x)]
    if not isinstance(node, dict):
        return []
    found = [c["image"] for k in ("containers", "initContainers") for c in node.get(k, [])]
    return found + [i for v in node.values() for i in _images(v)]


def _workspace_claim() -> str:
    pvc = _one("PersistentVolumeClaim", "storage")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    return pvc["metadata"]["name"]


def _cli_context(*names: str, args: list[str]) -> Any:
    """Parse ``moeforge NAMES… ARGS`` with the real CLI into its click context (no command runs)."""
    from moeforge.cli.main import app

    cmd = typer.main.get_command(app)
    for name in names:
        cmd = cmd.commands[name]  # type: ignore[attr-defined]
    return cmd.make_context(" ".join(names), list(args))


# ---- files, kustomizations, schema ----


def test_every_yaml_parses_and_kustomizations_list_existing_files() -> None:
    files = _yaml_files()
    assert files
    for path in files:
        list(yaml.safe_load_all(path.read_text()))  # raises on a syntax error
    kustomizations = sorted(DEPLOY.rglob("kustomization.yaml"))
    assert {k.parent.name for k in kustomizations} == {"storage", "train", "data", "serve"}
    listed: set[str] = set()
    for k in kustomizations:
        body = yaml.safe_load(k.read_text())
        assert body["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and body["kind"] == "Kustomization"
        assert "namePrefix" not in body and "nameSuffix" not in body  # RDZV_HOST is built from the names
        assert body["resources"], k
        for entry in body["resources"]:
            target = k.parent / entry
            assert target.is_file() or (target / "kustomization.yaml").is_file(), f"{k}: {entry} is missing"
            listed.add(target.resolve().relative_to(DEPLOY).as_posix())
        for image in body.get("images", []):
            assert image["name"] == "moeforge"
    unlisted = {
        p.relative_to(DEPLOY).as_posix()
        for p in files
        if p.name != "kustomization.yaml" and p.relative_to(DEPLOY).as_posix() not in listed
    }
    assert unlisted == set(NOT_APPLIED), f"manifests no kustomization applies: {unlisted - set(NOT_APPLIED)}"
    # every container runs the one image the kustomizations retag
    for doc in DOCS:
        assert set(_images(doc.body)) <= {"moeforge"}, doc.id


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.id)
def test_manifest_validates_against_kubernetes_schema(doc: Doc) -> None:
    key = (doc.body["apiVersion"], doc.body["kind"])
    try:
        version = kubernetes_validate.validate(doc.body, K8S_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        assert key in EXPECTED_CRDS, f"{doc.id}: no schema for {key}, and it is not an expected CRD"
        pytest.skip(f"{doc.id}: {EXPECTED_CRDS[key]}")
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.path)
        pytest.fail(f"{doc.id} is invalid against Kubernetes {e.version}: {where}: {e.message}")
    assert key not in EXPECTED_CRDS, f"{key} validated: drop it from EXPECTED_CRDS"
    assert version == "1.33"


def test_skipped_kinds_are_exactly_the_expected_crds() -> None:
    """Only the listed custom resources go unvalidated, and each of them is really used in deploy/."""
    no_schema: dict[tuple[str, str], list[str]] = {}
    for doc in DOCS:
        try:
            kubernetes_validate.validate(doc.body, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            no_schema.setdefault((doc.body["apiVersion"], doc.body["kind"]), []).append(doc.id)
        except kubernetes_validate.ValidationError:
            pass  # reported by test_manifest_validates_against_kubernetes_schema
    assert set(no_schema) == set(EXPECTED_CRDS), no_schema


# ---- training ----


def _readme_train_command() -> list[str]:
    text = (DEPLOY / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)
    cmds = [b for b in blocks if b.lstrip().startswith("torchrun ")]
    assert len(cmds) == 1, "deploy/README.md needs exactly one fenced block holding the torchrun command"
    return shlex.split(cmds[0].replace("\\\n", " "))


def _train_parts() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    job = _one("Job", "train")
    pod = job["spec"]["template"]["spec"]
    return job, pod, _container(pod, "trainer")


def _substituted(arg: str, env: dict[str, dict[str, Any]]) -> str:
    """Kubernetes' ``$(VAR)`` expansion (a valueFrom variable becomes a placeholder)."""

    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in env, f"$({m.group(1)}) is not in the container's env"
        return str(env[m.group(1)].get("value", f"<{m.group(1)}>"))

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, arg)


def test_training_command_is_the_documented_one() -> None:
    _, _, c = _train_parts()
    assert [*c["command"], *c.get("args", [])] == _readme_train_command()


def test_training_command_parses_as_torchrun_and_moeforge_train(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.distributed.run import get_args_parser

    job, pod, c = _train_parts()
    env = _env(c)
    assert c["command"] == ["torchrun"]
    args = get_args_parser().parse_args([_substituted(a, env) for a in c["args"]])
    nnodes = int(env["NNODES"]["value"])
    gpus = int(env["GPUS_PER_NODE"]["value"])
    assert args.nnodes == str(nnodes) and args.nproc_per_node == str(gpus)
    assert args.rdzv_backend == "c10d" and args.module and args.training_script == "moeforge.train"
    assert env["RDZV_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['batch.kubernetes.io/controller-uid']"
    )
    host, port = args.rdzv_endpoint.rsplit(":", 1)

    # the rendezvous host is pod 0 through the headless Service, on a port the Service and pod expose
    svc = _by_name("Service", pod["subdomain"])
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert host == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
    assert int(port) in {p["containerPort"] for p in c["ports"]}
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()

    # what moeforge.train receives: the resume flag and the checkpoint directory on the shared claim
    import moeforge.train.run as run_mod
    from moeforge.train.__main__ import main as train_main

    seen: dict[str, Any] = {}

    class _Result:
        status = "completed"

    def fake_run(config: str, overrides: list[str], *, resume: bool, overwrite: bool) -> _Result:
        seen.update(config=config, overrides=overrides, resume=resume, overwrite=overwrite)
        return _Result()

    monkeypatch.setattr(run_mod, "run_training", fake_run)
    assert train_main(args.training_script_args) == 0
    assert seen["resume"] is True and seen["overwrite"] is False
    (out_dir,) = [o.split("=", 1)[1] for o in seen["overrides"] if o.startswith("out_dir=")]
    _, volume = _volume_at(out_dir, c, pod)
    assert volume["persistentVolumeClaim"]["claimName"] == _workspace_claim()
    assert "readOnly" not in volume["persistentVolumeClaim"]


def test_training_config_validates(tmp_path: Path) -> None:
    from moeforge.train.config import load_train_config

    _, pod, c = _train_parts()
    config_path = c["args"][c["args"].index("moeforge.train") + 1]
    mount, volume = _volume_at(config_path, c, pod)
    cm = _by_name("ConfigMap", volume["configMap"]["name"])
    text = cm["data"][config_path[len(mount) + 1 :]]
    (tmp_path / "train.yaml").write_text(text)
    args = c["args"]
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    cfg = load_train_config(tmp_path / "train.yaml", overrides)
    assert cfg.out_dir == "/workspace/runs/train" and cfg.device == "cuda"
    for data_path in (cfg.data.tokens, cfg.data.run, cfg.data.tokenizer):
        if data_path is not None:  # the tokens are on the claim too
            _, v = _volume_at(data_path, c, pod)
            assert v["persistentVolumeClaim"]["claimName"] == _workspace_claim()


def test_training_job_is_one_pod_per_node_and_restarts() -> None:
    job, pod, c = _train_parts()
    spec = job["spec"]
    env = _env(c)
    nnodes, gpus = int(env["NNODES"]["value"]), env["GPUS_PER_NODE"]["value"]
    assert spec["completionMode"] == "Indexed"
    assert spec["parallelism"] == spec["completions"] == nnodes
    assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == gpus
    # one pod per node
    labels = spec["template"]["metadata"]["labels"]
    (term,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= labels.items()
    # a failed pod is recreated (same index, same hostname) and resumes; disruptions do not count
    assert pod["restartPolicy"] == "Never" and spec["backoffLimit"] >= 1
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    assert "--resume" in c["args"] and "--overwrite" not in c["args"]
    # NCCL: a memory-backed /dev/shm and async error handling (a dead peer aborts, torchrun restarts)
    _, shm = _volume_at("/dev/shm", c, pod)
    assert shm["emptyDir"]["medium"] == "Memory"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"]["value"] == "1"


# ---- data pipeline ----


def test_data_rayjob_runs_the_recipe_with_the_ray_executor(tmp_path: Path) -> None:
    from moeforge.data.recipe import Recipe, load_recipe

    rayjob = _one("RayJob", "data")
    spec = rayjob["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["moeforge", "data", "run"]
    ctx = _cli_context("data", "run", args=argv[3:])
    recipe_path, out = str(ctx.params["recipe_path"]), str(ctx.params["out"])
    cluster = spec["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster["workerGroupSpecs"]
    ]
    claim = _workspace_claim()
    recipe_text = None
    for pod in pods:  # the driver runs on the head, the tasks on the workers: all see both paths
        (c,) = pod["containers"]
        mount, volume = _volume_at(recipe_path, c, pod)
        recipe_text = _by_name("ConfigMap", volume["configMap"]["name"])["data"][
            recipe_path[len(mount) + 1 :]
        ]
        assert _volume_at(out, c, pod)[1]["persistentVolumeClaim"]["claimName"] == claim
    assert recipe_text is not None
    recipe = yaml.safe_load(recipe_text)
    assert recipe["executor"] == "ray"
    assert not recipe.get("ray", {}).get("address")  # the driver joins the RayJob's cluster ($RAY_ADDRESS)
    if "executor" not in Recipe.model_fields:  # the Ray executor's recipe setting may not have landed yet
        recipe.pop("executor")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    load_recipe(tmp_path / "recipe.yaml")
    # the image carries Ray at the version the `ray` extra pins
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (ray_pin,) = [r for r in extras["ray"] if r.startswith("ray==")]
    assert cluster["rayVersion"] == ray_pin.split("==")[1]


# ---- serving ----


def _serve_parts() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    dep = _one("Deployment", "serve")
    pod = dep["spec"]["template"]["spec"]
    return dep, pod, _container(pod, "server")


def _port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (p,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return p


def test_serve_probes_hit_health_on_the_server_port(monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, c = _serve_parts()
    assert c["command"] == ["moeforge"] and c["args"][0] == "serve"
    monkeypatch.setenv("MOEFORGE_API_KEY", "from-the-secret")
    params = _cli_context("serve", args=c["args"][1:]).params
    assert params["host"] == "0.0.0.0"
    ports = {p["containerPort"] for p in c["ports"]}
    assert ports == {params["port"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health", probe
        assert _port(c, get["port"]) == params["port"], probe
    # the API key: the env var `moeforge serve --api-key` reads, from the Secret the template documents
    assert params["api_key"] == "from-the-secret"
    ref = _env(c)["MOEFORGE_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref.get("optional") is not True  # no Secret, no server (never an open one by accident)
    secret = _by_name("Secret", ref["name"])
    assert ref["key"] in secret["stringData"]
    # the model is on the shared claim
    _, pod, _ = _serve_parts()
    assert (
        _volume_at(str(params["path"]), c, pod)[1]["persistentVolumeClaim"]["claimName"] == _workspace_claim()
    )


def test_serve_service_pdb_and_hpa_point_at_the_deployment() -> None:
    dep, _, c = _serve_parts()
    labels = dep["spec"]["template"]["metadata"]["labels"]
    svc = _one("Service", "serve")
    assert svc["spec"]["selector"].items() <= labels.items()
    assert {_port(c, p["targetPort"]) for p in svc["spec"]["ports"]} == {
        p["containerPort"] for p in c["ports"]
    }
    pdb = _one("PodDisruptionBudget", "serve")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = _one("HorizontalPodAutoscaler", "serve")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", dep["metadata"]["name"])
    assert "replicas" not in dep["spec"] or dep["spec"]["replicas"] >= hpa["spec"]["minReplicas"]


def test_hpa_metric_is_the_servers_queue_depth_gauge() -> None:
    from moeforge.serve import metrics

    (gauge,) = [name for name in metrics._GAUGES if "queue_depth" in name]
    # and /metrics really exports it
    assert f'"{gauge}"' in (ROOT / "src/moeforge/serve/api.py").read_text()
    hpa = _one("HorizontalPodAutoscaler", "serve")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == gauge
    assert gauge in (DEPLOY / "README.md").read_text()  # the adapter rule documents the same name


# ---- docs and image ----


def test_readmes_point_to_the_deploy_docs() -> None:
    top = (ROOT / "README.md").read_text()
    assert "deploy/README.md" in top and "kubectl apply -k deploy/train" in top
    text = (DEPLOY / "README.md").read_text()
    for d in ("storage", "train", "data", "serve"):
        assert f"kubectl apply -k deploy/{d}" in text
    assert K8S_VERSION.rsplit(".", 1)[0] in text


def test_dockerfile_installs_existing_extras() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    (extras,) = re.findall(r"^ARG EXTRAS=(\S+)$", text, flags=re.M)
    known = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras.split(",")) <= set(known)
    assert {"serve", "ray", "hf"} <= set(extras.split(","))
    assert 'pip install --no-cache-dir ".[${EXTRAS}]"' in text
    # the manifests run as uid 1000, the user the image creates
    assert "--uid 1000" in text and "USER 1000" in text
