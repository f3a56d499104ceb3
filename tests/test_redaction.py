"""No secret a user gives reaches a message, a repr, a log record or a ``stats()`` snapshot, whichever way it came
in: the environment, keyword options, a URL's query (an Azure SAS token, a pre-signed URL) or its userinfo.

Against servers that check credentials (Azurite, moto with authentication), so the secrets are really used and
really refused; and the same SAS-token and pre-signed URLs, unaltered, are read."""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from typing import Any

import pytest

import aloader
from aloader.datasets import ObjectDataset
from aloader.errors import AccessDeniedError, StorageError
from aloader.storage import RetryPolicy
from aloader.storage._redact import redact, redact_url
from tests.conftest import Driver

pytestmark = pytest.mark.usefixtures("object_server", "s3", "s3_with_auth", "azurite")

FAST = RetryPolicy(max_attempts=2, base_delay=0.001, max_delay=0.01)
CONTAINER = "redaction"
OBJECTS = {f"objs/{i}.bin": f"object {i}".encode() for i in range(3)}
WRONG_KEY = "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3Jvbmc="  # well-formed base64, not Azurite's key
WRONG_SECRET = "wrong-Secret-Access-Key-000000"
PASSWORD = "Hunter2-Passw0rd-xyz"


@pytest.fixture(scope="module")
def azure(azurite: Any) -> Any:
    azurite.put(CONTAINER, OBJECTS)
    return azurite


@pytest.fixture(scope="module")
def s3_auth(s3_with_auth: Any) -> Any:
    """moto checking signatures: it knows no key, so every request is refused (as a wrong key would be)."""
    return s3_with_auth


@pytest.fixture(scope="module")
def s3_open(s3: Any) -> Any:
    s3.put(CONTAINER, OBJECTS)
    return s3


def shown_by(driver: Driver, dataset: ObjectDataset, caplog: pytest.LogCaptureFixture) -> tuple[list[Any], list[str]]:
    """(the batches read, everything aloader showed while reading ``dataset``: errors, reprs, logs, stats)."""
    # Failed samples are skipped, and so logged: the log is checked too.
    loader = aloader.DataLoader(dataset, batch_size=1, max_failures=100)
    outcomes = driver.outcomes(loader)
    texts = [repr(dataset), repr(dataset.store), repr(loader.stats()), str(loader.stats())]
    for kind, value in outcomes:
        if kind == "err":
            texts += [str(value), repr(value), str(value.__cause__), repr(value.__cause__)]
    texts += [record.getMessage() for record in caplog.records]
    texts += [str(record.exc_info[1]) for record in caplog.records if record.exc_info]
    return [value for kind, value in outcomes if kind == "ok"], texts


def assert_hidden(secrets: list[str], texts: list[str]) -> None:
    leaks = [(secret, text) for secret in secrets for text in texts if secret in text]
    assert not leaks, leaks


@pytest.fixture(autouse=True)
def debug_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # retries are logged at DEBUG: capture every record


def test_keyword_options(driver: Driver, azure: Any, s3_auth: Any, caplog: pytest.LogCaptureFixture) -> None:
    for url, options, secret in [
        (f"az://{CONTAINER}/objs/0.bin", azure.options(account_key=WRONG_KEY), WRONG_KEY),
        (f"s3://{CONTAINER}/objs/0.bin", s3_auth.options(secret_access_key=WRONG_SECRET), WRONG_SECRET),
    ]:
        batches, texts = shown_by(driver, ObjectDataset([url], storage_options=options, retry=FAST), caplog)
        assert batches == [] and any("access denied" in text for text in texts)
        assert_hidden([secret], texts)


