"""The `tuneserve` serving commands against a real service and its real TorchServe (one for the module).

Two checkpoints of a tiny random model are packaged and deployed as versions 1 and 2 of `pets`; predict
must print what each checkpoint answers in this process. The module ends by unserving a version, so the
tests run in file order.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_harness import Cli, assert_error_line, cli_for
from harness import make_image_folder, wait_for
from torchserve_service import running_torchserve_service
from typer.testing import Result

from handlers.inference import ImageClassifier
from service.app import Service
from service.packaging.ts_config import inference_url
from service.spec import ServingSpec

pytestmark = [
    pytest.mark.torchserve,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java"),
    pytest.mark.timeout(900),
]

TOKEN = "cli-serving-token"
CLASSES = ("cat", "dog", "fox", "owl", "yak")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("cli-serving")
    make_image_folder(root / "data" / "ds", classes=2, per_class=4)
    with running_torchserve_service(root, auth_token=TOKEN) as running:
        yield running


@pytest.fixture(scope="module")
def versions(
    service: Service, serving_checkpoint_factory: Any, serving_images: list[bytes], tmp_path_factory: Any
) -> dict[str, Path]:
    """Versions 1 and 2 of `pets` (2 the default), each behind the promotion gate: version -> checkpoint."""
    folder = tmp_path_factory.mktemp("pets")
    backend = service.backend
    spec = ServingSpec(model_name="pets", batch_size=4, max_batch_delay_ms=50, workers=1, top_k=3)
    checkpoints = {}
    for version, seed in (("1", 1), ("2", 2)):
        checkpoint = folder / f"v{version}" / "best.pt"
        serving_checkpoint_factory(checkpoint, class_names=CLASSES, seed=seed)
        archive = backend.package(checkpoint, "pets")
        served = backend.deploy(
            archive, serving_images, job_id=f"job-{version}", checkpoint=checkpoint, serving=spec
        )
        assert served.version == version
        checkpoints[version] = checkpoint
    return checkpoints


@pytest.fixture(scope="module")
def cli(service: Service, versions: dict[str, Path]) -> Cli:
    return cli_for(service, TOKEN)


@pytest.fixture
def images(tmp_path: Path, serving_images: list[bytes]) -> list[Path]:
    """A PNG and a JPEG file."""
    png, jpeg = tmp_path / "a.png", tmp_path / "b.jpg"
    png.write_bytes(serving_images[1])  # serving_images alternate JPEG (even) and PNG (odd)
    jpeg.write_bytes(serving_images[0])
    return [png, jpeg]


@functools.cache
def _classifier(checkpoint: Path) -> ImageClassifier:
    return ImageClassifier.from_checkpoint(torch.load(checkpoint, weights_only=True))


def in_process(checkpoint: Path, images: list[Path], top_k: int) -> dict[str, list[tuple[str, float]]]:
    """image path -> [(label, probability)], as the checkpoint answers in this process."""
    classifier = _classifier(checkpoint)
    answers = {str(p): classifier.handle([{"data": p.read_bytes(), "top_k": top_k}])[0] for p in images}
    return {path: [(s["label"], s["probability"]) for s in answer] for path, answer in answers.items()}


def printed_tables(result: Result, images: list[Path]) -> dict[str, list[tuple[str, float]]]:
    """image path -> [(label, probability)] from predict's tables (a heading line, then rank rows)."""
    tables: dict[str, list[tuple[str, float]]] = {}
    current = None
    for line in result.stdout.splitlines():
        if line.strip() in map(str, images):
            current = tables.setdefault(line.strip(), [])
        elif current is not None and len(line.split()) == 3 and line.split()[0].isdigit():
            rank, label, probability = line.split()
            assert int(rank) == len(current) + 1, result.stdout
            current.append((label, float(probability)))
    return tables


