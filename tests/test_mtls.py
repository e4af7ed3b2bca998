"""Mutual TLS between a cluster's members (`--mtls-cert/--mtls-key/--mtls-ca`, common/tls.py): a 1P1D cluster
whose router calls its nodes, and whose prefill node calls its decode node, over TLS with certificates a
test CA signed, its router's public front over TLS too (`baton up --tls-cert/--tls-key/--tls-ca`).
Generations run as ever; a node refuses a plaintext caller, a TLS caller without a member certificate, and
(grpcurl, with the certificate) a caller without the member token."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from cluster_harness import BATON, BatonUp
from test_keys import new_key
from test_launch import Launch, cluster, place, wait_for_output, wait_serving  # noqa: F401 (cluster: a fixture)

from baton.common.keys import read_secret, write_secret
from baton.common.members import MEMBER_METADATA, member_token
from baton.common.tls import client_credentials
from baton.cluster.etcd_server import free_port
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


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
def test_launch_runs_a_closed_placement(cluster, stories_path, stories_llm: LLM, tmp_path):  # noqa: F811
    """A placement whose options say auth, tls and mtls: `baton launch` given this machine's copies of the
    secret and certificates starts a 1P1D cluster that serves a keyed TLS client token-exact, its members over
    mutual TLS. A launch without the member certificates starts nothing and says which flags it lacks."""
    etcd, name, launches = cluster
    cert, key, ca = make_ca_and_member(tmp_path)
    secret = tmp_path / "cluster-secret"
    write_secret(secret)
    port = free_port()
    place(tmp_path, etcd.url, {
        "cluster": name, "model": {"path": str(stories_path)},
        "options": {"auth": True, "tls": True, "mtls": True, "num_kv_blocks": 64},
        "machines": [{"name": "m", "host": "127.0.0.1", "router": {"port": port},
                      "nodes": [{"name": "p", "role": "prefill"}, {"name": "d", "role": "decode"}]}]})
    bare = Launch("m", etcd.url, name, tmp_path, "--cluster-secret-file", str(secret), "--tls-cert", str(cert),
                  "--tls-key", str(key))
    launches.append(bare)
    wait_for_output(bare, "options.mtls: the placement asks for mtls", 60)
    bare.kill()
    assert bare.proc.returncode == 0 and not list((tmp_path / "m").glob("*.log")), bare.output()

    launches.append(Launch("m", etcd.url, name, tmp_path, "--cluster-secret-file", str(secret), "--tls-cert",
                           str(cert), "--tls-key", str(key), "--mtls-cert", str(cert), "--mtls-key", str(key),
                           "--mtls-ca", str(ca)))
    prompt = "Once upon a time"
    want = stories_llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0].token_ids
    address = f"127.0.0.1:{port}"
    wait_serving(address, 120, client_credentials(str(ca)))
    api_key = new_key(types.SimpleNamespace(etcd=etcd.url, cluster=name), secret, "launched")
    with BatonClient(address, timeout=60, api_key=api_key, tls=str(ca)) as client:
        done = client.complete(prompt, max_tokens=12, temperature=0)
    assert done.token_ids == want and (done.finished.prefill_node, done.finished.decode_node) == ("p", "d")
    logs = {p.stem: p.read_text() for p in (tmp_path / "m").glob("*.log")}
    assert set(logs) == {"router", "p", "d"}, logs
    # The nodes are members over mutual TLS: a caller with the member token but without TLS gets nothing.
    address = re.search(r"d serving on (\S+)", logs["d"]).group(1)
    token = f"{MEMBER_METADATA}: {member_token(read_secret(secret))}"
    plain = grpcurl(address, "baton.v1.DecodeNode/GetStats", "-plaintext", "-H", token)
    assert plain.returncode != 0, plain.stdout
    member = grpcurl(address, "baton.v1.DecodeNode/GetStats", "-cacert", str(ca), "-cert", str(cert), "-key",
                     str(key), "-H", token)
    assert member.returncode == 0 and '"total_blocks": 64' in member.stdout, member.stderr
