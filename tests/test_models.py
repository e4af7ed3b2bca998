"""Several models behind one router (`baton up --config`): the second model's nodes register its name, aliases
and checkpoint folder in etcd, and the router, given only the first, serves it too. Each model token-exact against
the offline engine on its checkpoint, through baton.v1 and the OpenAI front; each listed everywhere."""

from __future__ import annotations

import grpc
import pytest
import yaml

from cluster_harness import BatonUp
from test_stories import PROMPTS

from baton.cluster.etcd_server import free_port
from baton.engine import LLM, SamplingParams
from baton.router.client import BatonClient, InvalidArgument, NotFound
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from test_architectures import VARIANTS, write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("models") / "tiny-llama", VARIANTS["llama-gqa2"])


@pytest.fixture(scope="module")
def two_models(stories_path, tiny, tmp_path_factory):
    """`baton up --config`: stories260K on a prefill and a decode node, tiny-llama on a colocated node under
    the name "tiny" with the alias "small". The router is given the first model only: it finds the second in
    the membership (its nodes register its name, aliases and folder)."""
    logs = tmp_path_factory.mktemp("two-models")
    config = logs / "models.yaml"
    config.write_text(yaml.safe_dump({"models": [
        {"model": str(stories_path), "prefill": 1, "decode": 1},
        {"model": str(tiny), "name": "tiny", "aliases": ["small"], "colocated": 1}]}))
    with BatonUp(logs, "--config", str(config), "--http-port", str(free_port())) as up:
        yield up


def _offline(llm: LLM, prompt: str, **params) -> str:
    [out] = llm.generate([prompt], SamplingParams(**params))
    return out.text


def test_each_model_is_served_token_exact(two_models, stories_llm: LLM, tiny):
    tiny_llm = LLM(str(tiny))
    with BatonClient(two_models.address, timeout=60) as client:
        for model, llm in (("stories260K", stories_llm), ("tiny", tiny_llm), ("small", tiny_llm)):
            for prompt in PROMPTS[:2]:
                got = client.complete(prompt, model=model, max_tokens=16, temperature=0.0)
                assert got.text == _offline(llm, prompt, max_tokens=16, temperature=0.0), (model, prompt)
                assert got.finished.decode_node.startswith("tiny-colocated" if llm is tiny_llm else "decode")
    with openai.OpenAI(base_url=two_models.http, api_key="unused", max_retries=0, timeout=60) as http:
        got = http.completions.create(model="small", prompt=PROMPTS[2], max_tokens=12, temperature=0)
        assert got.model == "tiny" and got.choices[0].text == _offline(tiny_llm, PROMPTS[2], max_tokens=12,
                                                                       temperature=0.0)


def test_every_listing_agrees(two_models):
    with grpc.insecure_channel(two_models.address) as channel:
        listed = sorted(m.id for m in baton_pb2_grpc.BatonStub(channel).ListModels(pb.ListModelsRequest()).models)
    assert listed == ["stories260K", "tiny"]
    with openai.OpenAI(base_url=two_models.http, api_key="unused", max_retries=0) as http:
        models = {m.id: m for m in http.models.list().data}
    assert sorted(models) == listed and models["tiny"].model_extra["aliases"] == ["small"]
    from baton.v1 import kserve_pb2 as ks
    from baton.v1 import kserve_pb2_grpc

    with grpc.insecure_channel(two_models.address) as channel:
        kserve = kserve_pb2_grpc.GRPCInferenceServiceStub(channel)
        for name, want in (("stories260K", "stories260K"), ("tiny", "tiny"), ("small", "tiny")):
            assert kserve.ModelMetadata(ks.ModelMetadataRequest(name=name), timeout=10).name == want
            assert kserve.ModelReady(ks.ModelReadyRequest(name=name), timeout=10).ready
        with pytest.raises(grpc.RpcError) as caught:
            kserve.ModelMetadata(ks.ModelMetadataRequest(name="gpt-4"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_request_names_its_model_when_there_are_several(two_models):
    with BatonClient(two_models.address, timeout=60) as client:
        with pytest.raises(InvalidArgument) as caught:
            client.complete("Once", max_tokens=4)
        assert caught.value.field == "model" and "stories260K" in str(caught.value) and "tiny" in str(caught.value)
        with pytest.raises(NotFound) as missing:
            client.complete("Once", model="gpt-4", max_tokens=4)
        assert "stories260K" in str(missing.value) and "tiny" in str(missing.value)


@pytest.mark.parametrize("models, field", [
    ([], "config"),
    ([{"model": "a", "prefill": 1}], "models[0]"),
    ([{"model": "a", "colocated": -1}], "models[0].colocated"),
    ([{"model": "a", "colocated": 1, "tp": 0}], "models[0].tp"),
    ([{"model": "a", "colocated": 1, "gpus": 2}], "models[0]"),
    ([{"model": "a", "colocated": 1, "aliases": ["b"]}], "models[0].aliases"),
    ([{"model": "a", "colocated": 1}, {"model": "a", "colocated": 1}], "models[1]"),
])
def test_a_bad_config_is_refused_naming_the_entry(tmp_path, models, field):
    from baton.cluster.launch import load_pools
    from baton.engine import FieldError

    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": models}))
    with pytest.raises(FieldError) as caught:
        load_pools(path)
    assert caught.value.field == field


def test_the_example_config_parses():
    from pathlib import Path

    from baton.cluster.launch import load_pools

    first, second = load_pools(Path(__file__).parents[1] / "examples" / "up" / "models.yaml")
    assert first.prefill == first.decode == 1 and second.names == ("qwen", "qwen2", "qwen2-0.5b")
