import os

# Headless rendering on the CPU, before anything imports robosuite.
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

# Every Ray of the session (local ones, the two-node cluster) authenticates with the one token in
# ~/.ray/auth_token, made by the first; set before Ray is imported, which reads it once.
os.environ.setdefault("RAY_AUTH_MODE", "token")

# Ray's worker processes import the jobs' functions by module name: this folder's test modules too.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH")) if p)


# ---- a real S3 endpoint on loopback, for the DVC remote tests ------------------------------------------

import socket  # noqa: E402
from typing import Iterator  # noqa: E402

import pytest  # noqa: E402

S3_BUCKET = "rsd-test-bucket"
"""The bucket `s3_endpoint` creates (empty) on its server."""


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server (`moto[server]`, the `test` extra) on 127.0.0.1 at a free port, with bucket
    S3_BUCKET made; its URL. Started on first use, stopped at the end of the session."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server", reason="moto[server] (the `test` extra) is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=S3_BUCKET)
        yield endpoint
    finally:
        server.stop()


class FakeLive:
    """Records what training sends to DVCLive."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = [{}]

    def log_metric(self, name: str, value: float) -> None:
        self.steps[-1][name] = value

    def next_step(self) -> None:
        self.steps.append({})
