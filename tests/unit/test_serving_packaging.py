"""Packaging without TorchServe: archive contents, config.properties, TorchServe's descriptors, the gate's
comparison, the served-model registry."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from handlers.inference import ImageClassifier
from service.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from service.packaging.archiver import build_archive
from service.packaging.gate import Decision, compare
from service.packaging.mar_files import sha256_of
from service.packaging.served_registry import ServedRegistry, ServedVersion
from service.packaging.torchserve_process import TorchServeProcess
from service.packaging.ts_config import render_config
from service.packaging.ts_keys import TorchServeKeys, parse_key_expiry
from service.packaging.ts_protos import build_descriptor_set, frontend_jar, generate_stubs
from service.settings import Settings

# ------------------------------------------------------------------------------------------ archive


@pytest.fixture(scope="module")
def archive(serving_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    return build_archive(
        serving_checkpoint, tmp_path_factory.mktemp("store"), "pets", "1", max_image_pixels=12345
    )


def test_archive_holds_a_state_dict_the_config_the_labels_our_handler_and_its_code(
    archive, serving_checkpoint: Path
):
    assert archive.path.name == "pets-v1.mar" and (archive.name, archive.version) == ("pets", "1")
    assert archive.sha256 == sha256_of(archive.path)
    with zipfile.ZipFile(archive.path) as mar:
        assert sorted(mar.namelist()) == sorted(
            [
                "MAR-INF/MANIFEST.json",
                "model.pt",
                "model_config.json",
                "index_to_name.json",
                "tuneserve_handler.py",
                # the code the handler runs, so the archive serves without tuneserve (handler_runtime)
                "handlers/__init__.py",
                "handlers/inference.py",
                "service/__init__.py",
                "service/errors.py",
                "service/tasks.py",
                "service/training/__init__.py",
                "service/training/architecture.py",
                "service/training/families.py",
                "service/training/heads.py",
                "service/training/registry.py",
                "service/training/transforms.py",
            ]
        )
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]
        config = json.loads(mar.read("model_config.json"))
        labels = json.loads(mar.read("index_to_name.json"))
        mar.extract("model.pt", archive.path.parent / "x")
    assert manifest == {
        "modelName": "pets",
        "modelVersion": "1",
        "handler": "tuneserve_handler.py",
        "serializedFile": "model.pt",
    }
    assert labels == {"0": "cat", "1": "dog", "2": "fox", "3": "owl", "4": "yak"}
    assert config["architecture"] == "mobilenet_v3_small" and config["task"] == "multiclass"
    assert (config["image_size"], config["max_image_pixels"], config["threshold"]) == (64, 12345, 0.5)
    weights = torch.load(archive.path.parent / "x" / "model.pt", weights_only=True)  # a plain state_dict
    expected = torch.load(serving_checkpoint, weights_only=True)["model"]
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


def test_the_archive_predicts_what_the_checkpoint_predicts(archive, serving_checkpoint: Path, serving_images):
    model_dir = archive.path.parent / "unpacked"
    zipfile.ZipFile(archive.path).extractall(model_dir)
    from_archive = ImageClassifier.from_model_dir(model_dir).handle(serving_images)
    from_checkpoint = ImageClassifier.from_checkpoint(torch.load(serving_checkpoint, weights_only=True))
    assert from_archive == from_checkpoint.handle(serving_images)


def test_an_existing_archive_version_is_never_replaced(archive, serving_checkpoint: Path):
    with pytest.raises(AlreadyExists, match=r"pets-v1\.mar already exists"):
        build_archive(serving_checkpoint, archive.path.parent, "pets", "1")
    assert not [p for p in archive.path.parent.iterdir() if p.name.startswith(".staging")]


@pytest.mark.parametrize(("name", "version"), [("../evil", "1"), ("pets", "one"), ("pets", "1/2")])
def test_unsafe_names_and_versions_are_refused(
    serving_checkpoint: Path, tmp_path: Path, name: str, version: str
):
    with pytest.raises(InvalidArgument):
        build_archive(serving_checkpoint, tmp_path, name, version)


def test_a_missing_checkpoint_is_a_failed_precondition(tmp_path: Path):
    with pytest.raises(FailedPrecondition, match="does not exist"):
        build_archive(tmp_path / "nope.pt", tmp_path, "pets", "1")


# ------------------------------------------------------------------------------- config.properties


def _properties(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {key: value.replace("\\\\", "\\") for key, value in pairs}  # undo the properties escaping


def test_config_binds_loopback_with_token_auth_and_a_capped_heap(tmp_path: Path):
    settings = Settings.model_validate(
        {"state_dir": tmp_path, "torchserve_inference_port": 18080, "torchserve_java_heap": "256m"}
    )
    props = _properties(render_config(settings))
    assert props["inference_address"] == "http://127.0.0.1:18080"
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["disable_token_authorization"] == "false" and props["enable_model_api"] == "true"
    assert props["enable_envvars_config"] == "false" and props["metrics_mode"] == "prometheus"
    assert props["vmargs"].startswith("-Xmx256m ")
    assert props["model_store"] == str(settings.model_store.resolve())


@pytest.mark.parametrize(
    ("overrides", "visible", "number_of_gpu"),
    [
        ({"gpu_count": 4}, "3", "1"),  # default: the last GPU, shared with training
        ({"gpu_count": 4, "serving_gpus": "0,2"}, "0,2", "2"),
        ({"gpu_count": 4, "serving_gpus": ""}, "", "0"),  # TorchServe on the CPU
        ({"gpu_count": 0}, "", "0"),  # a CPU-only machine
    ],
)
def test_torchserve_sees_only_the_serving_gpus_and_uses_each(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    overrides: dict[str, Any],
    visible: str,
    number_of_gpu: str,
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    settings = Settings.model_validate({"state_dir": tmp_path, **overrides})
    assert TorchServeProcess(settings).environment()["CUDA_VISIBLE_DEVICES"] == visible
    assert _properties(render_config(settings))["number_of_gpu"] == number_of_gpu


def test_allowed_urls_admit_only_archives_at_the_top_of_the_model_store(tmp_path: Path):
    settings = Settings.model_validate({"state_dir": tmp_path / "state-1.x"})
    pattern = _properties(render_config(settings))["allowed_urls"]
    store = settings.model_store.resolve()
    assert re.fullmatch(pattern, f"file://{store}/pets-v1.mar")
    for url in [f"file://{store}/sub/pets.mar", f"file://{store}X/pets.mar", "file:///etc/pets.mar",
                "https://example.com/pets.mar", f"file://{store}/pets-v1.mar.sh"]:  # fmt: skip
        assert not re.fullmatch(pattern, url), url


def test_key_expiry_reads_javas_nanoseconds():
    expiry = parse_key_expiry("2026-11-28T13:15:48.872250124Z")
    assert expiry.isoformat() == "2026-11-28T13:15:48.872250+00:00"


def test_keys_make_bearer_headers_only_when_auth_is_on():
    keys = TorchServeKeys(management="m-key", inference="i-key", api="a-key")
    assert keys.header("management") == {"Authorization": "Bearer m-key"}
    assert keys.header("inference") == {"Authorization": "Bearer i-key"}
    assert TorchServeKeys().header("inference") == {}


# ----------------------------------------------------------------------------- TorchServe's protos


def test_descriptors_come_out_of_the_frontend_jar():
    files = {f.name: f for f in build_descriptor_set(frontend_jar()).file}
    assert {"inference.proto", "management.proto", "google/rpc/status.proto"} <= files.keys()
    (service,) = files["inference.proto"].service
    assert service.name == "InferenceAPIsService"
    assert {m.name for m in service.method} >= {"Ping", "Predictions", "StreamPredictions"}


def test_generated_stubs_import_as_a_package(tmp_path: Path):
    written = generate_stubs(tmp_path / "ts_gen")
    assert {p.name for p in written} >= {
        "inference_pb2.py",
        "inference_pb2_grpc.py",
        "management_pb2_grpc.py",
    }
    grpc_module = (tmp_path / "ts_gen" / "inference_pb2_grpc.py").read_text()
    assert "from service.packaging.ts_gen import inference_pb2 as" in grpc_module


# ------------------------------------------------------------------------------------------- gate


def _scores(*pairs: tuple[str, float]) -> list[dict[str, object]]:
    return [{"label": label, "probability": p} for label, p in pairs]


def test_gate_passes_answers_within_tolerance():
    result = compare([_scores(("a", 0.7), ("b", 0.3))], [_scores(("a", 0.70005), ("b", 0.29995))], 1e-4)
    assert result.passed and result.max_difference == pytest.approx(5e-5)


def test_gate_passes_a_near_tie_whose_top_1_flipped_within_the_margin():
    # the checkpoint's top-2 margin is 6e-5, under the tolerance: float noise may reorder the two
    want, have = _scores(("a", 0.50003), ("b", 0.49997)), _scores(("b", 0.50001), ("a", 0.49999))
    result = compare([want], [have], 1e-4, names=["cats/1.png"])
    assert result.passed and result.max_difference == pytest.approx(4e-5)


def test_gate_refuses_a_flip_outside_the_margin_naming_the_image_both_answers_and_the_tolerance():
    want, have = _scores(("a", 0.50015), ("b", 0.49985)), _scores(("b", 0.50002), ("a", 0.49998))
    result = compare([_scores(("a", 0.9), ("b", 0.1)), want], [_scores(("a", 0.9), ("b", 0.1)), have], 1e-4,
                     names=["dogs/3.png", "cats/1.png"])  # fmt: skip
    assert not result.passed and result.image == "cats/1.png"
    assert result.reason.startswith("cats/1.png: the top-1 differs and the checkpoint's margin 3.00e-04")
    assert "the checkpoint answered 'a' (p=0.500150), TorchServe 'b' (p=0.500020)" in result.reason
    assert result.reason.endswith("(tolerance 0.0001)")


def test_gate_refuses_a_probability_beyond_tolerance_naming_the_image_and_both_answers():
    result = compare([_scores(("a", 0.7), ("b", 0.3))], [_scores(("a", 0.71), ("b", 0.29))], 1e-4,
                     names=["cats/1.png"])  # fmt: skip
    assert not result.passed and "cats/1.png: P(a) is 0.710000 in TorchServe but 0.700000" in result.reason
    assert "the checkpoint answered 'a' (p=0.700000), TorchServe 'a' (p=0.710000)" in result.reason
    assert "(tolerance 0.0001)" in result.reason


def test_gate_refuses_an_error_where_the_checkpoint_answers():
    result = compare([_scores(("a", 1.0))], [{"error": "boom"}], 1e-4)
    assert not result.passed and "image 0: one side refused the image" in result.reason
    assert "TorchServe error 'boom'" in result.reason


def test_gate_binary_near_tie_is_measured_at_the_threshold():
    decision = Decision("binary", threshold=0.7, class_names=("no", "yes"))
    # P(yes) 0.70004 is 4e-5 over the threshold, TorchServe's 0.69998 just under it: a near-tie may flip
    near = compare([_scores(("yes", 0.70004), ("no", 0.29996))], [_scores(("no", 0.30002), ("yes", 0.69998))],
                   1e-4, decision=decision)  # fmt: skip
    assert near.passed
    # P(yes) 0.05 is 0.05 under a 0.1 threshold: no near-tie, TorchServe must not say "yes"
    far = compare([_scores(("no", 0.95), ("yes", 0.05))], [_scores(("yes", 0.15), ("no", 0.85))], 1e-4,
                  decision=Decision("binary", threshold=0.1, class_names=("no", "yes")))  # fmt: skip
    assert not far.passed and "margin 5.00e-02" in far.reason


def test_gate_multilabel_compares_the_labels_over_the_threshold():
    decision = Decision("multilabel", threshold=0.5)
    assert compare([[]], [[]], 1e-4, decision=decision).passed  # no label over the threshold on either side
    near = compare([_scores(("a", 0.9), ("b", 0.50003))], [_scores(("a", 0.9))], 1e-4, decision=decision)
    assert near.passed
    far = compare([_scores(("a", 0.9), ("b", 0.6))], [_scores(("a", 0.9))], 1e-4, decision=decision)
    assert not far.passed and "only the checkpoint puts 'b' (p=0.600000) over the threshold" in far.reason


# --------------------------------------------------------------------------------------- registry


def _version(version: str) -> ServedVersion:
    return ServedVersion(
        version, f"job-{version}", f"pets-v{version}.mar", "ab" * 32, "/c.pt", 4, 10, 1, 5, 0.0
    )


def test_registry_survives_a_reload_and_keeps_the_default(tmp_path: Path):
    registry = ServedRegistry(tmp_path / "served.json")
    registry.add("pets", _version("1"), make_default=True)
    registry.add("pets", _version("2"), make_default=False)
    registry.add("pets", _version("10"), make_default=True)
    reloaded = ServedRegistry(tmp_path / "served.json").get("pets")
    assert reloaded is not None and reloaded.default == "10"
    assert reloaded.ordered_versions() == ["1", "2", "10"] and reloaded.versions["2"] == _version("2")


def test_removing_the_default_promotes_the_newest_remaining(tmp_path: Path):
    registry = ServedRegistry(tmp_path / "served.json")
    for v in ("1", "2", "3"):
        registry.add("pets", _version(v), make_default=v == "3")
    remaining = registry.remove("pets", "3")
    assert remaining is not None and remaining.default == "2"
    assert registry.remove("pets") is None and registry.get("pets") is None
