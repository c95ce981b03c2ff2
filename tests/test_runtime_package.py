"""The runtime never needs torch or transformers: it imports and captions where importing them fails."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import noise_image

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = textwrap.dedent("""
    import sys

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "torchvision"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Blocker())
""")


def test_runtime_captions_without_torch(exported, tmp_path):
    image = tmp_path / "image.png"
    noise_image(64, 96).save(image)
    script = BLOCKER + textwrap.dedent(f"""
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("blocker failed")
        from molmocap import Captioner
        from molmocap import cli  # noqa: F401 - the CLI module imports without torch too
        result = Captioner.load({str(exported["qwen3_gqa"])!r}, threads=1).generate({str(image)!r},
                                                                                          max_new_tokens=3)
        assert len(result.token_ids) == 3
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
