"""bench.ddp_cache: the frozen-feature cache under 2-process DDP against images, as one JSON record."""

from __future__ import annotations

import pytest

from bench import ddp_cache


@pytest.mark.slow
def test_it_compares_cached_features_with_images_and_reports_the_equivalence_error() -> None:
    result = ddp_cache.run({"per_class": 10, "image_size": 32, "batch_size": 8, "epochs": 2})
    assert result["benchmark"] == "ddp_cache" and result["processes"] == 2
    assert result["cached_images_per_s"] > 0 and result["images_images_per_s"] > 0 and result["ratio"] > 0
    assert result["equivalence_max_abs"] <= 1e-5
