import pytest

from edgetl.config import Recipe, load_recipe, recipe_from_dict
from edgetl.errors import EdgetlError


def test_recipe_loads_with_defaults(tiny_raw):
    r = recipe_from_dict(tiny_raw)
    assert isinstance(r, Recipe)
    assert r.backbone.pretrained is False
    assert r.export.opset == 17  # section present by default
    assert r.data.augment.hflip is False and r.data.augment.random_resized_crop is True


def test_unknown_key_fails_with_its_name(tiny_raw):
    tiny_raw["finetune"]["epochz"] = 3
    with pytest.raises(EdgetlError, match=r"finetune\.epochz"):
        recipe_from_dict(tiny_raw)


def test_wrong_type_fails_with_its_name(tiny_raw):
    tiny_raw["finetune"]["epochs"] = "three"
    with pytest.raises(EdgetlError, match=r"finetune\.epochs.*integer"):
        recipe_from_dict(tiny_raw)
    tiny_raw["finetune"]["epochs"] = 3
    tiny_raw["finetune"]["strategy"] = "everything"
    with pytest.raises(EdgetlError, match=r"finetune\.strategy.*linear_probe"):
        recipe_from_dict(tiny_raw)


def test_missing_required_key(tiny_raw):
    del tiny_raw["backbone"]["name"]
    with pytest.raises(EdgetlError, match=r"backbone\.name.*required"):
        recipe_from_dict(tiny_raw)


def test_set_overrides_are_typed_and_strict(tiny_raw):
    r = recipe_from_dict(tiny_raw, ["finetune.epochs=1", "backbone.pretrained=/w.pth", "data.augment.hflip=true"])
    assert r.finetune.epochs == 1 and r.backbone.pretrained == "/w.pth" and r.data.augment.hflip is True
    with pytest.raises(EdgetlError, match=r"finetune\.epocs"):
        recipe_from_dict(tiny_raw, ["finetune.epocs=1"])
    with pytest.raises(EdgetlError, match=r"finetune\.lr.*number"):
        recipe_from_dict(tiny_raw, ["finetune.lr=fast"])
    with pytest.raises(EdgetlError, match="key=value"):
        recipe_from_dict(tiny_raw, ["finetune.lr"])


def test_set_creates_an_absent_section(tiny_raw):
    del tiny_raw["finetune"]
    assert recipe_from_dict(tiny_raw).finetune is None
    assert recipe_from_dict(tiny_raw, ["finetune.epochs=2"]).finetune.epochs == 2


def test_bad_yaml_is_one_clear_error(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(EdgetlError, match="not valid YAML"):
        load_recipe(p)
    with pytest.raises(EdgetlError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_shipped_recipes_parse():
    from pathlib import Path

    recipes = sorted(Path(__file__).parent.parent.joinpath("models").glob("*.yaml"))
    assert recipes
    for path in recipes:
        assert load_recipe(path).name


def test_readme_recipe_reference_lists_every_key_with_its_default(tmp_path):
    """The README's recipe reference is a valid recipe (the strict loader checks it), names every key of every
    section, and shows each key's real default (only the example name, backbone and data source differ)."""
    import dataclasses
    from pathlib import Path

    import yaml

    from edgetl import config

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = text.split("## Recipe reference", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    path = tmp_path / "reference.yaml"
    path.write_text(block)
    recipe = load_recipe(path)
    raw = yaml.safe_load(block)
    examples = {"name", "backbone.name", "data.kind", "data.path"}

    def check(obj, cls, raw_section: dict, prefix: str) -> None:
        names = [f.name for f in dataclasses.fields(cls)]
        assert set(raw_section) == set(names), f"{prefix}: README keys differ from {cls.__name__}"
        for f in dataclasses.fields(cls):
            key, value = prefix + f.name, getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                check(value, type(value), raw_section[f.name], key + ".")
                continue
            default = (
                f.default
                if f.default is not dataclasses.MISSING
                else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            )
            if key not in examples and f.name not in ("backbone", "data"):
                assert value == default, f"README shows {key}: {value!r}, the default is {default!r}"

    check(recipe, config.Recipe, raw, "")
    for section in ("finetune", "prune", "distill", "quantize"):
        assert getattr(recipe, section) is not None, section


def test_bench_settings_are_valid_overrides_of_the_demo_recipe():
    """benchmarks/compression.py's BENCH_SET and backbone swaps load strictly on the demo recipe (a renamed key
    would otherwise fail only an hour into `make bench`)."""
    import benchmarks.compression as bench

    for key, swap in bench.BACKBONES.items():
        recipe = load_recipe(bench.RECIPE, bench.BENCH_SET + swap)
        assert recipe.backbone.name == swap[0].split("=", 1)[1], key
        assert recipe.data.max_test == 10_000 and recipe.quantize.float_leading_convs == "auto"
        assert recipe.prune.round_to == 32 and recipe.distill.transfer_size == 12_000
        assert recipe.prune.target_macs == {"mobilenet_v2": 0.28, "lite0": 0.18}[key]  # the backbone's own wins


@pytest.mark.parametrize(
    "override,message",
    [
        ("verify.runs=0", "recipe key 'verify.runs': 0 must be >= 1"),
        ("quantize.float_leading_convs=-1", "recipe key 'quantize.float_leading_convs': -1 must be auto or >= 0"),
        ("prune.ratio=1.0", "recipe key 'prune.ratio': 1.0 must be in [0, 1)"),
        ("data.val_fraction=0", "recipe key 'data.val_fraction': 0.0 must be between 0 and 1"),
        ("name=../elsewhere", "recipe key 'name': '../elsewhere' must be a plain file name"),
        ("name=", "recipe key 'name'"),
        ("export=", "recipe key 'export': a bundle ships an ONNX model"),
    ],
)
def test_out_of_range_values_fail_with_the_key(tiny_raw, override, message):
    """Values the stages cannot use (0 timed runs, a negative count, a ratio of 1, a bundle name that is a path)
    fail when the recipe loads, naming the key, not at the end of a long build."""
    with pytest.raises(EdgetlError) as e:
        recipe_from_dict(tiny_raw, [override])
    assert str(e.value).startswith(message)
