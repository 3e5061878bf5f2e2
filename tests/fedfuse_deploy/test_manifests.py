"""Compose and Kubernetes files checked statically (no container engine on these machines):
they parse, their images and versions match the project's pins, and their ports agree."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
IMAGE = f"fedfuse:{VERSION}"
PINS = dict(re.match(r"([\w-]+)(?:\[[\w,]+\])?==(.+)", d).groups() for d in PYPROJECT["project"]["dependencies"])


def _flag(args: list[str], name: str) -> str:
    for i, a in enumerate(args):
        if a.startswith(f"{name}="):
            return a.split("=", 1)[1]
        if a == name:
            return args[i + 1]
    raise AssertionError(f"{name} not in {args}")


def test_dockerfile_installs_the_pinned_cpu_torch_then_the_project():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert f"torch=={PINS['torch']}" in text and "download.pytorch.org/whl/cpu" in text
    assert "pip install ." in text
    assert text.index("torch==") < text.index("pip install .")
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in text
    assert f"-t {IMAGE}" in text


def test_compose_images_ports_and_ray_address_agree():
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    services = compose["services"]
    assert {s["image"] for s in services.values()} == {IMAGE}
    link = services["superlink"]
    port = _flag(link["command"], "--port")
    assert f"{port}:{port}" in link["ports"]
    assert "--enable-supernode-auth" in link["command"]
    assert _flag(link["command"], "--ssl-certfile").startswith("/certs/")
    nodes = {k: v for k, v in services.items() if k.startswith("supernode")}
    assert len(nodes) == 3
    client_ids = set()
    for node in nodes.values():
        assert _flag(node["command"], "--superlink") == f"superlink:{port}"
        assert _flag(node["command"], "--root-certificates") == "/certs/ca.crt"
        key = _flag(node["command"], "--auth-supernode-private-key")
        config = _flag(node["command"], "--node-config")
        cid = re.search(r"client-id='([^']+)'", config).group(1)
        assert key == f"/keys/{cid}" and f"data='/data/{cid}.safetensors'" in config
        client_ids.add(cid)
    assert len(client_ids) == 3
    head_port = _flag(services["ray-head"]["command"], "--port")
    assert link["environment"]["RAY_ADDRESS"] == f"ray-head:{head_port}"
    assert _flag(services["ray-worker"]["command"], "--address") == f"ray-head:{head_port}"


def _k8s(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if d]


def test_kubernetes_images_ports_and_ray_cluster_agree():
    docs = {(d["kind"], d["metadata"]["name"]): d for f in ("superlink.yaml", "supernodes.yaml",
                                                            "raycluster.yaml") for d in _k8s(f)}
    deployment = docs[("Deployment", "fedfuse-superlink")]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    port = int(_flag(container["args"], "--port"))
    assert container["ports"][0]["containerPort"] == port
    service = docs[("Service", "superlink")]
    assert service["spec"]["ports"][0]["port"] == port
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]

    nodes = docs[("StatefulSet", "supernode")]["spec"]["template"]["spec"]["containers"][0]
    assert f"--superlink=superlink:{port}" in nodes["args"][0]
    ray = docs[("RayCluster", "fedfuse-ray")]
    assert ray["spec"]["rayVersion"] == PINS["ray"]
    head_port = ray["spec"]["headGroupSpec"]["rayStartParams"]["port"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RAY_ADDRESS"] == f"fedfuse-ray-head-svc:{head_port}"

    images = {c["image"] for d in docs.values() if d["kind"] in ("Deployment", "StatefulSet")
              for c in d["spec"]["template"]["spec"]["containers"]}
    images |= {c["image"] for c in ray["spec"]["headGroupSpec"]["template"]["spec"]["containers"]}
    images |= {c["image"] for g in ray["spec"]["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]}
    assert images == {IMAGE}


def test_ray_and_flower_pins_match_design():
    assert PINS["ray"] == "2.55.1" and PINS["flwr"] == "1.42.0"


def test_rayservice_serves_the_store_the_superlink_writes():
    from fedfuse_server import serve

    docs = {(d["kind"], d["metadata"]["name"]): d for d in _k8s("rayservice.yaml")}
    claim = docs[("PersistentVolumeClaim", "fedfuse-store")]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]  # the SuperLink writes it, every replica reads it
    service = docs[("RayService", "fedfuse-initializers")]["spec"]
    cluster = service["rayClusterConfig"]
    assert cluster["rayVersion"] == PINS["ray"]

    config = yaml.safe_load(service["serveConfigV2"])
    (application,) = config["applications"]
    module, _, builder = application["import_path"].partition(":")
    assert module == serve.__name__ and callable(getattr(serve, builder))
    args = application["args"]
    assert set(args) <= set(serve.APP_ARGS) and "store" in args

    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    assert {c["image"] for pod in pods for c in pod["containers"]} == {IMAGE}
    head = pods[0]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in head["ports"]}["serve"] == config["http_options"]["port"]
    for pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert volumes[mounts[args["store"]]]["persistentVolumeClaim"]["claimName"] == "fedfuse-store"
            token_dir = str(Path(args["token_file"]).parent)
            assert "secretName" in volumes[mounts[token_dir]]["secret"]

    superlink = next(d for d in _k8s("superlink.yaml") if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in superlink["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in superlink["containers"][0]["volumeMounts"]}
    assert volumes[mounts[args["store"]]]["persistentVolumeClaim"]["claimName"] == "fedfuse-store"
