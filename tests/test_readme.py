"""The README's Python example, run as printed on the embedded model."""

from __future__ import annotations

import re
from pathlib import Path

from npinv.scenes import Scene, read_scene

ROOT = Path(__file__).resolve().parent.parent


def test_readme_python_example_runs_as_printed(tmp_path, monkeypatch):
    from npinv.io import tensor_to_image

    code = re.search(r"## Python\s+```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    (tmp_path / "src").symlink_to(ROOT / "src")  # the example names a file relative to the repository
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the project's own README
    rec, edited, inverted = scope["rec"], scope["edited"], scope["inverted"]
    assert rec.psnr > 28 and rec.cost.unet_calls == 100 and rec.invert_cost.unet_calls == 50
    assert edited.settings.guidance == 2.5 and edited.edit_cost.unet_calls == 50
    assert read_scene(tensor_to_image(edited.images[:1])).matches(Scene("circle", "green", "blue"))
    assert (tmp_path / "inv.safetensors").is_file() and inverted.inversion.steps == 50
