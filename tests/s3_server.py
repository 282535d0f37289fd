"""A real S3-compatible server on 127.0.0.1 for tests: moto's server mode in a child process, one bucket, and the
standard AWS environment (``AWS_ENDPOINT_URL``, credentials, region) that pyarrow.fs, boto3 and child processes read."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BUCKET = "llavaseg-test"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class S3Server:
    """``python -m moto.server`` on a free port; ``env`` is what a client needs to reach it."""

    def __init__(self, log_path: Path) -> None:
        self.port = _free_port()
        self.env = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
        }  # fmt: skip
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                             str(self.port)], stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start: {Path(log_path).read_text()[-2000:]}")
                time.sleep(0.1)

    def client(self):
        import boto3

        return boto3.session.Session().client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"],
                                              aws_access_key_id="test", aws_secret_access_key="test",
                                              region_name="us-east-1")  # fmt: skip

    def keys(self, prefix: str = "") -> list[str]:
        """Every key of the bucket under ``prefix``, sorted."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
