"""Mutual TLS between a cluster's members (`--mtls-cert/--mtls-key/--mtls-ca`, common/tls.py): a 1P1D cluster
whose router calls its nodes, and whose prefill node calls its decode node, over TLS with certificates a
test CA signed, its router's public front over TLS too (`baton up --tls-cert/--tls-key/--tls-ca`).
Generations run as ever; a node refuses a plaintext caller, a TLS caller without a member certificate, and
(grpcurl, with the certificate) a caller without the member token."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cluster_harness import BATON, BatonUp
from test_keys import new_key

from baton.common.keys import read_secret, write_secret
from baton.common.members import MEMBER_METADATA, member_token
from baton.engine import LLM, SamplingParams
from baton.router.client import BatonClient


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca_and_member(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a member certificate it signed naming 127.0.0.1 (where the nodes register)."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=baton-test-ca",
            "-keyout", "ca.key", "-out", "ca.pem", cwd=folder)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=member", "-keyout", "member.key", "-out",
            "member.csr", cwd=folder)
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "member.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days",
            "1", "-out", "member.pem", "-extfile", "san.ext", cwd=folder)
    return folder / "member.pem", folder / "member.key", folder / "ca.pem"


def grpcurl(address: str, method: str, *flags: str) -> subprocess.CompletedProcess:
    binary = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    return subprocess.run([binary, "-max-time", "3", "-d", "{}", *flags, address, method], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
def test_members_call_each_other_over_mutual_tls_and_outsiders_get_nothing(stories_path, stories_llm: LLM,
                                                                         tmp_path):
    cert, key, ca = make_ca_and_member(tmp_path)
    secret = tmp_path / "cluster-secret"
    write_secret(secret)
    prompt = "Once upon a time"
    want = stories_llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0].token_ids
    mtls = ["--mtls-cert", str(cert), "--mtls-key", str(key), "--mtls-ca", str(ca)]
    # The router's public fronts over TLS too (`baton up` checks its router with --tls-ca).
    tls = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(ca)]
    # Two ranks on each node: the second ranks' KV channels rendezvous under the member secret too.
    with BatonUp(tmp_path, "--model", str(stories_path), "--prefill", "1", "--decode", "1", "--prefill-tp", "2",
                 "--decode-tp", "2", "--auth", "--cluster-secret-file", str(secret), *mtls, *tls) as up:
        api_key = new_key(up, secret, "mtls")
        with BatonClient(up.address, timeout=2, api_key=api_key) as plain, pytest.raises(Exception):
            plain.complete(prompt, max_tokens=2)
        with BatonClient(up.address, timeout=60, api_key=api_key, tls=str(ca)) as client:
            for _ in range(2):  # the second finds its prefix on the decode node (KV events, over mTLS too)
                done = client.complete(prompt, max_tokens=12, temperature=0)
                assert done.token_ids == want and done.finished.prefill_node and done.finished.decode_node
        [decode] = up.nodes("decode")
        token = f"{MEMBER_METADATA}: {member_token(read_secret(secret))}"
        method = "baton.v1.DecodeNode/GetStats"
        plain = grpcurl(decode.address, method, "-plaintext", "-H", token)
        assert plain.returncode != 0, plain.stdout
        anonymous = grpcurl(decode.address, method, "-cacert", str(ca), "-H", token)  # TLS, no client cert
        assert anonymous.returncode != 0, anonymous.stdout
        no_token = grpcurl(decode.address, method, "-cacert", str(ca), "-cert", str(cert), "-key", str(key))
        assert no_token.returncode != 0 and "Unauthenticated" in no_token.stderr, no_token.stderr
        member = grpcurl(decode.address, method, "-cacert", str(ca), "-cert", str(cert), "-key", str(key), "-H",
                         token)
        assert member.returncode == 0 and '"total_blocks"' in member.stdout, member.stderr
    # The three files go together; a missing one is refused at start, naming the option.
    done = subprocess.run([BATON, "up", "--mtls-cert", str(cert), "--mtls-key", str(key)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "mtls_cert" in done.stderr, done.stderr
