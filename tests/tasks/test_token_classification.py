"""Token classification (NER): tag schemes on plain data, word-to-token alignment, the task's metric, CoNLL and
JSONL sources, and a tiny BERT built end to end into a bundle whose runner returns entity spans."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from edgetl import tagging
from edgetl.cli import main
from edgetl.errors import EdgetlError
from edgetl.tasks import create_task
from tests.conftest import rebuilt_from_cache, write_recipe
from tests.tiny import make_tiny_ner_bert, ner_recipe, ner_sentences, write_conll


def test_schemes_become_iob2():
    assert tagging.to_iob2(["I-PER", "I-PER", "O", "I-LOC", "B-LOC"], "iob1", "f") == [
        "B-PER",
        "I-PER",
        "O",
        "B-LOC",
        "B-LOC",
    ]
    assert tagging.to_iob2(["S-PER", "O", "B-LOC", "I-LOC", "E-LOC"], "bioes", "f") == [
        "B-PER",
        "O",
        "B-LOC",
        "I-LOC",
        "I-LOC",
    ]
    assert tagging.detect_scheme([["O", "I-PER"]]) == "iob1"
    assert tagging.detect_scheme([["B-PER", "E-PER"]]) == "bioes"
    assert tagging.detect_scheme([["B-PER", "I-PER", "O"]]) == "iob2"


@pytest.mark.parametrize(
    "tags, scheme, message",
    [
        (["O", "I-PER"], "iob2", "I- must continue an entity of its type in IOB2"),
        (["B-PER", "I-LOC"], "iob2", "I- must continue"),
        (["B-PER", "O"], "bioes", "has no E- (end) tag"),
        (["B-PER"], "bioes", "ends inside an entity"),
        (["X-PER"], "iob2", "is not O or <B|I|E|S>-<TYPE>"),
    ],
)
def test_invalid_sequences_name_the_line_and_word(tags, scheme, message):
    with pytest.raises(EdgetlError, match=re.escape(message)) as e:
        tagging.to_iob2(tags, scheme, "data.conll line 7")
    assert "data.conll line 7" in str(e.value)


def test_alignment_tags_the_first_sub_token_of_each_word():
    word_ids = [None, 0, 1, 1, 2, None]  # [CLS] alicia->ali ##cia ... [SEP]
    assert tagging.align(word_ids, np.array([3, 1, 0])).tolist() == [-100, 3, 1, -100, 0, -100]


def test_task_metric_is_entity_f1_with_exact_spans():
    task = create_task("token_classification", ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"])
    logits = np.zeros((1, 6, 5), np.float32)
    for t, tag in enumerate([0, 3, 0, 1, 2, 0]):  # [CLS] PER O LOC LOC [pad]
        logits[0, t, tag] = 1.0
    feed = {"attention_mask": np.array([[1, 1, 1, 1, 1, 0]])}
    pred = task.decode(logits, feed)
    assert [p.tolist() for p in pred] == [[0, 3, 0, 1, 2]]  # trimmed to the real tokens
    gold = [np.array([-100, 3, 0, 1, 2])]
    assert task.score(pred, gold).value == 100.0
    half = [np.array([-100, 3, 0, 1, 0])]  # the LOC span cut short: the entity does not count
    assert task.score(pred, half).value == pytest.approx(50.0)  # PER right, LOC wrong: P = R = 1/2
    details = task.details(pred, gold)
    assert details["per_entity"]["PER"]["f1"] == 100.0 and details["token_accuracy"] == 100.0
    assert task.agreement(pred, [np.array([0, 3, 0, 1, 0])]) == 80.0
    assert task.agreement(pred, [np.array([4, 3, 0, 1, 2])], gold) == 100.0  # [CLS] carries no tag: not counted


def test_conll_and_jsonl_read_the_same_tags(tmp_path):
    from edgetl.config import DataCfg
    from edgetl.data import open_sources

    sents = ner_sentences(20)
    conll = write_conll(tmp_path / "d.conll", sents, scheme="bioes")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"tokens": w, "tags": t}) for w, t in sents))
    a, names = open_sources(DataCfg(kind="conll", path=str(conll)), "token_classification")
    b, names_b = open_sources(
        DataCfg(kind="jsonl", path=str(jsonl), text_column="tokens", label_column="tags"), "token_classification"
    )
    assert names == names_b == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert [t.tolist() for t in a["pool"].targets] == [t.tolist() for t in b["pool"].targets]
    assert a["pool"].items == b["pool"].items == [tuple(w) for w, _ in sents]
    bad = tmp_path / "bad.conll"
    bad.write_text("alice NN B-PER\nparis NN I-LOC\n")
    with pytest.raises(EdgetlError, match=r"bad.conll line 1, word 2 \('I-LOC' after 'B-PER'\)"):
        open_sources(DataCfg(kind="conll", path=str(bad), tag_scheme="iob2"), "token_classification")


@pytest.fixture(scope="module")
def ner_bundle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ner")
    bert = make_tiny_ner_bert(tmp / "bert")
    data = write_conll(tmp / "train.conll", ner_sentences(240))
    out = tmp / "bundle"
    result = CliRunner().invoke(
        main, ["build", write_recipe(tmp / "r.yaml", ner_recipe(bert, data)), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "report.json").read_text()), result.output


def test_ner_bundle_is_fine_tuned_pruned_distilled_and_int8(ner_bundle):
    out, report, output = ner_bundle
    assert "unsaved" not in report["metrics"]["cache"]  # every stage's models pickle: a rebuild resumes
    rows = {r["stage"]: r for r in report["rows"]}
    assert report["task"] == "token_classification" and report["metric"]["name"] == "entity F1"
    assert rows["fp32"]["metric_ort"] > 80  # names and places from small lists: easy to learn
    shipped = next(r for r in report["rows"] if r["shipped"])
    assert shipped["stage"] in ("ptq", "static") and shipped["metric_ort"] > 70 and shipped["agreement"] > 90
    assert set(rows["fp32"]["per_entity"]) == {"PER", "LOC"}
    for role in ("fp32", "pruned", "distilled"):  # every float model matches PyTorch per token
        parity = report["metrics"]["export"][role]
        assert parity["max_abs_diff"] <= parity["tolerance"] and parity["agreement"] == 1.0
    assert rows["pruned"]["params"] < rows["fp32"]["params"]
    assert json.loads((out / "labels.json").read_text()) == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    html = (out / "report.html").read_text()
    assert "entity F1" in html and "Test sentences: gold vs predicted entities" in html and "<mark>" in html
    examples = report["metrics"]["verify"]["examples"]
    assert len(examples) == 6 and all(len(e["words"]) == len(e["gold"]) == len(e["pred"]) for e in examples)


def test_report_marks_entities_in_sentences():
    from edgetl.tasks.token_classification import _marked

    html = _marked(["alice", "went", "to", "new", "york"], ["B-PER", "O", "O", "B-LOC", "I-LOC"])
    assert html == "<mark>alice</mark><sub>PER</sub> went to <mark>new york</mark><sub>LOC</sub>"


def test_runner_returns_entity_spans_with_character_offsets(ner_bundle):
    out, _, _ = ner_bundle
    text = "alicia went to new york"
    proc = subprocess.run(
        [sys.executable, str(out / "runner.py"), str(out), "predict", text, "--json"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    ents = json.loads(proc.stdout)[0]["entities"]
    assert [(e["label"], e["text"], e["start"], e["end"]) for e in ents] == [
        ("PER", "alicia", 0, 6),
        ("LOC", "new york", 15, 23),
    ]
    assert all(0 < e["score"] <= 1 for e in ents)
    line = subprocess.run(
        [sys.executable, str(out / "runner.py"), str(out), "predict", text], capture_output=True, text=True
    ).stdout
    assert line.startswith(text + "\tPER 'alicia' [0:6]")
    verify = subprocess.run(
        [sys.executable, str(out / "runner.py"), str(out), "verify"], capture_output=True, text=True
    )
    assert verify.returncode == 0 and verify.stdout.startswith("verify PASS")


def test_the_runner_splits_text_into_words_as_conll_files_hold_them():
    from edgetl.runner import split_words

    text = 'I met Alicia, then (Bob) in "New York". Don\'t #tag @user'
    assert [text[a:b] for a, b in split_words(text)] == [
        *["I", "met", "Alicia", ",", "then", "(", "Bob", ")", "in", '"', "New", "York", '"', "."],
        *["Don't", "#tag", "@user"],
    ]
    assert split_words("  ") == [] and split_words("a\tb\nc") == [(0, 1), (2, 3), (4, 5)]


def test_the_runner_decodes_as_the_build_did(ner_bundle):
    """The device's entities for a test sentence (its words joined by spaces) are the spans of the tags the build
    decoded for the shipped model (the report's examples): the runner feeds the model the same word-start tokens."""
    from seqeval.metrics.sequence_labeling import get_entities

    out, report, _ = ner_bundle
    examples = report["metrics"]["verify"]["examples"]
    texts = [" ".join(e["words"]) for e in examples]
    proc = subprocess.run(
        [sys.executable, str(out / "runner.py"), str(out), "predict", *texts, "--json"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    for e, got in zip(examples, json.loads(proc.stdout), strict=True):
        want = [(kind, " ".join(e["words"][a : b + 1])) for kind, a, b in get_entities(e["pred"])]
        assert [(x["label"], x["text"]) for x in got["entities"]] == want


def test_the_golden_set_compares_real_tokens_only(ner_bundle, tmp_path):
    """Per-token golden outputs: a difference at padding is not a failure, one at a real token is."""
    import shutil

    from edgetl.runner import sha256

    src, _, _ = ner_bundle
    spec = json.loads((src / "golden.json").read_text())
    assert spec["positions"] == "attention_mask"
    mask_spec, out_spec = spec["inputs"]["attention_mask"], spec["outputs"]
    raw = (src / "golden.bin").read_bytes()
    mask = np.frombuffer(raw, np.int64, int(np.prod(mask_spec["shape"])), mask_spec["offset"])
    assert (mask == 0).any() and (mask == 1).any()  # sentences of different lengths: padding in the batch
    width = out_spec["shape"][-1]
    for row, passes in ((int(np.flatnonzero(mask == 0)[0]), True), (int(np.flatnonzero(mask == 1)[0]), False)):
        out = tmp_path / f"copy{row}"
        shutil.copytree(src, out)
        outputs = np.frombuffer(raw, np.float32, int(np.prod(out_spec["shape"])), out_spec["offset"]).copy()
        outputs[row * width : (row + 1) * width] += 100.0
        blob = bytearray(raw)
        blob[out_spec["offset"] : out_spec["offset"] + outputs.nbytes] = outputs.tobytes()
        (out / "golden.bin").write_bytes(bytes(blob))
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["files"]["golden.bin"] = sha256(out / "golden.bin")
        (out / "manifest.json").write_text(json.dumps(manifest))
        proc = subprocess.run(
            [sys.executable, str(out / "runner.py"), str(out), "verify"], capture_output=True, text=True
        )
        assert proc.returncode == (0 if passes else 1), proc.stdout + proc.stderr


def test_runtime_viterbi_equals_the_crf_librarys_decode():
    """The numpy Viterbi every bundle runs (runner.py; Node mirrors it) gives pytorch-crf's own decode."""
    import torch
    from torchcrf import CRF

    from edgetl.runner import viterbi

    torch.manual_seed(0)
    crf = CRF(5, batch_first=True)
    for p in crf.parameters():
        torch.nn.init.normal_(p, std=2.0)  # strong transitions, so the path differs from the per-word argmax
    emissions = torch.randn(6, 9, 5)
    lengths = [9, 7, 5, 3, 2, 1]
    mask = torch.tensor([[t < n for t in range(9)] for n in lengths])
    want = crf.decode(emissions, mask=mask)
    params = {"start": crf.start_transitions, "end": crf.end_transitions, "transitions": crf.transitions}
    params = {k: v.detach().numpy() for k, v in params.items()}
    got = [viterbi(emissions[b, :n].numpy(), **params).tolist() for b, n in enumerate(lengths)]
    assert got == want
    assert any(g != emissions[b, :n].argmax(-1).tolist() for b, (g, n) in enumerate(zip(got, lengths, strict=True)))


def test_crf_loss_trains_and_its_scores_travel_in_the_onnx_metadata(tmp_path):
    import onnx
    import torch

    from edgetl.backbones import build_backbone
    from edgetl.config import BackboneCfg
    from edgetl.measure import model_inputs
    from edgetl.onnx_export import export_onnx

    task = create_task("token_classification", ["O", "B-X", "I-X"], type("Cfg", (), {"crf": True})())
    b = build_backbone(BackboneCfg(name=f"hf:{make_tiny_ner_bert(tmp_path / 'bert')}"), task)
    assert hasattr(b.model, "crf") and any(n.startswith("crf.") for n, _ in b.model.named_parameters())
    from edgetl.config import FinetuneCfg
    from edgetl.stages.finetune import param_groups

    groups, _ = param_groups(b, FinetuneCfg(strategy="freeze", freeze_blocks=2, lr=1e-4, lr_decay=0.9))
    crf = {id(p) for p in b.model.crf.parameters()}
    own = [g for g in groups if {id(p) for p in g["params"]} & crf]
    assert len(own) == 1 and {id(p) for p in own[0]["params"]} == crf  # one group of its own ...
    assert own[0]["lr"] == pytest.approx(1e-2) and all(p.requires_grad for p in b.model.crf.parameters())  # 100x
    x = {
        "input_ids": torch.tensor([[2, 5, 6, 7, 3]]),
        "attention_mask": torch.ones(1, 5, dtype=torch.long),
        "token_type_ids": torch.zeros(1, 5, dtype=torch.long),
    }
    y = torch.tensor([[-100, 1, -100, 2, -100]])  # [CLS] ali(B-X) ##cia bob(I-X) [SEP]
    loss = task.loss(b.model(**x), y, model=b.model)
    loss.backward()
    assert loss > 0 and b.model.crf.transitions.grad is not None
    feed = {k: v.numpy() for k, v in x.items()}
    path = export_onnx(
        b.model.eval(),
        b.contract,
        tmp_path / "m.onnx",
        model_inputs(feed),
        17,
        task.export_metadata(b.model),
        task.optimum_task,
    )
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    from_onnx = task.decode_params(metadata=meta)
    from_torch = task.decode_params(model=b.model)
    assert all(np.allclose(from_onnx[k], from_torch[k]) for k in from_torch)


def test_a_crf_bundle_decodes_with_viterbi_on_the_device(tmp_path):
    bert = make_tiny_ner_bert(tmp_path / "bert")
    recipe = ner_recipe(bert, write_conll(tmp_path / "train.conll", ner_sentences(240)))
    recipe["task"]["crf"] = True
    recipe.pop("distill")  # pruning stays: it must leave the CRF's scores whole
    out = tmp_path / "bundle"
    result = CliRunner().invoke(main, ["build", write_recipe(tmp_path / "r.yaml", recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    shipped = next(r for r in report["rows"] if r["shipped"])
    assert shipped["metric_ort"] > 70
    import onnxruntime as ort

    meta = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).get_modelmeta()
    assert "edgetl.crf" in meta.custom_metadata_map  # the shipped INT8 graph kept the CRF's scores
    scores = json.loads(meta.custom_metadata_map["edgetl.crf"])
    assert np.asarray(scores["transitions"]).shape == (5, 5) and len(scores["start"]) == 5  # pruning left them whole
    assert json.loads((out / "crf.json").read_text()) == scores
    proc = subprocess.run(
        [sys.executable, str(out / "runner.py"), str(out), "predict", "alicia went to new york", "--json"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    ents = json.loads(proc.stdout)[0]["entities"]
    assert [(e["label"], e["text"]) for e in ents] == [("PER", "alicia"), ("LOC", "new york")]


def test_a_rebuild_in_a_fresh_process_restores_every_stage(ner_bundle, tmp_path):
    rebuilt_from_cache(ner_bundle[0].parent / "r.yaml", tmp_path / "again")
