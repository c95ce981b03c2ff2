"""A few hundred fuzzed image files through `load_image` + `preprocess`: each one is an image or one `InputError`.

benchmarks/fuzz_images.py runs the same generator (tests/image_mutations.py) at scale, with captioning, the server
and the CLI.
"""

from __future__ import annotations

import pytest

from image_mutations import cases, seed_files
from molmocap.runtime.errors import InputError
from molmocap.runtime.image_io import load_image
from molmocap.runtime.preprocess import PreprocessConfig, preprocess

CONFIG = PreprocessConfig()


def test_every_seed_file_is_a_valid_image():
    for name, data in seed_files().items():
        image = load_image(data)
        assert image.mode == "RGB" and image.width > 0, name


@pytest.mark.parametrize("seed", [1, 2])
def test_fuzzed_images_load_or_fail_with_one_input_error(seed):
    uncaught, outcomes = [], {"ok": 0, "input_error": 0}
    for case in cases(seed, 200):
        try:
            preprocess(load_image(case.data), CONFIG)
            outcomes["ok"] += 1
        except InputError as exc:
            assert "\n" not in str(exc), (case.index, case.seed, case.mutations)
            outcomes["input_error"] += 1
        except Exception as exc:  # noqa: BLE001 - what the test is looking for
            uncaught.append((case.index, case.seed, case.mutations, f"{type(exc).__name__}: {exc}"))
    assert not uncaught, uncaught
    assert outcomes["ok"] > 20 and outcomes["input_error"] > 20, outcomes  # both paths were exercised
