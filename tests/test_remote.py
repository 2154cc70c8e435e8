"""The S3 remote through dvc-s3, end to end against a real S3 API: moto's server on loopback.

A tiny DVC repository made here, with the project's own `.dvc/config` (its default remote), runs a
one-stage pipeline, pushes its outputs to the bucket, loses its cache and outputs, pulls them back and
finds every file's md5 equal to what dvc.lock recorded; an object tampered with in the bucket is refused
on pull (the remote's `verify`). Nothing is mocked: DVC, dvc-s3 and boto talk HTTP to moto's S3 server.
Works offline.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import S3_BUCKET as BUCKET

boto3 = pytest.importorskip("boto3")

ROOT = Path(__file__).resolve().parents[1]

STAGE_SCRIPT = """\
import os, random
random.seed(7)
os.makedirs("out/parts", exist_ok=True)
with open("out/data.bin", "wb") as f:
    f.write(bytes(random.randrange(256) for _ in range(50_000)))
for i in range(3):
    with open(f"out/parts/part{i}.txt", "w") as f:
        f.write(f"part {i}\\n" * (i + 1))
"""

DVC_YAML = {
    "stages": {
        "make": {
            "cmd": "python make.py",
            "deps": ["make.py"],
            "outs": ["out/data.bin", "out/parts"],
        }
    }
}


@pytest.fixture()
def aws_env(tmp_path: Path) -> dict[str, str]:
    """Dummy credentials in the environment only, and no AWS config of the machine's leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"),
        # the stage runs `python`: the interpreter running the tests, whether or not its venv is active
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        GIT_AUTHOR_NAME="rsd test", GIT_AUTHOR_EMAIL="test@example.invalid",
        GIT_COMMITTER_NAME="rsd test", GIT_COMMITTER_EMAIL="test@example.invalid",
    )
    return env


def run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run a command; on failure, fail the test with its output."""
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result.stdout


def dvc(*args: str, cwd: Path, env: dict[str, str]) -> str:
    return run([sys.executable, "-m", "dvc", *args], cwd, env)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def lock_outs(repo: Path) -> dict[str, str]:
    """{out path: md5} of the `make` stage, as dvc.lock recorded them."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for out in lock["stages"]["make"]["outs"]}


def project_remote() -> tuple[str, str]:
    """(name, url) of the default remote in the project's committed .dvc/config (read by DVC itself)."""
    from dvc.config import Config

    config = Config(dvc_dir=str(ROOT / ".dvc"), validate=False).load_one("repo")
    name = config["core"].get("remote")
    assert name, ".dvc/config names no default remote (core.remote)"
    return name, config["remote"][name]["url"]


def make_repo(path: Path, env: dict[str, str]) -> None:
    """A git + DVC repository with the project's .dvc/config and the one-stage pipeline."""
    path.mkdir()
    run(["git", "init", "-q"], path, env)
    dvc("init", "-q", cwd=path, env=env)
    shutil.copyfile(ROOT / ".dvc" / "config", path / ".dvc" / "config")
    (path / "make.py").write_text(STAGE_SCRIPT)
    (path / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))


def test_project_config_has_a_default_s3_remote_and_no_secrets() -> None:
    name, url = project_remote()
    assert url.startswith("s3://") and len(url.split("/")) >= 4, f"remote {name!r}: expected s3://<bucket>/<path>, got {url}"
    text = (ROOT / ".dvc" / "config").read_text().lower()
    for secret in ("access_key_id", "secret_access_key", "session_token", "password"):
        assert secret not in text, f".dvc/config must not hold credentials ({secret}); use config.local or AWS_* variables"
    ignored = (ROOT / ".dvc" / ".gitignore").read_text().split()
    assert "/config.local" in ignored, "per-machine remote settings (.dvc/config.local) must stay out of git"


def test_push_then_pull_restores_outputs_with_their_locked_hashes(tmp_path: Path, s3_endpoint: str,
                                                                  aws_env: dict[str, str]) -> None:
    name, url = project_remote()
    repo = tmp_path / "repo"
    make_repo(repo, aws_env)
    # bucket and endpoint are per-machine settings: config.local, never the committed config
    dvc("remote", "modify", "--local", name, "url", f"s3://{BUCKET}/rsd", cwd=repo, env=aws_env)
    dvc("remote", "modify", "--local", name, "endpointurl", s3_endpoint, cwd=repo, env=aws_env)
    dvc("repro", cwd=repo, env=aws_env)
    locked = lock_outs(repo)
    assert set(locked) == {"out/data.bin", "out/parts"} and md5(repo / "out/data.bin") == locked["out/data.bin"]
    run(["git", "add", "-A"], repo, aws_env)
    run(["git", "commit", "-q", "-m", "pipeline"], repo, aws_env)

    dvc("push", cwd=repo, env=aws_env)
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="rsd/").get("Contents", [])]
    assert len(keys) == 5, keys  # data.bin, the directory's manifest and its 3 files
    assert "in sync" in dvc("status", "--cloud", cwd=repo, env=aws_env)

    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "out")
    dvc("pull", cwd=repo, env=aws_env)

    assert md5(repo / "out/data.bin") == locked["out/data.bin"]
    manifest_hash = locked["out/parts"]  # "<md5 of the manifest>.dir"
    manifest_path = repo / ".dvc/cache/files/md5" / manifest_hash[:2] / manifest_hash[2:]
    assert md5(manifest_path) == manifest_hash.removesuffix(".dir")
    entries = json.loads(manifest_path.read_text())
    assert sorted(e["relpath"] for e in entries) == ["part0.txt", "part1.txt", "part2.txt"]
    for entry in entries:
        assert md5(repo / "out/parts" / entry["relpath"]) == entry["md5"], entry["relpath"]
    assert "up to date" in dvc("status", cwd=repo, env=aws_env)


