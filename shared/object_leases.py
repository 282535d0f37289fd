"""Shard leases on an object store (an ``s3://`` work dir): the protocol of ``shared.leases`` with conditional writes in
place of hard links and file locks, so jobs on different machines share one run.

    acquire     PUT the lease with ``If-None-Match: *``: created only when no lease exists. An existing lease is taken
                over only when stale, by a PUT with ``If-Match: <its ETag>``: of two jobs taking over one lease, one wins.
    refresh     PUT with ``If-Match`` on the ETag this job last wrote; a refused write means another job took it over.
    release     DELETE with ``If-Match``: a job never removes its successor's lease.

The lease object sits at the key of the lease file a local run would have (``<run>/.leases/<n>.lease.json``); nothing
is written to the mirror. Staleness is judged as for local leases (heartbeat age, a dead process of this host).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from shared.leases import ShardLeases, _describe, clean_shard_temp_files, is_stale, lease_path
from shared.object_store import ObjectStore

log = logging.getLogger(__name__)
_REFUSED = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


def s3_client() -> Any:
    """A boto3 S3 client configured from the standard AWS environment (``AWS_ENDPOINT_URL`` and credentials)."""
    import boto3

    return boto3.session.Session().client("s3")


class ObjectLeases(ShardLeases):
    """``ShardLeases`` whose lease files are objects of ``store`` (see the module docstring)."""

    def __init__(self, store: ObjectStore, timeout_s: float, heartbeat_s: float | None = None) -> None:
        super().__init__(timeout_s, heartbeat_s)
        self.store = store
        self._client = s3_client()
        self._etags: dict[Path, str] = {}  # lease path -> the ETag of our last write

    def _address(self, lease: Path) -> tuple[str, str]:
        bucket, _, key = self.store.key(lease).partition("/")
        return bucket, key

    def _read(self, lease: Path) -> tuple[dict[str, Any] | None, str | None]:
        """(record, ETag) of the lease object; (None, None) when there is none, ({} , ETag) when unreadable."""
        from botocore.exceptions import ClientError

        bucket, key = self._address(lease)
        try:
            reply = self._client.get_object(Bucket=bucket, Key=key)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None, None
            raise
        try:
            record = json.loads(reply["Body"].read())
        except ValueError:
            record = {}
        return record if isinstance(record, dict) else {}, reply["ETag"]

    def _put(self, lease: Path, **condition: str) -> str | None:
        """Write our record under ``condition`` (IfNoneMatch / IfMatch); its ETag, or None when the store refused."""
        from botocore.exceptions import ClientError

        bucket, key = self._address(lease)
        try:
            reply = self._client.put_object(Bucket=bucket, Key=key, Body=json.dumps(self._record(), sort_keys=True),
                                            ContentType="application/json", **condition)  # fmt: skip
        except ClientError as error:
            if str(error.response.get("Error", {}).get("Code")) in _REFUSED:
                return None
            raise
        return reply["ETag"]

    def _stale(self, record: dict[str, Any] | None) -> bool:
        return is_stale(Path("/nonexistent"), record or None, self.timeout_s)  # an unreadable record counts as stale

    def holder(self, shard_path: Path) -> dict[str, Any] | None:
        record, etag = self._read(lease_path(Path(shard_path)))
        if etag is None or self._mine(record) or self._stale(record):
            return None
        return record or {}

    def acquire(self, shard_path: Path) -> bool:
        shard_path = Path(shard_path)
        lease = lease_path(shard_path)
        if self.holds(shard_path):
            return True
        etag = self._put(lease, IfNoneMatch="*")
        if etag is None:
            previous, previous_etag = self._read(lease)
            if previous_etag is None:  # released meanwhile: try once more to create it
                etag = self._put(lease, IfNoneMatch="*")
            elif self._stale(previous):
                etag = self._put(lease, IfMatch=previous_etag)
                if etag is not None:
                    log.warning("%s: took over the stale lease of %s", shard_path, _describe(previous))
                    self.taken_over.append((shard_path, previous))
                    clean_shard_temp_files(shard_path)
            if etag is None:
                return False
        with self._guard:
            self._held[lease] = shard_path
            self._etags[lease] = etag
        self._start_heartbeat()
        return True

    def release(self, shard_path: Path) -> None:
        from botocore.exceptions import ClientError

        lease = lease_path(Path(shard_path))
        with self._guard:
            if self._held.pop(lease, None) is None:
                return
            etag = self._etags.pop(lease, None)
        bucket, key = self._address(lease)
        try:
            self._client.delete_object(Bucket=bucket, Key=key, IfMatch=etag)
        except ClientError as error:
            if str(error.response.get("Error", {}).get("Code")) not in _REFUSED + ("NoSuchKey", "404"):
                raise  # refused: another job holds it now, and its lease stays

    def refresh(self) -> None:
        with self._guard:
            held = {lease: (shard, self._etags.get(lease)) for lease, shard in self._held.items()}
        for lease, (shard_path, etag) in held.items():
            new_etag = self._put(lease, IfMatch=etag) if etag else None
            with self._guard:
                if new_etag is not None:
                    self._etags[lease] = new_etag
                    continue
                self._held.pop(lease, None)
                self._etags.pop(lease, None)
            log.warning("%s: lost its lease to %s (this job missed its heartbeats)", shard_path,
                        _describe(self._read(lease)[0]))  # fmt: skip
            self.lost.append(shard_path)


def leases_for(config: Any) -> ShardLeases:
    """The shard leases of ``config``'s work dir: lease files in a local folder, objects on an object store."""
    store = config.work_store
    if store is None:
        return ShardLeases(config.stage1.lease_timeout_s)
    return ObjectLeases(store, config.stage1.lease_timeout_s)