def assert_tables_like(printed: dict[str, list[tuple[str, float]]], expected: dict[str, Any]) -> None:
    assert {path: [label for label, _ in rows] for path, rows in printed.items()} == {
        path: [label for label, _ in rows] for path, rows in expected.items()
    }
    for path, rows in printed.items():
        # printed to 4 decimals, and TorchServe's float may differ from ours in the last place
        assert [p for _, p in rows] == pytest.approx([p for _, p in expected[path]], abs=2e-4)


# ------------------------------------------------------------------------------------------- tests


def test_health_reports_every_service_and_the_served_model_serving(
    cli: Cli, versions: dict[str, Path]
) -> None:
    def listed() -> dict[str, str] | None:
        result = cli("health")
        assert result.exit_code == 0, result.output
        statuses = dict(line.split() for line in result.stdout.splitlines())
        return statuses if statuses.get("torchserve/pets") == "SERVING" else None

    # the TorchServe names are refreshed every few seconds (service.api.health)
    assert wait_for(listed, timeout=30, what="torchserve/pets in `tuneserve health`") == {
        "(server)": "SERVING",
        "torchserve": "SERVING",
        "torchserve/pets": "SERVING",
        "tuneserve.v1.FineTuning": "SERVING",
        "tuneserve.v1.Inference": "SERVING",
    }


def test_predict_prints_a_top_1_table_per_image_like_the_default_checkpoint(
    cli: Cli, versions: dict[str, Path], images: list[Path]
) -> None:
    result = cli("predict", "pets", *map(str, images), "--top-k", "1")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("pets version default")
    printed = printed_tables(result, images)
    assert_tables_like(printed, in_process(versions["2"], images, top_k=1))
    assert all(len(rows) == 1 and rows[0][0] in CLASSES for rows in printed.values())


def test_predict_of_a_version_answers_with_that_version(
    cli: Cli, versions: dict[str, Path], images: list[Path]
) -> None:
    result = cli("predict", "pets", *map(str, images), "--version", "1")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("pets version 1")
    assert_tables_like(printed_tables(result, images), in_process(versions["1"], images, top_k=3))


def test_predict_of_a_file_that_is_no_image_shows_the_error_in_its_table(
    cli: Cli, images: list[Path], tmp_path: Path
) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG not really")
    result = cli("predict", "pets", str(junk), str(images[0]))
    assert result.exit_code == 0, result.output
    assert "error: " in result.stdout and "not a JPEG, PNG" in result.stdout
    printed = printed_tables(result, [junk, images[0]])
    assert printed[str(junk)] == [] and len(printed[str(images[0])]) == 3  # the good image still answers


def test_predict_unknown_model_is_not_found(cli: Cli, images: list[Path]) -> None:
    assert_error_line(cli("predict", "nobody", str(images[0])), 3, "NOT_FOUND", "nobody", "pets")


def test_served_lists_models_with_versions_and_url(cli: Cli, service: Service) -> None:
    result = cli("served")
    assert result.exit_code == 0, result.output
    row = next(line.split() for line in result.stdout.splitlines() if line.split()[:1] == ["pets"])
    url = f"{inference_url(service.settings)}/predictions/pets"
    assert url.startswith("http://127.0.0.1:")
    assert row == ["pets", "2", "1,", "2", "yes", "job-2", url]
    assert "1, 2" in result.stdout


def test_serve_job_of_an_unknown_job_is_not_found(cli: Cli) -> None:
    assert_error_line(cli("serve-job", "job-nope"), 3, "NOT_FOUND", "job-nope")


def test_set_default_unknown_version_is_not_found(cli: Cli) -> None:
    assert_error_line(cli("set-default", "pets", "9"), 3, "NOT_FOUND", "no version '9'", "versions: 1, 2")


def test_set_default_and_unserve_confirm(cli: Cli, service: Service) -> None:
    url = f"{inference_url(service.settings)}/predictions/pets"
    result = cli("set-default", "pets", "1")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"pets version 1 (default): ready; {url}"
    result = cli("unserve", "pets", "--version", "2")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "unserved pets version 2"
    served = next(line.split() for line in cli("served").stdout.splitlines() if line.split()[:1] == ["pets"])
    assert served[:3] == ["pets", "1", "1"]