def test_environment(
    driver: Driver, azure: Any, s3_auth: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {**azure.env(), "AZURE_STORAGE_ACCOUNT_KEY": WRONG_KEY}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", WRONG_SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_auth.options()["access_key_id"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_auth.endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    for url in [f"az://{CONTAINER}/objs/0.bin", f"s3://{CONTAINER}/objs/0.bin"]:
        batches, texts = shown_by(driver, ObjectDataset([url], retry=FAST), caplog)
        assert batches == [] and any("access denied" in text for text in texts)
        assert_hidden([WRONG_KEY, WRONG_SECRET], texts)


def test_azure_sas_token_in_the_url(driver: Driver, azure: Any, caplog: pytest.LogCaptureFixture) -> None:
    sas = azure.sas_token(CONTAINER)
    signature = next(part.split("=", 1)[1] for part in sas.split("&") if part.startswith("sig="))
    options = {"account_name": "devstoreaccount1", "endpoint": azure.endpoint}  # no key: the SAS token authorises
    # A prefix with a SAS token is listed, and its objects read, with that token.
    dataset = ObjectDataset(f"az://{CONTAINER}/objs/?{sas}", storage_options=options, retry=FAST)
    batches, texts = shown_by(driver, dataset, caplog)
    assert [batch[0] for batch in batches] == [OBJECTS[key] for key in sorted(OBJECTS)]
    assert_hidden([signature], texts)
    # A token whose signature is wrong is refused, and neither signature is shown.
    forged = sas.replace(signature, WRONG_KEY.replace("=", "%3D"))
    dataset = ObjectDataset([f"az://{CONTAINER}/objs/0.bin?{forged}"], storage_options=options, retry=FAST)
    batches, texts = shown_by(driver, dataset, caplog)
    assert batches == [] and any("access denied" in text for text in texts)
    assert_hidden([signature, WRONG_KEY.replace("=", "%3D")], texts)


def presigned(server: Any, key: str) -> tuple[str, str]:
    """(a pre-signed GET URL of ``key`` on ``server``, its signature)."""
    client = server.client()
    url = client.generate_presigned_url("get_object", Params={"Bucket": CONTAINER, "Key": key}, ExpiresIn=600)
    client.close()
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    signature = (query.get("X-Amz-Signature") or query["Signature"])[0]  # SigV4 or SigV2, as boto3 chose
    return url, urllib.parse.quote(signature, safe="") if signature not in url else signature


def test_presigned_http_url(driver: Driver, s3_open: Any, s3_auth: Any, caplog: pytest.LogCaptureFixture) -> None:
    url, signature = presigned(s3_open, "objs/1.bin")
    # A server that knows no key refuses it (moto answers a pre-signed URL it cannot verify with HTTP 500, not
    # 403: the error kind is moto's; what is checked here is that the signature is not shown).
    refused, refused_signature = presigned(s3_auth, "objs/1.bin")
    batches, texts = shown_by(driver, ObjectDataset([url, refused], retry=FAST), caplog)
    assert batches == [[OBJECTS["objs/1.bin"]]] and any("skipped a sample" in text for text in texts)
    assert_hidden([signature, refused_signature, s3_open.options()["secret_access_key"]], texts)


def test_userinfo_in_the_url(driver: Driver, object_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    url = object_server.url("objs/missing.bin").replace("http://", f"http://reader:{PASSWORD}@")
    batches, texts = shown_by(driver, ObjectDataset([url], retry=FAST), caplog)
    assert batches == [] and any("objs/missing.bin" in text for text in texts)
    assert_hidden([PASSWORD], texts)


def test_unsupported_urls_do_not_echo_secrets() -> None:
    for url in [f"s3://bucket/key?secret={PASSWORD}", f"ftp://user:{PASSWORD}@host/key", f"gs://b/k?token={PASSWORD}"]:
        with pytest.raises(StorageError) as raised:
            asyncio.run(ObjectDataset([url], retry=FAST)[0])
        assert PASSWORD not in str(raised.value) and PASSWORD not in repr(raised.value)


def test_redact_url() -> None:
    assert redact_url("see https://u:p@host/k?X-Amz-Signature=abc&b=1 now") == (
        "see https://<redacted>@host/k?X-Amz-Signature=<redacted>&b=<redacted> now"
    )
    assert redact_url("az://c/k?sv=2020&sig=xyz") == "az://c/k?sv=<redacted>&sig=<redacted>"
    assert redact_url("http://host/k?opaque") == "http://host/k?<redacted>"
    assert redact_url("s3://bucket/key and /local/path") == "s3://bucket/key and /local/path"
    assert redact("key is Secret-1234", ["Secret-1234"]) == "key is <redacted>"
    with pytest.raises(AccessDeniedError):
        raise AccessDeniedError("x")