def test_project_remote_verifies_what_it_downloads() -> None:
    """`verify`: DVC rehashes every object it pulls instead of trusting the name it has in the bucket."""
    from dvc.config import Config

    name, _ = project_remote()
    value = Config(dvc_dir=str(ROOT / ".dvc"), validate=False).load_one("repo")["remote"][name].get("verify")
    assert str(value).lower() == "true", f"got verify={value!r}; set it: `dvc remote modify {name} verify true`"


@pytest.mark.parametrize("target", ["out/data.bin", "out/parts/part1.txt"])
def test_pull_refuses_an_object_tampered_with_in_the_bucket(target: str, tmp_path: Path, s3_endpoint: str,
                                                            aws_env: dict[str, str]) -> None:
    """A file, or one file of a directory output: its object in the bucket is changed after the push. With
    `verify` DVC rehashes it on download and drops it from the cache, so checkout fails (exit 1, "Checkout failed
    for following targets") and the workspace never gets the tampered bytes. Without `verify` the same pull
    exits 0 and checks the tampered bytes out."""
    name, _ = project_remote()
    repo = tmp_path / "repo"
    make_repo(repo, aws_env)
    prefix = f"tamper-{target.replace('/', '-')}"
    dvc("remote", "modify", "--local", name, "url", f"s3://{BUCKET}/{prefix}", cwd=repo, env=aws_env)
    dvc("remote", "modify", "--local", name, "endpointurl", s3_endpoint, cwd=repo, env=aws_env)
    dvc("repro", cwd=repo, env=aws_env)
    dvc("push", cwd=repo, env=aws_env)
    original = (repo / target).read_bytes()
    in_dir = (repo / target).parent.name == "parts"
    if in_dir:  # a directory's member: its md5 is in the directory's manifest
        manifest = lock_outs(repo)["out/parts"]
        entries = json.loads((repo / ".dvc/cache/files/md5" / manifest[:2] / manifest[2:]).read_text())
        oid = next(e["md5"] for e in entries if e["relpath"] == Path(target).name)
    else:
        oid = lock_outs(repo)[target]
    assert oid == md5(repo / target)

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    key = f"{prefix}/files/md5/{oid[:2]}/{oid[2:]}"
    tampered = bytes([original[0] ^ 1]) + original[1:]  # one bit, same size
    assert client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == original
    client.put_object(Bucket=BUCKET, Key=key, Body=tampered)

    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "out")
    result = subprocess.run([sys.executable, "-m", "dvc", "pull"], cwd=repo, env=aws_env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0, f"dvc pull took a tampered object:\n{result.stdout}\n{result.stderr}"
    assert "Checkout failed" in result.stderr and ("out/parts" if in_dir else target) in result.stderr
    assert not (repo / target).exists() or (repo / target).read_bytes() != tampered
    assert not (repo / ".dvc/cache/files/md5" / oid[:2] / oid[2:]).exists()  # dropped, not kept as if it were good


def test_endpoint_from_the_environment(tmp_path: Path, s3_endpoint: str, aws_env: dict[str, str]) -> None:
    """No endpoint in any config file: AWS_ENDPOINT_URL alone points dvc-s3 at the server."""
    name, _ = project_remote()
    repo = tmp_path / "repo"
    make_repo(repo, aws_env)
    dvc("remote", "modify", "--local", name, "url", f"s3://{BUCKET}/env", cwd=repo, env=aws_env)
    env = {**aws_env, "AWS_ENDPOINT_URL": s3_endpoint}
    dvc("repro", cwd=repo, env=env)
    dvc("push", cwd=repo, env=env)
    locked = lock_outs(repo)
    shutil.rmtree(repo / ".dvc" / "cache")
    (repo / "out/data.bin").unlink()
    dvc("pull", "out/data.bin", cwd=repo, env=env)
    assert md5(repo / "out/data.bin") == locked["out/data.bin"]
