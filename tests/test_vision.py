"""torchvision is reached only through tdml_core.model.vision."""

import subprocess
import sys
import textwrap

import torch

from tdml_core.model import build_model
from tdml_core.model.vision import torchvision_module


def test_resnets_and_transforms_import_without_the_c_extension():
    models = torchvision_module("models")
    transforms = torchvision_module("transforms")
    assert hasattr(models, "resnet50") and hasattr(transforms, "Normalize")
    net = build_model("resnet50", 10, 3, torch.randn(2, 3, 32, 32), seed=0)
    assert net.conv1.kernel_size == (3, 3) and net.fc.out_features == 10
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def _run_without_torchvision(code: str) -> subprocess.CompletedProcess:
    blocker = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "torchvision" or name.startswith("torchvision."):
                    raise ModuleNotFoundError("No module named 'torchvision'")
        sys.meta_path.insert(0, Block())
        """
    )
    return subprocess.run([sys.executable, "-c", blocker + code], capture_output=True, text=True)


def test_project_works_where_torchvision_is_absent():
    r = _run_without_torchvision(
        textwrap.dedent(
            """
            import torch
            from tdml_core.model import ModelError, build_model
            m = build_model("digits_cnn", 10, 1, torch.randn(2, 1, 8, 8), 0)
            print("digits ok", sum(p.numel() for p in m.parameters()))
            try:
                build_model("resnet18", 10, 3, torch.randn(2, 3, 32, 32), 0)
            except ModelError as e:
                print("refused:", e)
            """
        )
    )
    assert r.returncode == 0, r.stderr
    assert "digits ok 151306" in r.stdout
    assert "refused: resnet18: torchvision is not installed" in r.stdout
