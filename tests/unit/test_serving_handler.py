"""The handler's pre/post-processing in-process (no TorchServe): decoding, per-request errors, labels."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from handlers.inference import ImageClassifier, RequestError, decode_image, request_bytes


@pytest.fixture(scope="module")
def classifier(serving_checkpoint: Path) -> ImageClassifier:
    return ImageClassifier.from_checkpoint(torch.load(serving_checkpoint, weights_only=True))


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_multiclass_answers_top_k_labels_most_likely_first(
    classifier: ImageClassifier, serving_images: list[bytes]
):
    answers = classifier.handle(serving_images)
    for answer in answers:
        assert isinstance(answer, list) and len(answer) == 3  # the checkpoint's top_k
        probabilities = [s["probability"] for s in answer]
        assert probabilities == sorted(probabilities, reverse=True)
        assert {s["label"] for s in answer} <= {"cat", "dog", "fox", "owl", "yak"}
    assert len({a[0]["label"] for a in answers if isinstance(a, list)}) > 1  # the input matters


def test_a_batch_gives_the_same_answers_as_single_requests(
    classifier: ImageClassifier, serving_images: list[bytes]
):
    batched = classifier.handle(serving_images)
    single = [classifier.handle([image])[0] for image in serving_images]
    for b, s in zip(batched, single, strict=True):
        assert isinstance(b, list) and isinstance(s, list)
        assert [x["label"] for x in b] == [x["label"] for x in s]
        assert [x["probability"] for x in b] == pytest.approx([x["probability"] for x in s], abs=1e-5)


def test_bad_requests_fail_alone_with_a_clear_message(
    classifier: ImageClassifier, serving_images: list[bytes]
):
    good = serving_images[0]
    answers = classifier.handle([good, b"not an image", b"", {"body": None}, good[: len(good) // 2], good])
    assert isinstance(answers[0], list) and answers[0] == answers[5]
    assert answers[1] == {
        "error": "cannot decode the image: 12 bytes that are not a JPEG, PNG, WebP, BMP or GIF file"
    }
    assert "empty request" in answers[2]["error"]  # type: ignore[call-overload]
    assert "empty request" in answers[3]["error"]  # type: ignore[call-overload]
    assert "cannot decode the image" in answers[4]["error"]  # type: ignore[call-overload]


def test_base64_and_dict_bodies_are_accepted(classifier: ImageClassifier, serving_images: list[bytes]):
    image = serving_images[1]
    encoded = base64.b64encode(image).decode()
    answers = classifier.handle([image, encoded, {"data": image}, {"body": encoded}, bytearray(image)])
    first = answers[0]
    assert isinstance(first, list)
    for answer in answers[1:]:  # same labels; the batch position may move the last float bits
        assert isinstance(answer, list)
        assert [s["label"] for s in answer] == [s["label"] for s in first]
        probabilities = [s["probability"] for s in first]
        assert [s["probability"] for s in answer] == pytest.approx(probabilities, abs=1e-6)


def test_requested_top_k_overrides_the_default(classifier: ImageClassifier, serving_images: list[bytes]):
    one, five, bad = classifier.handle(
        [{"data": serving_images[0], "top_k": b"1"}, {"data": serving_images[0], "top_k": "9"},
         {"data": serving_images[0], "top_k": b"zero"}]
    )  # fmt: skip
    assert isinstance(one, list) and len(one) == 1
    assert isinstance(five, list) and len(five) == 5  # capped at the number of classes
    assert bad == {"error": "top_k must be a positive integer (got b'zero')"}


def test_an_image_over_the_pixel_limit_is_refused_before_decoding():
    with pytest.raises(RequestError, match=r"2000x1000 = 2000000 pixels; the limit is 1000000"):
        decode_image(_png(2000, 1000), max_pixels=1_000_000)
    assert decode_image(_png(1000, 1000), max_pixels=1_000_000).size == (1000, 1000)


def test_text_that_is_not_base64_is_refused():
    with pytest.raises(RequestError, match="not base64"):
        request_bytes("hello world!")


def test_binary_answers_both_classes_with_the_decision_first(
    serving_checkpoint_factory: Any, serving_images: list[bytes], tmp_path: Path
):
    state = serving_checkpoint_factory(tmp_path / "binary.pt", task="binary", class_names=("no", "yes"))
    classifier = ImageClassifier.from_checkpoint(state)
    for answer in classifier.handle(serving_images):
        assert isinstance(answer, list) and {s["label"] for s in answer} == {"no", "yes"}
        assert answer[0]["probability"] + answer[1]["probability"] == pytest.approx(1.0)
        p_yes = next(s["probability"] for s in answer if s["label"] == "yes")
        assert answer[0]["label"] == ("yes" if p_yes > 0.5 else "no")


def test_multilabel_answers_every_label_over_the_threshold(
    serving_checkpoint_factory: Any, serving_images: list[bytes], tmp_path: Path
):
    state = serving_checkpoint_factory(
        tmp_path / "multi.pt", task="multilabel", class_names=("a", "b", "c", "d")
    )
    classifier = ImageClassifier.from_checkpoint(state)
    probabilities = classifier.probabilities(
        torch.stack([classifier.transform(_rgb(i)) for i in serving_images])
    )
    for answer, probs in zip(classifier.handle(serving_images), probabilities, strict=True):
        expected = {name for name, p in zip("abcd", probs.tolist(), strict=True) if p > 0.5}
        assert isinstance(answer, list) and {s["label"] for s in answer} == expected


def _rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


class _Metrics:
    def __init__(self) -> None:
        self.counters: list[tuple[str, int, list[Any]]] = []

    def add_counter(self, name: str, value: int, idx: Any, dimensions: list[Any]) -> None:
        self.counters.append((name, value, dimensions))


class _Context:
    """The parts of TorchServe's Context the handler uses."""

    def __init__(self, model_dir: Path) -> None:
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None}
        self.model_name = "pets"
        self.metrics = _Metrics()
        self.statuses: dict[int, tuple[int, str]] = {}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)


def test_torchserve_handler_marks_bad_requests_400_and_counts_batch_sizes(
    serving_checkpoint: Path, serving_images: list[bytes], tmp_path: Path
):
    from handlers.tuneserve_handler import TuneserveHandler
    from service.packaging.archiver import build_archive

    archive = build_archive(serving_checkpoint, tmp_path / "store", "pets", "1")
    model_dir = tmp_path / "unpacked"
    import zipfile

    zipfile.ZipFile(archive.path).extractall(model_dir)
    context = _Context(model_dir)
    handler = TuneserveHandler()
    handler.initialize(context)
    answers = handler.handle(
        [{"body": serving_images[0]}, {"body": b"junk"}, {"data": serving_images[2]}], context
    )
    assert isinstance(answers[0], list) and isinstance(answers[2], list)
    assert context.statuses == {1: (400, answers[1]["error"])}
    (name, value, dimensions) = context.metrics.counters[0]
    assert (name, value) == ("TuneserveBatches", 1)
    assert {(d.name, d.value) for d in dimensions} >= {("BatchSize", "3"), ("ModelName", "pets")}
