"""cluster/: the `ray up` file against the ray wheel's own schema, the KubeRay manifests, and a real `ray job submit`
to a three-node cluster on this machine (tests/local_cluster.py starts its private nodes).
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray._private.runtime_env.packaging import create_package
from ray._private.runtime_env.working_dir import upload_working_dir_if_needed
from ray.job_submission import JobStatus, JobSubmissionClient
from ray.serve.schema import ServeDeploySchema

from raypipe.config import RunConfig, load_config
from tests.local_cluster import RAY_CLI, ray_head

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
JOB_TIMEOUT_S = 900


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# ---- ray up --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_up_schema() -> dict[str, Any]:
    """The schema `ray up` validates cluster files with, from the installed wheel (so it matches Ray 2.60)."""
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.fixture(scope="module")
def ray_up() -> dict[str, Any]:
    return load_yaml(CLUSTER / "ray-up-gpu.yaml")


def test_ray_up_file_passes_the_wheel_schema_and_ray_up_checks(ray_up_schema: dict, ray_up: dict) -> None:
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    jsonschema.validate(ray_up, ray_up_schema)
    validate_config(prepare_config(copy.deepcopy(ray_up)))  # what `ray up` runs before it calls the cloud
    nodes = ray_up["available_node_types"]
    assert ray_up["head_node_type"] in nodes
    assert ray.__version__ in ray_up["docker"]["image"], "the image's Ray must be the Ray that submits the jobs"
    setup = " ; ".join(ray_up["setup_commands"])
    assert setup.index("torch==2.14") < setup.index('pip install -e ".[gpu]"'), "torch first, or pip pulls another"


def _rename_a_top_level_key(config: dict) -> None:
    config["max_worker"] = config.pop("max_workers")


def _drop_a_node_config(config: dict) -> None:
    worker = next(k for k in config["available_node_types"] if k != config["head_node_type"])
    del config["available_node_types"][worker]["node_config"]


def _gpu_count_as_text(config: dict) -> None:
    config["available_node_types"][config["head_node_type"]]["resources"] = {"GPU": "8"}


def _misspell_a_docker_key(config: dict) -> None:
    config["docker"]["imagee"] = config["docker"].pop("image")


@pytest.mark.parametrize("mutate", [_rename_a_top_level_key, _drop_a_node_config, _gpu_count_as_text,
                                    _misspell_a_docker_key])
def test_ray_up_schema_rejects_a_broken_file(ray_up_schema: dict, ray_up: dict,
                                             mutate: Callable[[dict], None]) -> None:
    """The schema is strict enough to catch the usual edits gone wrong (so the test above is not vacuous)."""
    broken = copy.deepcopy(ray_up)
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_up_schema)


# ---- KubeRay -------------------------------------------------------------------------------------------------


def containers(cluster_spec: dict) -> list[dict]:
    """Every Ray container of a RayCluster spec: the head's, then each worker group's."""
    pods = [cluster_spec["headGroupSpec"]["template"]] + [g["template"] for g in cluster_spec["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["spec"]["containers"]]


def check_cluster_spec(spec: dict) -> None:
    """A head and a GPU worker group on one image of the installed Ray, GPUs requested the Kubernetes way."""
    assert spec["rayVersion"] == ray.__version__
    assert {"rayStartParams", "template"} <= spec["headGroupSpec"].keys()
    for group in spec["workerGroupSpecs"]:
        assert {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= group.keys()
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for c in containers(spec)]
    assert any(int(g or 0) > 0 for g in gpus[1:]), "a worker group must ask for GPUs"
    assert len({c["image"] for c in containers(spec)}) == 1, "head and workers must run the same image"


def secret_env(container: dict) -> dict[str, str]:
    """Environment variables a container takes from Secrets: name -> secret name."""
    return {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})}


def test_raycluster_manifest() -> None:
    manifest = load_yaml(CLUSTER / "kuberay" / "raycluster.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayCluster")
    check_cluster_spec(manifest["spec"])


def rayjob_run_config() -> tuple[dict, RunConfig]:
    """The RayJob manifest and the run config its entrypoint asks for (recipe + dotted overrides, checked)."""
    manifest = load_yaml(CLUSTER / "kuberay" / "rayjob.yaml")
    command = manifest["spec"]["entrypoint"].split()
    assert command[:4] == ["python", "-m", "raypipe", "run"]
    return manifest, load_config(REPO / command[4], command[5:])


def test_rayjob_manifest_runs_a_recipe_and_cleans_up() -> None:
    manifest, cfg = rayjob_run_config()
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    spec = manifest["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert Path(cfg.output_dir).is_absolute(), "the job runs in a temporary copy: output_dir must be absolute"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert "env_vars" not in runtime_env, "raypipe's driver sets env_vars in ray.init: Ray refuses to merge both"
    check_cluster_spec(spec["rayClusterSpec"])
    head = containers(spec["rayClusterSpec"])[0]
    assert secret_env(head).keys() == {"WANDB_API_KEY"}


def test_rayservice_serves_the_rayjob_run_with_a_valid_serve_config() -> None:
    from serving.settings import TOKEN_ENV, load_serve_config

    manifest = load_yaml(CLUSTER / "kuberay" / "rayservice.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    (app,) = serve_config.applications
    assert (app.name, app.route_prefix, app.import_path) == ("raypipe", "/", "serving.app:build_app")
    args = load_serve_config(app.args, source="rayservice.yaml")  # every key a ServeConfig field, values checked
    assert args.device == "gpu"
    assert Path(args.model) == rayjob_run_config()[1].run_dir, "it serves the run folder rayjob.yaml writes"
    check_cluster_spec(manifest["spec"]["rayClusterConfig"])
    for container in containers(manifest["spec"]["rayClusterConfig"]):
        assert TOKEN_ENV in secret_env(container), "the builder and every replica need the API token"


# ---- ray job submit ------------------------------------------------------------------------------------------


def job_package(working_dir: Path, out: Path) -> list[str]:
    """The files `ray job submit --working-dir` would upload: Ray's own packaging, with the excludes it adds
    (.gitignore and .rayignore files, and Ray 2.60's defaults .git, .venv, venv, __pycache__)."""
    chosen: dict[str, Any] = {}
    upload_working_dir_if_needed({"working_dir": str(working_dir)}, include_gitignore=True,
                                 upload_fn=lambda path, excludes, is_file=False: chosen.update(excludes=excludes))
    create_package(str(working_dir), out, include_gitignore=True, excludes=chosen["excludes"])
    return zipfile.ZipFile(out).namelist()


def test_working_dir_upload_skips_what_gitignore_lists(tmp_path: Path) -> None:
    """runs/ (checkpoints) is left out only because .gitignore says so; the checkout itself stays small."""
    checkout = tmp_path / "checkout"
    for path in ("runs/quickstart/round_1/train/model/model.safetensors", "wandb/run.wandb",
                 "raypipe.egg-info/PKG-INFO", "raypipe/cli.py", "conf/quickstart_mini.yaml"):
        (checkout / path).parent.mkdir(parents=True, exist_ok=True)
        (checkout / path).write_bytes(b"x" * 1024)
    shutil.copy(REPO / ".gitignore", checkout / ".gitignore")
    assert sorted(job_package(checkout, tmp_path / "probe.zip")) == [".gitignore", "conf/quickstart_mini.yaml",
                                                                     "raypipe/cli.py"]

    names = job_package(REPO, tmp_path / "repo.zip")
    assert "raypipe/pipeline.py" in names and "conf/quickstart_mini.yaml" in names
    assert not [n for n in names if n.split("/")[0] in (".git", ".venv", "runs")]
    size = (tmp_path / "repo.zip").stat().st_size
    assert size < 8 * 2**20, f"the working_dir upload is {size / 2**20:.1f} MiB"


JOB_ENV = {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "TOKENIZERS_PARALLELISM": "false"}
"""The head's environment, which the job's driver inherits (the job's own runtime_env env_vars would clash with
the ones raypipe's driver passes to ray.init)."""


PLACEMENT = ["engine.resources.raypipe_engines=1", "train.num_workers=2", "train.cpus_per_worker=1",
             "train.resources_per_worker.raypipe_train=1"]
"""The engines on the head (the only node with `raypipe_engines`), one training worker on each of the two worker
nodes (one `raypipe_train` each)."""


def test_job_submit_runs_the_mini_quickstart_across_three_nodes(tmp_path: Path) -> None:
    """The README's `ray job submit --working-dir . -- python -m raypipe run ...` against a real three-node
    cluster on loopback: the engines on the head, two DeepSpeed workers on two other nodes (the gloo rendezvous
    and ZeRO-2 collectives between nodes), the checkpoint hand-off through the run folder every node sees. Every
    stage runs in the job and its artefacts land in output_dir (absolute: the job's cwd is a temporary copy)."""
    from ray.util.state import list_actors

    output_dir = tmp_path / "runs"
    submission_id = f"raypipe-mini-{random.randrange(10**6)}"
    trainer_node = ("--num-cpus", "2", "--resources", json.dumps({"raypipe_train": 1}))
    with ray_head(JOB_ENV, ("--num-cpus", "4", "--resources", json.dumps({"raypipe_engines": 1})),
                  workers=(trainer_node, trainer_node)) as head:
        try:
            submit = head.cli("job", "submit", "--address", head.address, "--submission-id", submission_id,
                              "--working-dir", str(REPO), "--", sys.executable, "-m", "raypipe", "run",
                              "conf/quickstart_mini.yaml", f"output_dir={output_dir}", *PLACEMENT,
                              timeout=JOB_TIMEOUT_S)
            exit_code, stderr = submit.returncode, submit.stderr
        except subprocess.TimeoutExpired:
            exit_code, stderr = None, f"still running after {JOB_TIMEOUT_S} s"
        status = JobSubmissionClient(head.address).get_job_status(submission_id)
        if exit_code != 0 or status != JobStatus.SUCCEEDED:
            logs = head.cli("job", "logs", "--address", head.address, submission_id)
            print(logs.stdout[-20_000:], logs.stderr[-5_000:])
            pytest.fail(f"job {submission_id}: {status}, `ray job submit` exit {exit_code}:\n{stderr[-5_000:]}")
        engines = list_actors(address=head.address, filters=[("class_name", "=", "EngineActor")], detail=True)
    run_dir = output_dir / "quickstart_mini"
    summary = json.loads((run_dir / "summary.json").read_text())
    (round_1,) = summary["rounds"]
    assert round_1["n_pairs"] > 0 and round_1["train_steps"] > 0
    assert {"sample", "grade", "branch", "build", "reference", "train", "evaluate"} <= round_1["stage_seconds"].keys()
    model = run_dir / "round_1" / "train" / "model"
    assert any(model.glob("*.safetensors")) and (model / "config.json").is_file()
    for stage in ("init", "sft_data", "sft", "evaluate"):
        assert (run_dir / "round_0" / stage / "manifest.json").is_file()
    for stage in round_1["stage_seconds"]:
        assert (run_dir / "round_1" / stage / "manifest.json").is_file()
    engine_nodes = {a["node_id"] for a in engines}
    assert len(engine_nodes) == 1, engines
    for stage in ("round_0/sft", "round_1/train"):
        workers = json.loads((run_dir / stage / "manifest.json").read_text())["metrics"]["worker_nodes"]
        assert len(set(workers)) == 2 and not engine_nodes & set(workers), (stage, workers, engine_nodes)


def test_a_token_auth_head_answers_only_clients_with_its_token() -> None:
    """Ray 2.60 token auth from the client's side: the CLI sends a token only when RAY_AUTH_MODE=token is set
    where it runs, and it must be the cluster's (RAY_AUTH_TOKEN here; ~/.ray/auth_token by default)."""
    token = f"raypipe-test-{random.randrange(10**9)}"
    with ray_head({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}) as head:
        base = {k: v for k, v in head.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
        for client_env, allowed in (({"RAY_AUTH_MODE": "disabled"}, False),
                                    ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "wrong"}, False),
                                    ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}, True)):
            listed = subprocess.run([RAY_CLI, "job", "list", "--address", head.address], env=base | client_env,
                                    capture_output=True, text=True, timeout=120)
            assert (listed.returncode == 0) == allowed, (client_env, listed.stderr[-2000:])
