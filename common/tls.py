"""TLS for the router's public fronts (`--tls-cert`, `--tls-key`): the baton.v1 and KServe gRPC services and the
OpenAI HTTP front then answer TLS only. Clients trust the certificate's issuer (`BatonClient(..., tls=CA_FILE)`,
`openai.OpenAI(base_url="https://...", http_client=openai.DefaultHttpxClient(verify=CA_FILE))`, `grpcurl -cacert
CA_FILE`)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: str  # PEM: the certificate chain, the server's first
    key: str  # PEM: its private key

    def __post_init__(self) -> None:
        for name in ("cert", "key"):
            path = Path(getattr(self, name))
            if not path.is_file():
                raise ValueError(f"tls_{name}: no such file: {path}")
        self.ssl_context()  # a key that does not match its certificate is refused here, not at the first client

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(Path(self.key).read_bytes(), Path(self.cert).read_bytes())])

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"tls_cert: {self.cert} and {self.key} do not make a certificate and its key: "
                             f"{e}") from None
        return context


@dataclass(frozen=True, slots=True)
class MemberTls:
    """Mutual TLS between a cluster's members (`--mtls-cert`, `--mtls-key`, `--mtls-ca`): a node's internal
    services answer only callers that present a certificate the cluster's CA signed, and routers and nodes call
    nodes with theirs. Nodes are dialled at the addresses they register, so a member certificate names them
    (subjectAltName: their IP addresses or host names)."""

    cert: str
    key: str
    ca: str

    def __post_init__(self) -> None:
        for name in ("cert", "key", "ca"):
            path = Path(getattr(self, name))
            if not path.is_file():
                raise ValueError(f"mtls_{name}: no such file: {path}")
        TlsFiles(self.cert, self.key)  # the key matches its certificate

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(Path(self.key).read_bytes(), Path(self.cert).read_bytes())],
                                           root_certificates=Path(self.ca).read_bytes(), require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(Path(self.ca).read_bytes(), Path(self.key).read_bytes(),
                                            Path(self.cert).read_bytes())


def client_credentials(tls: bool | str) -> grpc.ChannelCredentials:
    """What a client trusts: `True` for the system's roots, a path for a PEM file of the issuers to trust."""
    return grpc.ssl_channel_credentials(Path(tls).read_bytes() if isinstance(tls, str) else None)
