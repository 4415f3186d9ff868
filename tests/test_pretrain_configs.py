"""Every shipped pretraining config loads, builds its model on the meta device and states its minimum batch."""

from __future__ import annotations

import pytest

from eo_dinov3.errors import ConfigError
from eo_dinov3.ssl.config import load_config
from eo_dinov3.ssl.meta_arch import student_backbone_config
from tests.conftest import REPO_ROOT

CONFIGS = sorted((REPO_ROOT / "configs" / "pretrain").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_builds(path):
    cfg = load_config(path)
    vit = student_backbone_config(cfg)
    assert vit.embed_dim % vit.num_heads == 0
    text = path.read_text()
    if "demo" not in path.name:
        assert "Minimum global batch" in text, "at-scale configs must state the batch they were meant for"


def test_unknown_keys_are_refused_with_the_key_name():
    with pytest.raises(ConfigError, match=r"optim\.lrr"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("nope.yaml")


def test_demo_config_is_the_default_of_the_entry_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_script", REPO_ROOT / "sat_training" / "pretrain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.DEMO_CONFIG.name == "demo_cpu.yaml"
    from eo_dinov3.cli import build_parser

    args = build_parser().parse_args(["pretrain"])
    assert args.config.endswith("demo_cpu.yaml") and args.overrides == []
