"""Webhook signatures: exactly the forge's deliveries pass; everything else fails closed."""

import hashlib
import hmac

import pytest
from werkzeug.datastructures import EnvironHeaders, Headers

from ccci.intake.signature import verify_signature
from tests.fakes import sign

SECRET = "s3cret-webhook-key"
BODY = b'{"action":"created","comment":{"body":"!testme"}}'
SHA256 = hmac.new(SECRET.encode(), BODY, hashlib.sha256).hexdigest()
SHA1 = hmac.new(SECRET.encode(), BODY, hashlib.sha1).hexdigest()
OTHER = hmac.new(SECRET.encode(), BODY + b" ", hashlib.sha256).hexdigest()
WRONG_KEY = hmac.new(b"not-the-secret", BODY, hashlib.sha256).hexdigest()

ROWS = [
    # what the forges really send
    ("full gitea header set", sign(BODY, SECRET), True),
    ("full forgejo header set", sign(BODY, SECRET, forge="forgejo"), True),
    ("x-gitea-signature alone", {"X-Gitea-Signature": SHA256}, True),
    ("x-forgejo-signature alone", {"X-Forgejo-Signature": SHA256}, True),
    ("x-gogs-signature alone", {"X-Gogs-Signature": SHA256}, True),
    ("x-hub-signature-256 alone", {"X-Hub-Signature-256": "sha256=" + SHA256}, True),
    ("lower-case header name", {"x-gitea-signature": SHA256}, True),
    ("upper-case hex decodes to the same digest", {"X-Gitea-Signature": SHA256.upper()}, True),
    ("surrounding whitespace", {"X-Gitea-Signature": f" {SHA256} "}, True),
    ("sha256 and sha1 both right", {"X-Gitea-Signature": SHA256, "X-Hub-Signature": "sha1=" + SHA1}, True),
    # fail closed
    ("no signature header", {"Content-Type": "application/json"}, False),
    ("empty gitea header", {"X-Gitea-Signature": ""}, False),
    ("empty hub header", {"X-Hub-Signature-256": "sha256="}, False),
    ("hub header without prefix", {"X-Hub-Signature-256": SHA256}, False),
    ("gitea header with prefix", {"X-Gitea-Signature": "sha256=" + SHA256}, False),
    ("upper-case prefix", {"X-Hub-Signature-256": "SHA256=" + SHA256}, False),
    ("signature over a different body", {"X-Gitea-Signature": OTHER}, False),
    ("signature with another key", {"X-Gitea-Signature": WRONG_KEY}, False),
    ("non-hex", {"X-Gitea-Signature": "z" * 64}, False),
    ("too short", {"X-Gitea-Signature": SHA256[:-2]}, False),
    ("too long", {"X-Gitea-Signature": SHA256 + "00"}, False),
    ("hex with inner spaces", {"X-Gitea-Signature": SHA256[:32] + " " + SHA256[32:]}, False),
    ("sha1 header only", {"X-Hub-Signature": "sha1=" + SHA1}, False),
    ("sha1 digest in a sha256 header", {"X-Gitea-Signature": SHA1}, False),
    ("one good, one forged", {"X-Gitea-Signature": SHA256, "X-Forgejo-Signature": OTHER}, False),
    ("one good, one empty", {"X-Gitea-Signature": SHA256, "X-Hub-Signature-256": "sha256="}, False),
    ("good sha256, forged sha1", {"X-Gitea-Signature": SHA256, "X-Hub-Signature": "sha1=" + "0" * 40}, False),
    ("same name twice, second forged", {"X-Gitea-Signature": SHA256, "x-gitea-signature": OTHER}, False),
    ("two values folded into one", {"X-Gitea-Signature": f"{SHA256}, {SHA256}"}, False),
    ("empty-secret hook delivery", sign(BODY, ""), False),
]


@pytest.mark.parametrize(("headers", "ok"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_verify_signature(headers, ok):
    assert verify_signature(headers, BODY, SECRET) is ok


@pytest.mark.parametrize("secret", ["", None])
def test_no_secret_configured_refuses_everything(secret):
    assert verify_signature(sign(BODY, SECRET), BODY, secret) is False
    assert verify_signature(sign(BODY, ""), BODY, secret) is False


def test_body_must_be_the_raw_bytes():
    assert verify_signature(sign(BODY, SECRET), BODY.replace(b":", b": "), SECRET) is False


def test_unicode_secret():
    secret = "clé-secrète-🔑"
    assert verify_signature(sign(BODY, secret), BODY, secret) is True


def test_werkzeug_headers():
    headers = Headers(sign(BODY, SECRET, forge="forgejo"))
    assert verify_signature(headers, BODY, SECRET) is True
    environ = {"HTTP_" + k.upper().replace("-", "_"): v for k, v in sign(BODY, SECRET).items()}
    assert verify_signature(EnvironHeaders(environ), BODY, SECRET) is True
    environ["HTTP_X_FORGEJO_SIGNATURE"] = OTHER
    assert verify_signature(EnvironHeaders(environ), BODY, SECRET) is False


def test_repeated_header_in_werkzeug_headers():
    headers = Headers([("X-Gitea-Signature", SHA256), ("X-Gitea-Signature", OTHER)])
    assert verify_signature(headers, BODY, SECRET) is False
