"""aloader.storage against real servers: local files, moto's S3 server and an HTTP object server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import pickle
from pathlib import Path
from typing import Any

import pytest

from aloader import storage
from aloader.bench.objectserver import Faults, ObjectServer
from aloader.errors import AloaderError
from aloader.storage import (
    AccessDeniedError,
    BucketNotFoundError,
    ObjectNotFoundError,
    RetryPolicy,
    StorageError,
    Store,
    TransientStorageError,
    UnsupportedURLError,
)
from tests.servers import KEYS

# The servers start before any test's leak snapshot (some tests pick a server by parameter, inside the test).
pytestmark = pytest.mark.usefixtures("object_server", "s3")

FAST = RetryPolicy(max_attempts=6, base_delay=0.001, max_delay=0.01)
OBJECTS = {f"data/part-{i:03d}.bin": bytes([i]) * (100 + i) for i in range(12)}
OBJECTS["data/other.txt"] = b"hello"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture
def local_root(tmp_path: Path) -> Path:
    for key, data in OBJECTS.items():
        path = tmp_path / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return tmp_path


@pytest.fixture
def http_objects(object_server: ObjectServer) -> Any:
    object_server.objects = dict(OBJECTS)
    object_server.faults = Faults()
    object_server.latency = 0.0
    object_server.reset_counters()
    yield object_server
    object_server.objects = {}
    object_server.faults = Faults()
    object_server.latency = 0.0


@pytest.fixture(scope="module")
def s3_objects(s3: Any) -> Any:
    s3.put("storage-tests", OBJECTS)
    return s3


def locations(kind: str, request: pytest.FixtureRequest) -> tuple[str, Store]:
    """(base URL, store) for one kind of storage."""
    if kind == "local":
        return str(request.getfixturevalue("local_root")), Store(retry=FAST)
    if kind == "file":
        return f"file://{request.getfixturevalue('local_root')}", Store(retry=FAST)
    if kind == "http":
        return request.getfixturevalue("http_objects").base_url, Store(retry=FAST)
    server = request.getfixturevalue("s3_objects")
    return "s3://storage-tests", Store(server.options(), retry=FAST)


KINDS = ["local", "file", "s3", "http"]


@pytest.mark.parametrize("kind", KINDS)
def test_read_range_and_stat(kind: str, request: pytest.FixtureRequest) -> None:
    base, store = locations(kind, request)
    url = f"{base}/data/part-007.bin"
    expected = OBJECTS["data/part-007.bin"]

    async def main() -> None:
        assert await store.read(url) == expected
        assert await store.read_range(url, 10, 20) == expected[10:20]
        assert await store.read_range(url, 5, 5) == b""
        info = await store.stat(url)
        assert (info.url, info.size) == (url, len(expected))
        chunks = [chunk async for chunk in store.stream(url, chunk_size=16)]
        assert b"".join(chunks) == expected

    run(main())


@pytest.mark.parametrize("kind", ["local", "file", "s3"])
def test_list_prefix_is_sorted_and_a_string_prefix(kind: str, request: pytest.FixtureRequest) -> None:
    base, store = locations(kind, request)
    expected_parts = [f"{base}/{key}" for key in sorted(OBJECTS) if key.startswith("data/part-")]
    assert run(store.list_prefix(f"{base}/data/part-")) == expected_parts
    assert run(store.list_prefix(f"{base}/data/")) == [f"{base}/{key}" for key in sorted(OBJECTS)]


def test_module_functions_use_storage_options(s3_objects: Any) -> None:
    url = "s3://storage-tests/data/other.txt"
    options = s3_objects.options()
    assert run(storage.read(url, storage_options=options)) == b"hello"
    assert run(storage.read_range(url, 1, 3, storage_options=options)) == b"el"
    assert run(storage.stat(url, storage_options=options)).size == 5
    assert run(storage.list_prefix("s3://storage-tests/data/o", storage_options=options)) == [url]


def test_http_listing_is_unsupported(http_objects: ObjectServer) -> None:
    with pytest.raises(UnsupportedURLError, match="HTTP servers offer no listing"):
        run(Store().list_prefix(http_objects.base_url + "/data/"))


@pytest.mark.parametrize("kind", KINDS)
def test_missing_object(kind: str, request: pytest.FixtureRequest) -> None:
    base, store = locations(kind, request)
    url = f"{base}/data/missing.bin"
    with pytest.raises(ObjectNotFoundError) as info:
        run(store.read(url))
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, AloaderError)
    assert url in str(info.value) and info.value.url == url
    with pytest.raises(ObjectNotFoundError):
        run(store.stat(url))


def test_missing_bucket(s3_objects: Any) -> None:
    store = Store(s3_objects.options(), retry=FAST)
    with pytest.raises(BucketNotFoundError, match=r"the bucket of s3://no-such-bucket/key does not exist"):
        run(store.read("s3://no-such-bucket/key"))
    with pytest.raises(BucketNotFoundError, match="no-such-bucket"):
        run(store.list_prefix("s3://no-such-bucket/prefix/"))


def test_bad_credentials_are_refused_without_showing_the_secret(s3_with_auth: Any, caplog: Any) -> None:
    secret = "Wr0ng-Secret-Do-Not-Print-42"
    options = s3_with_auth.options(access_key_id="AKIAWRONGKEY", secret_access_key=secret)
    store = Store(options, retry=FAST)
    caplog.set_level(logging.DEBUG, logger="aloader.storage")
    with pytest.raises(AccessDeniedError) as info:
        run(store.read("s3://any-bucket/key"))
    assert isinstance(info.value, PermissionError)
    assert "s3://any-bucket/key" in str(info.value)
    for text in (str(info.value), repr(store), caplog.text):
        assert secret not in text
    assert "secret_access_key" in repr(store)  # the option's name is shown, never its value


def test_transient_faults_are_retried(http_objects: ObjectServer) -> None:
    http_objects.faults = Faults(every=2, times=2, kinds=("503", "429", "drop", "cut"))
    store = Store(retry=FAST)

    async def main() -> list[bytes]:
        return await asyncio.gather(*(store.read(http_objects.url(key)) for key in OBJECTS))

    assert run(main()) == list(OBJECTS.values())
    assert http_objects.faults_injected > 0


def test_streams_resume_after_a_cut_connection(http_objects: ObjectServer) -> None:
    http_objects.faults = Faults(every=1, times=3, kinds=("cut",))
    store = Store(retry=FAST)

    async def main() -> bytes:
        return b"".join([chunk async for chunk in store.stream(http_objects.url("data/part-011.bin"), chunk_size=8)])

    assert run(main()) == OBJECTS["data/part-011.bin"]
    assert http_objects.faults_injected == 3


def test_retries_are_bounded(http_objects: ObjectServer, caplog: Any) -> None:
    http_objects.faults = Faults(every=1, times=1000, kinds=("503",))
    store = Store(retry=RetryPolicy(max_attempts=3, base_delay=0.001))
    url = http_objects.url("data/other.txt")
    caplog.set_level(logging.DEBUG, logger="aloader.storage")
    with pytest.raises(TransientStorageError, match=r"failed after 3 attempts, the last with: HTTP 503") as info:
        run(store.read(url))
    assert info.value.url == url
    assert http_objects.requests == 3
    assert caplog.text.count("retrying reading") == 2


def test_permanent_errors_are_not_retried(http_objects: ObjectServer) -> None:
    with pytest.raises(ObjectNotFoundError):
        run(Store(retry=FAST).read(http_objects.url("nope")))
    assert http_objects.requests == 1


def test_timeouts_are_transient(http_objects: ObjectServer) -> None:
    http_objects.latency = 2.0  # longer than the client's timeout below
    store = Store({"timeout": "100ms"}, retry=RetryPolicy(max_attempts=2, base_delay=0.0))
    with pytest.raises(TransientStorageError, match="after 2 attempts") as info:
        run(store.read(http_objects.url("data/other.txt")))
    assert "timed out" in str(info.value) or "timeout" in str(info.value).lower()


def test_connection_refused_is_transient() -> None:
    with pytest.raises(TransientStorageError, match="after 2 attempts"):
        run(Store(retry=RetryPolicy(max_attempts=2, base_delay=0.0)).read("http://127.0.0.1:1/key"))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://host/key", "unsupported URL scheme 'ftp'"),
        ("s3:///key", "missing bucket or host"),
        (
            "s3://bucket/key?X-Amz-Signature=abcdef",
            r"query are not supported for s3://.*: s3://bucket/key\?X-Amz-Signature=<redacted>",
        ),
        ("https://host/key#part", "fragment are not supported"),
        ("file://remote-host/path", "file URLs must be"),
    ],
)
def test_unsupported_urls(url: str, message: str) -> None:
    with pytest.raises(UnsupportedURLError, match=message) as info:
        run(Store().read(url))
    assert isinstance(info.value, ValueError)
    assert "abcdef" not in str(info.value)


def test_unknown_option_names_the_key_not_the_value(s3: Any) -> None:
    store = Store({"no_such_option": "value-that-is-secret"})
    with pytest.raises(StorageError) as info:
        run(store.read("s3://bucket/key"))
    assert "value-that-is-secret" not in str(info.value)


def test_retry_policy_checks() -> None:
    with pytest.raises(ValueError, match="max_attempts should be a positive integer"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="base_delay and max_delay should be >= 0"):
        RetryPolicy(base_delay=-1)
    policy = RetryPolicy(base_delay=0.1, max_delay=0.3)
    assert all(0 <= policy.delay(n) <= 0.3 for n in range(10))


def test_store_pickles_without_its_clients(s3_objects: Any) -> None:
    store = Store(s3_objects.options(), retry=FAST)
    assert run(store.read("s3://storage-tests/data/other.txt")) == b"hello"
    clone = pickle.loads(pickle.dumps(store))
    assert clone._clients == {}
    assert clone.retry == FAST
    assert run(clone.read("s3://storage-tests/data/other.txt")) == b"hello"


def test_public_names() -> None:
    for name in storage.__all__:
        assert hasattr(storage, name), name


def test_credentials_from_an_aws_config_file(s3_objects: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from obstore.auth.boto3 import Boto3CredentialProvider

    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[training]\naws_access_key_id = {KEYS['access_key_id']}\n"
        f"aws_secret_access_key = {KEYS['secret_access_key']}\n"
    )
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    store = Store({"endpoint": s3_objects.endpoint, "region": "us-east-1", "profile": "training"}, retry=FAST)
    assert run(store.read("s3://storage-tests/data/other.txt")) == b"hello"
    assert isinstance(store._clients["s3://storage-tests"].credential_provider, Boto3CredentialProvider)


def _read_in_child(url: str, results: Any) -> None:
    try:
        results.put(("ok", run(Store(retry=FAST).read(url))))
    except StorageError as exc:
        results.put(("err", str(exc)))


def test_a_forked_child_gets_a_clear_error_not_a_hang(http_objects: ObjectServer) -> None:
    import multiprocessing

    url = http_objects.url("data/other.txt")
    assert run(Store(retry=FAST).read(url)) == b"hello"  # obstore's runtime now runs in this process
    context = multiprocessing.get_context("fork")
    results = context.SimpleQueue()
    child = context.Process(target=_read_in_child, args=(url, results))
    child.start()
    child.join()
    kind, message = results.get()
    results.close()
    child.close()
    assert kind == "err" and "forked after object-store reads began" in message and "'spawn'" in message


def test_credentials_and_endpoint_from_the_environment(s3_objects: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_objects.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEYS["access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", KEYS["secret_access_key"])
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    assert run(Store(retry=FAST).read("s3://storage-tests/data/other.txt")) == b"hello"


def test_anonymous_access(s3_objects: Any) -> None:
    s3_objects.put("public-data", {"data/other.txt": b"hello"}, acl="public-read")
    anonymous = Store({"endpoint": s3_objects.endpoint, "region": "us-east-1", "anonymous": True}, retry=FAST)
    assert run(anonymous.read("s3://public-data/data/other.txt")) == b"hello"
    with pytest.raises(AccessDeniedError):  # moto checks the ACL of unsigned requests: this bucket is private
        run(anonymous.read("s3://storage-tests/data/other.txt"))


@pytest.mark.parametrize(
    ("url", "options", "store_type"),
    [
        ("gs://a-bucket/key", {"skip_signature": True}, "GCSStore"),
        ("az://a-container/key", {"account_name": "account", "skip_signature": True}, "AzureStore"),
        ("https://example.invalid/key", {}, "HTTPStore"),
    ],
)
def test_clients_for_other_stores_are_made_without_network(url: str, options: dict[str, Any], store_type: str) -> None:
    from aloader.storage import parse_url

    client = Store(options)._client(parse_url(url))  # making a client sends no request
    assert type(client).__name__ == store_type


def test_a_stream_is_not_resumed_into_a_changed_object(http_objects: ObjectServer) -> None:
    key = "data/part-011.bin"
    http_objects.faults = Faults(every=1, times=1, kinds=("cut",))
    store = Store(retry=FAST)

    async def main() -> None:
        chunks = store.stream(http_objects.url(key), chunk_size=8)
        await anext(chunks)  # the first bytes of the old version...
        http_objects.objects[key] = b"a new version"  # ... then the object is replaced before the cut is resumed
        with pytest.raises(StorageError, match=r"changed while it was being read \(HTTP 412\)"):
            async for _ in chunks:
                pass

    run(main())
