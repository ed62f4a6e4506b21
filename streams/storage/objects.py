"""S3 (MinIO) access for claim checks: large tensor bundles stored under keys derived from the
request id, so a redelivered request rewrites the same object instead of leaking a new one."""

from __future__ import annotations

import asyncio
import io
from datetime import timedelta
from urllib.parse import urlparse

from minio import Minio
from minio.error import S3Error

from streams.settings import Settings
from topics.errors import ErrorCode, EventError

# S3 answers that mean the reference itself is bad (anything else is the server's trouble).
MISSING = frozenset({"NoSuchKey", "NoSuchBucket", "AccessDenied", "InvalidBucketName", "InvalidObjectName",
                     "KeyTooLongError", "InvalidArgument"})

# Prefixes of the product's own objects in its bucket (outputs, dead-lettered originals, batch
# outputs, model artifacts): never readable through a caller's reference.
INTERNAL_PREFIXES = ("results/", "deadletters/", "batches/", "models/")


class ObjectStore:
    def __init__(self, settings: Settings) -> None:
        self.bucket = settings.s3_bucket
        self.caller_buckets = frozenset(settings.s3_caller_buckets or [settings.s3_bucket])
        self.artifact_buckets = frozenset(settings.s3_artifact_buckets or [settings.s3_bucket])
        self.client = Minio(
            settings.s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            secure=settings.s3_secure,
            region=settings.s3_region,
        )

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            self.client.make_bucket(self.bucket)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        self.client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type)
        return self.uri(key)

    def get(self, uri: str) -> bytes:
        bucket, key = parse_uri(uri)
        try:
            response = self.client.get_object(bucket, key)
        except S3Error as exc:
            if exc.code not in MISSING:
                raise  # the server's trouble, not the reference's: an outage, retried
            raise EventError(ErrorCode.PAYLOAD_UNAVAILABLE, f"cannot read {uri}: {exc.code}") from None
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def check_caller_uri(self, uri: str) -> str:
        """A caller's s3:// reference, if it lies where callers may point; FORBIDDEN otherwise."""
        bucket, key = parse_uri(uri)
        if not self.caller_may_read(bucket, key):
            raise EventError(ErrorCode.FORBIDDEN, f"{uri[:300]!r} is not open to callers: name an object in"
                             f" {sorted(self.caller_buckets)} outside {list(INTERNAL_PREFIXES)}")
        return uri

    def check_artifact_uri(self, uri: str) -> str:
        """A registration's s3:// artifact, if it lies in the artifact buckets; FORBIDDEN otherwise."""
        bucket, key = parse_uri(uri)
        if bucket not in self.artifact_buckets or not _plain_key(key):
            raise EventError(ErrorCode.FORBIDDEN, f"{uri[:300]!r} is not in the artifact buckets"
                             f" {sorted(self.artifact_buckets)} (INFERSTREAM_S3_ARTIFACT_BUCKETS)")
        return uri

    def caller_may_read(self, bucket: str, key: str) -> bool:
        if bucket not in self.caller_buckets or not _plain_key(key):
            return False
        return not (bucket == self.bucket and key.startswith(INTERNAL_PREFIXES))

    def presigned_get(self, uri: str, expires: timedelta = timedelta(hours=1)) -> str:
        bucket, key = parse_uri(uri)
        return self.client.presigned_get_object(bucket, key, expires=expires)

    async def aput(self, key: str, data: bytes) -> str:
        return await asyncio.to_thread(self.put, key, data)

    async def aget(self, uri: str) -> bytes:
        return await asyncio.to_thread(self.get, uri)


def _plain_key(key: str) -> bool:
    # Some S3 servers resolve dot segments: "requests/../results/x" must not reach results/.
    return "\\" not in key and not any(p in (".", "..") for p in key.split("/"))


def parse_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc or not parsed.path.strip("/"):
        raise EventError(ErrorCode.PAYLOAD_UNAVAILABLE, f"not an s3://bucket/key reference: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")
