"""The ViT family beyond the plain ViT, tiny and random: timm models whose intermediates, prefix tokens, heads
or blocks differ (distilled DeiT, SigLIP's attention-pool head, DINOv2 registers, a ResNet stem, no class
token, BEiT, EVA-02, CaiT, XCiT, SAM's ViT)."""

import math

import pytest
import torch

from inca.activations import ImageBatches
from inca.adapters.common import logit_layers
from inca.backbone import create_backbone
from inca.errors import InCAError
from inca.methods import METHODS, RunConfig, build_model, get_method, run_method, train_e2e
from inca.tasks import sequential_batches
from inca.train.e2e import pooled_features, trainable_copy

from .conftest import subset_task

TINY = {"img_size": 32, "patch_size": 8, "depth": 2}
NARROW = {"embed_dim": 64, "num_heads": 2}


def layout(prefix: int, grid: int, cls: bool = True, registers: int = 0, dist: bool = False) -> dict:
    return {"num_prefix_tokens": prefix, "cls_token": cls, **({"distillation_token": True} if dist else {}),
            "num_register_tokens": registers, "grid_size": [grid, grid], "num_tokens": prefix + grid * grid}


ARCHS = {  # name: (model kwargs, expected token layout)
    "deit_tiny_distilled_patch16_224": (TINY, layout(2, 4, dist=True)),
    "deit3_small_patch16_224": (TINY, layout(1, 4)),
    "vit_base_patch16_clip_224": ({**TINY, **NARROW}, layout(1, 4)),
    "vit_base_patch16_siglip_224": ({**TINY, **NARROW}, layout(0, 4, cls=False)),  # attention-pool head
    "vit_small_patch14_reg4_dinov2": ({"img_size": 28, "patch_size": 7, "depth": 2}, layout(5, 4, registers=4)),
    "vit_small_r26_s32_224": ({"img_size": 64, "depth": 2}, layout(1, 2)),  # ResNet stem
    "vit_relpos_small_patch16_224": (TINY, layout(0, 4, cls=False)),
    "beit_base_patch16_224": ({**TINY, **NARROW}, layout(1, 4)),
    "eva02_tiny_patch14_224": ({"img_size": 28, "patch_size": 7, "depth": 2}, layout(1, 4)),
    # CaiT and XCiT add their class token after the token blocks: intermediates are patch tokens only.
    "cait_xxs24_224": (TINY, layout(0, 4, cls=False)),
    "xcit_nano_12_p16_224": ({"img_size": 32, "depth": 2}, layout(0, 2, cls=False)),
    "samvit_base_patch16": ({"img_size": 64, "patch_size": 16, "depth": 2, **NARROW}, layout(0, 4, cls=False)),
}


@pytest.fixture(scope="module", params=list(ARCHS))
def backbone(request):
    kwargs, _ = ARCHS[request.param]
    return create_backbone(request.param, "random", kwargs)


def block_outputs(model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Independent reference: each block's output caught by a forward hook in a plain forward pass, as
    ``[B, T, D]`` (SAM's blocks keep a ``[B, H, W, D]`` grid, flattened row-major)."""
    caught = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: caught.append(out)) for block in model.blocks]
    try:
        with torch.no_grad():
            model.forward_features(images)
    finally:
        for hook in hooks:
            hook.remove()
    return [out.flatten(1, 2) if out.dim() == 4 else out for out in caught]


def test_extract_equals_each_block_output_with_the_recorded_layout(backbone):
    images = torch.randn(2, *backbone.data_config["input_size"])
    tokens = backbone.extract(images, list(range(backbone.num_blocks)))
    reference = block_outputs(backbone.model, images)
    for layer, expected in enumerate(reference):
        assert tokens[layer].shape == (2, backbone.num_tokens, backbone.width)
        torch.testing.assert_close(tokens[layer], expected, rtol=1e-5, atol=1e-5)
    assert backbone.token_layout == ARCHS[backbone.name][1]


def test_every_method_trains_a_step_from_a_linear_probe_head(backbone, tmp_path):
    task = subset_task("synth-shapes", {"train": 8, "val": 4, "test": 4})
    settings = RunConfig(epochs=1, batch_size=4, seed=0, progress=False, head_init="linear-probe")
    for name in METHODS:
        hparams = {"layers": "-1", "cache": "never"} if name == "inca" else {}
        result = run_method(name, backbone, task, hparams, settings, tmp_path / name)
        assert math.isfinite(result.loss_curve[-1]), name


def test_distilled_heads_start_and_probe_alike():
    """A distilled DeiT averages two heads' logits: a linear-probe start and the linear method put one head's
    weights into both, so the model's logits are that head's logits on the pooled (averaged) features."""
    backbone = create_backbone("deit_tiny_distilled_patch16_224", "random", TINY)
    task = subset_task("synth-shapes", {"train": 8, "val": 4, "test": 4})
    data = ImageBatches(task, backbone, 0, augment=False)
    settings = RunConfig(epochs=1, batch_size=4, seed=0, progress=False, head_init="linear-probe")
    started = build_model("lora", backbone, task.num_classes, {}, data, settings)  # LoRA's B = 0: the probe's logits
    trained, _ = train_e2e("linear", backbone, task, {}, settings)
    images = torch.cat([x for x, _ in data.loader("val", sequential_batches(0, 4, 4))])
    for model in (started, trained):
        head, dist = logit_layers(model)
        assert torch.equal(head.weight, dist.weight) and torch.equal(head.bias, dist.bias)
        features = pooled_features(model, data, 4, ["val"]).inputs["val"]
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(images), head(features), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "kwargs", "needle"),
    [("swin_tiny_patch4_window7_224", {}, "not a ViT-family transformer"),
     ("naflexvit_base_patch16_gap", {"depth": 1, **NARROW}, "no fixed input size and patch grid")],
)
def test_models_without_a_fixed_token_column_are_one_line_errors(name, kwargs, needle):
    with pytest.raises(InCAError, match=needle) as info:
        create_backbone(name, "random", kwargs)
    assert "\n" not in str(info.value)


def test_linear_pooling_follows_the_backbone_and_refuses_what_it_cannot_read():
    no_cls = create_backbone("vit_relpos_small_patch16_224", "random", TINY)
    assert get_method("linear").make_config().head_pool is None  # auto: timm's own global_pool
    with pytest.raises(InCAError, match="has no class token"):
        trainable_copy(no_cls, 3, pool="cls")
    distilled = create_backbone("deit_tiny_distilled_patch16_224", "random", TINY)
    with pytest.raises(InCAError, match="cannot pool its head's input as mean"):
        trainable_copy(distilled, 3, pool="mean")
