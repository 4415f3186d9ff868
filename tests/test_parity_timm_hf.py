"""Acceptance: every named backbone except the 7B gives the same features as two independent implementations
loaded with the same (random, non-trivial) weights: timm's DINOv3 ViTs (Eva family) and transformers'
``DINOv3ViTModel``. fp32, batch 1, 224x224 and a non-square 224x160 input; CLS, storage/register and patch tokens
after the final norm, the un-normed last block output, and every block's output via ``get_intermediate_layers``
(``norm=True``) against timm ``forward_intermediates(norm=True)`` and HF ``hidden_states`` passed through the
final norm. Max abs diff <= 1e-4. Run with ``-s`` to see the measured table.

Cost: about 7 CPU-minutes for the whole file (ViT-H+ alone about 2.5), so ViT-L and larger are marked slow.
"""

from __future__ import annotations

import gc

import pytest
import torch

from eo_dinov3.checkpoints import export_state_dict, hf_config
from eo_dinov3.hub import build_backbone
from tests.test_checkpoints import randomize_

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
SIZES = {"224x224": (224, 224), "224x160": (224, 160)}

# name, overrides, timm model name + kwargs (timm 1.0.31 has no ViT-L+; its Eva takes the SwiGLU width as
# int(D*mlp_ratio) aligned to 8), official FFN hidden width (HF intermediate_size, dinov3_recipe.md §1.8)
CASES = [
    pytest.param("dinov3_vits16", {}, "vit_small_patch16_dinov3_qkvb", {}, 1536, id="vits16"),
    pytest.param("dinov3_vits16plus", {}, "vit_small_plus_patch16_dinov3_qkvb", {}, 1536, id="vits16plus"),
    pytest.param("dinov3_vitb16", {}, "vit_base_patch16_dinov3_qkvb", {}, 3072, id="vitb16"),
    pytest.param("dinov3_vitl16", {}, "vit_large_patch16_dinov3_qkvb", {}, 4096, id="vitl16", marks=pytest.mark.slow),
    pytest.param(
        "dinov3_vitl16",
        {"untie_global_and_local_cls_norm": True},
        "vit_large_patch16_dinov3_qkvb",
        {},
        4096,
        id="vitl16-sat493m",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "dinov3_vitl16plus",
        {},
        "vit_large_patch16_dinov3_qkvb",
        dict(swiglu_mlp=True, swiglu_align_to=8, mlp_ratio=4.0),
        4096,
        id="vitl16plus",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "dinov3_vith16plus", {}, "vit_huge_plus_patch16_dinov3_qkvb", {}, 5120, id="vith16plus", marks=pytest.mark.slow
    ),
]

MEASURED: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="module", autouse=True)
def _print_table():
    yield
    if MEASURED:
        print("\nmax abs diff vs oracle (fp32, CPU)")
        archs = sorted({a for a, _ in MEASURED}, key=list(dict.fromkeys(a for a, _ in MEASURED)).index)
        print(f"{'arch':<24}{'timm':>12}{'hf':>12}")
        for a in archs:
            t, h = (MEASURED.get((a, o), float("nan")) for o in ("timm", "hf"))
            print(f"{a:<24}{t:>12.2e}{h:>12.2e}")


def _ours(model, x: torch.Tensor) -> dict[str, torch.Tensor | list]:
    ff = model.forward_features(x)
    layers = model.get_intermediate_layers(
        x, n=model.n_blocks, return_class_token=True, return_extra_tokens=True, norm=True
    )
    return {
        "cls": ff["x_norm_clstoken"],
        "storage": ff["x_storage_tokens"],
        "patch": ff["x_norm_patchtokens"],
        "prenorm": ff["x_prenorm"],
        "layers": [(p, c, s) for p, c, s in layers],
    }


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _compare(ours: dict, cls, storage, patch, layers, prenorm=None) -> dict[str, float]:
    """``layers``: per block ``(patch [B,P,D], prefix [B,1+R,D])`` after the final norm."""
    d = {"cls": _diff(ours["cls"], cls), "storage": _diff(ours["storage"], storage)}
    d["patch"] = _diff(ours["patch"], patch)
    if prenorm is not None:
        d["prenorm"] = _diff(ours["prenorm"], prenorm)
    assert len(layers) == len(ours["layers"])
    d["layers"] = max(
        max(_diff(p, lp), _diff(c, lpre[:, 0]), _diff(s, lpre[:, 1:]))
        for (p, c, s), (lp, lpre) in zip(ours["layers"], layers)
    )
    return d


@pytest.mark.parametrize("name, overrides, timm_name, timm_kwargs, ffn_hidden", CASES)
def test_features_match_timm_and_transformers(name, overrides, timm_name, timm_kwargs, ffn_hidden):
    torch.manual_seed(0)
    model = build_backbone(name, pretrained=False, **overrides).eval()
    randomize_(model)
    R = model.n_storage_tokens
    inputs = {tag: torch.randn(1, 3, h, w) for tag, (h, w) in SIZES.items()}
    label = name + ("-sat493m" if overrides else "")
    with torch.no_grad():
        ours = {tag: _ours(model, x) for tag, x in inputs.items()}

        oracle = timm.create_model(timm_name, pretrained=False, **timm_kwargs).eval()
        oracle.load_state_dict(export_state_dict(model, "timm"), strict=True)
        worst = 0.0
        for tag, x in inputs.items():
            final, inter = oracle.forward_intermediates(
                x, indices=model.n_blocks, norm=True, output_fmt="NLC", return_prefix_tokens=True
            )
            d = _compare(ours[tag], final[:, 0], final[:, 1 : 1 + R], final[:, 1 + R :], inter)
            assert max(d.values()) <= TOL, (label, "timm", tag, d)
            worst = max(worst, *d.values())
        MEASURED[(label, "timm")] = worst
        del oracle
        gc.collect()

        hf_kwargs = dict(
            hidden_size=model.embed_dim,
            intermediate_size=ffn_hidden,
            num_hidden_layers=model.n_blocks,
            num_attention_heads=model.num_heads,
            num_register_tokens=4,
            use_gated_mlp=model.config.ffn_layer != "mlp",
            hidden_act="gelu" if model.config.ffn_layer == "mlp" else "silu",
            layer_norm_eps=1e-5,
            rope_theta=100.0,
            key_bias=False,
        )
        assert {k: hf_config(model.config)[k] for k in hf_kwargs} == hf_kwargs
        oracle = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**hf_kwargs)).eval()
        oracle.load_state_dict(export_state_dict(model, "hf"), strict=True)
        worst = 0.0
        for tag, x in inputs.items():
            out = oracle(pixel_values=x, output_hidden_states=True)
            last = out.last_hidden_state
            hidden = out.hidden_states[1:]  # [0] is the embedding output
            layers = [(oracle.norm(h)[:, 1 + R :], oracle.norm(h)[:, : 1 + R]) for h in hidden]
            d = _compare(ours[tag], last[:, 0], last[:, 1 : 1 + R], last[:, 1 + R :], layers, prenorm=hidden[-1])
            assert max(d.values()) <= TOL, (label, "hf", tag, d)
            worst = max(worst, *d.values())
        MEASURED[(label, "hf")] = worst
        del oracle
    del model
    gc.collect()
