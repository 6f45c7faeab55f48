"""Authentication of the Node gRPC API: the bearer token (made 0600 on first start), TLS and
mutual TLS, and the refusal to listen in the clear on a non-loopback address."""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from common import auth
from common.pb import node_pb2 as npb
from common.pb import node_pb2_grpc as npb_grpc
from tests.stack import BIN, Agent
from tests.support import free_port, need

pytestmark = pytest.mark.integration


def test_token_is_made_private_and_required(agent: Agent) -> None:
    mode = stat.S_IMODE(os.stat(agent.token_path).st_mode)
    assert mode == 0o600
    token = auth.read_token(agent.token_path)
    assert token and len(token) >= 32

    bare = npb_grpc.NodeStub(grpc.insecure_channel(agent.api))
    with pytest.raises(grpc.RpcError) as exc:
        bare.List(npb.ListRequest(), timeout=5)
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    wrong = npb_grpc.NodeStub(grpc.intercept_channel(
        grpc.insecure_channel(agent.api), *auth.grpc_client_interceptors("x" * 43)))
    with pytest.raises(grpc.RpcError) as exc:
        wrong.List(npb.ListRequest(), timeout=5)
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # streams are guarded too
    with pytest.raises(grpc.RpcError) as exc:
        next(iter(bare.Watch(npb.WatchRequest(), timeout=5)))
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert agent.stub.List(npb.ListRequest(), timeout=5) is not None   # with the token

    # health probes need no token
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    reply = health_pb2_grpc.HealthStub(grpc.insecure_channel(agent.api)).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING

    # rikletctl reads the same file; a wrong token is a clear refusal
    assert agent.ctl("get", "pods").returncode == 0
    env = {**agent.env, "RIKLET_TOKEN": "y" * 43}
    res = subprocess.run([os.path.join(BIN, "rikletctl"), "get", "pods"], env=env, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 1 and "token" in res.stderr


def test_the_token_survives_restarts(agent: Agent) -> None:
    before = auth.read_token(agent.token_path)
    agent.supervisorctl("restart", "riklet:manager")
    agent.wait_ready()
    assert auth.read_token(agent.token_path) == before


def test_clear_text_on_a_public_address_is_refused() -> None:
    base = tempfile.mkdtemp(prefix="rkauth", dir="/tmp")
    env = {**os.environ, "RIKLET_RUN_DIR": f"{base}/run", "RIKLET_STATE_DIR": f"{base}/state",
           "RIKLET_API_ADDRESS": f"0.0.0.0:{free_port()}", "NODE_PORT": "0"}
    res = subprocess.run([os.path.join(BIN, "riklet-manager")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode != 0
    assert "without TLS" in res.stderr and "--insecure" in res.stderr


# -- TLS --------------------------------------------------------------------------------------


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki() -> Iterator[dict[str, str]]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    need(subprocess.run(["which", "openssl"], capture_output=True).returncode == 0, "openssl is needed")
    d = tempfile.mkdtemp(prefix="rkpki", dir="/tmp")
    p = {k: os.path.join(d, f"{k}.pem") for k in ("ca", "ca_key", "server", "server_key", "client",
                                                  "client_key")}
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", p["ca_key"], "-out", p["ca"],
             "-days", "2", "-subj", "/CN=riklet test CA")
    for who, subj in (("server", "/CN=127.0.0.1"), ("client", "/CN=scheduler")):
        csr = os.path.join(d, f"{who}.csr")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", p[f"{who}_key"], "-out", csr,
                 "-subj", subj)
        ext = os.path.join(d, f"{who}.ext")
        with open(ext, "w") as fh:
            fh.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n" if who == "server"
                     else "extendedKeyUsage=clientAuth\n")
        _openssl("x509", "-req", "-in", csr, "-CA", p["ca"], "-CAkey", p["ca_key"], "-CAcreateserial",
                 "-out", p[who], "-days", "2", "-extfile", ext)
    yield p


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _tls_agent(pki: dict[str, str], mutual: bool) -> Agent:
    yaml = f"tls:\n  cert_file: {pki['server']}\n  key_file: {pki['server_key']}\n"
    if mutual:
        yaml += f"  ca_file: {pki['ca']}\n"
    a = Agent(yaml)
    a.env["RIKLET_CLIENT_CA"] = pki["ca"]
    if mutual:
        a.env["RIKLET_CLIENT_CERT"] = pki["client"]
        a.env["RIKLET_CLIENT_KEY"] = pki["client_key"]
    creds = grpc.ssl_channel_credentials(_read(pki["ca"]), _read(pki["client_key"]) if mutual else None,
                                         _read(pki["client"]) if mutual else None)
    a.channel = grpc.intercept_channel(grpc.secure_channel(a.api, creds), *auth.grpc_client_interceptors(
        lambda: auth.read_token(a.token_path)))
    a.stub = npb_grpc.NodeStub(a.channel)
    return a


def test_tls_serves_the_api(pki: dict[str, str]) -> None:
    a = _tls_agent(pki, mutual=False)
    try:
        a.start()
        assert a.ctl("get", "pods").returncode == 0           # rikletctl with RIKLET_CLIENT_CA
        plain = npb_grpc.NodeStub(grpc.intercept_channel(grpc.insecure_channel(a.api),
                                                          *auth.grpc_client_interceptors(
                                                              auth.read_token(a.token_path))))
        with pytest.raises(grpc.RpcError) as exc:
            plain.List(npb.ListRequest(), timeout=5)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE  # no clear text on a TLS port
    finally:
        a.close()


def test_mutual_tls_wants_a_client_certificate(pki: dict[str, str]) -> None:
    a = _tls_agent(pki, mutual=True)
    try:
        a.start()
        assert a.ctl("get", "pods").returncode == 0           # with the client certificate
        anonymous: Any = npb_grpc.NodeStub(grpc.intercept_channel(
            grpc.secure_channel(a.api, grpc.ssl_channel_credentials(_read(pki["ca"]))),
            *auth.grpc_client_interceptors(auth.read_token(a.token_path))))
        with pytest.raises(grpc.RpcError) as exc:
            anonymous.List(npb.ListRequest(), timeout=5)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails
        env = {k: v for k, v in a.env.items() if k not in ("RIKLET_CLIENT_CERT", "RIKLET_CLIENT_KEY")}
        res = subprocess.run([os.path.join(BIN, "rikletctl"), "get", "pods"], env=env,
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 3
    finally:
        a.close()
