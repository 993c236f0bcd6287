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


def test_readme_recipe_reference_is_a_valid_recipe(tmp_path):
    """The README's recipe reference names every key with a valid value (the strict loader checks both)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = text.split("## Recipe reference", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    path = tmp_path / "reference.yaml"
    path.write_text(block)
    recipe = load_recipe(path)
    assert recipe.prune is not None and recipe.distill is not None and recipe.quantize is not None
    assert recipe.quantize.float_leading_convs == "auto" and recipe.distill.feature_layers == ()


def test_bench_settings_are_valid_overrides_of_the_demo_recipe():
    """benchmarks/compression.py's BENCH_SET and backbone swaps load strictly on the demo recipe (a renamed key
    would otherwise fail only an hour into `make bench`)."""
    import benchmarks.compression as bench

    for key, swap in bench.BACKBONES.items():
        recipe = load_recipe(bench.RECIPE, swap + bench.BENCH_SET)
        assert recipe.backbone.name == swap[0].split("=", 1)[1], key
        assert recipe.data.max_test == 10_000 and recipe.quantize.float_leading_convs == "auto"
        assert recipe.prune.target_macs == 0.22 and recipe.distill.transfer_size == 12_000
