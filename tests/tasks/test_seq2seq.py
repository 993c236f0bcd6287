"""seq2seq: the warm start, the task's metrics, the data and recipe errors, and one tiny build end to end (fine-tune
-> encoder + merged decoder ONNX -> dynamic INT8 of both -> verify -> bundle -> runner.py generate / verify)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgetl.config import recipe_from_dict
from edgetl.errors import EdgetlError
from tests.conftest import rebuilt_from_cache, write_recipe
from tests.tiny import make_tiny_bert, seq2seq_recipe, write_pairs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("seq2seq")
    return make_tiny_bert(d / "bert"), write_pairs(d / "pairs.csv")


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    from edgetl.pipeline import build

    out = tmp_path_factory.mktemp("s2s_out") / "bundle"
    state = build(recipe_from_dict(seq2seq_recipe(*tiny)), out)
    return state, out


def test_warm_start_encoder_computes_what_the_bert_encoder_computes(tiny):
    import torch
    from transformers import AutoModel, AutoTokenizer

    from edgetl.seq2seq import warm_start

    bert = AutoModel.from_pretrained(tiny[0]).eval()
    tok = AutoTokenizer.from_pretrained(tiny[0])
    model = warm_start(bert, tok.cls_token_id, tok.sep_token_id, tok.pad_token_id).eval()
    enc = tok(["the movie was good", "bad"], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = bert(**enc).last_hidden_state
        got = model.get_encoder()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    real = enc["attention_mask"].bool()
    assert torch.allclose(got[real], want[real], atol=1e-3)  # LayerNorm epsilon 1e-5 vs BERT's 1e-12
    # the decoder starts from the same layers; the LM head is the word embedding
    assert torch.equal(model.model.decoder.layers[0].fc1.weight, bert.encoder.layer[0].intermediate.dense.weight)
    assert model.lm_head.weight.data_ptr() == model.model.shared.weight.data_ptr()
    cross, own = model.model.decoder.layers[1].encoder_attn, bert.encoder.layer[1].attention.self
    assert torch.equal(cross.k_proj.weight, own.key.weight)  # cross-attention starts as the self-attention


def test_metrics_come_from_sacrebleu_and_rouge(tiny):
    from edgetl.runner import load_tokenizer
    from edgetl.tasks.seq2seq import Seq2Seq

    task = Seq2Seq(8)
    task.tokenizer = load_tokenizer(tiny[0] / "tokenizer.json", 8)
    task.ids = {"start_id": 2, "eos_id": 3, "pad_id": 0}
    good = task.tokenizer.encode("the movie was good", add_special_tokens=False).ids
    bad = task.tokenizer.encode("the film is bad", add_special_tokens=False).ids
    ref = [np.array(good + [3]), np.array(bad + [3, 0, 0])]
    assert task.score(ref, ref).value == pytest.approx(100.0)
    wrong = [np.array(bad + [3]), np.array(bad + [3])]
    half = task.details(wrong, ref)
    assert half["exact_match"] == pytest.approx(50.0)
    assert 0 < task.score(wrong, ref).value < 100
    assert task.agreement(wrong, [np.array(bad), np.array(bad)]) == pytest.approx(100.0)  # ids cut at the end token
    em = Seq2Seq(8, metric="exact_match")
    em.tokenizer, em.ids = task.tokenizer, task.ids
    assert em.metric_name == "exact match" and em.score(wrong, ref).value == pytest.approx(50.0)


def test_bad_data_and_recipes_are_one_line_errors(tiny, tmp_path):
    from edgetl.pipeline import build

    recipe = seq2seq_recipe(*tiny)
    no_target = tmp_path / "x.csv"
    no_target.write_text("source,answer\na,b\n")
    with pytest.raises(EdgetlError, match="no column 'target'"):
        build(recipe_from_dict({**recipe, "data": {**recipe["data"], "path": str(no_target)}}), tmp_path / "o1")
    empty = tmp_path / "y.csv"
    empty.write_text("source,target\na,b\nc,\n")
    with pytest.raises(EdgetlError, match="row 2: empty text in column 'target'"):
        build(recipe_from_dict({**recipe, "data": {**recipe["data"], "path": str(empty)}}), tmp_path / "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    with pytest.raises(EdgetlError, match="distill.sequence_level': for seq2seq"):
        recipe_from_dict({**recipe, "task": {"kind": "classification"}, "distill": {"sequence_level": True}})
    with pytest.raises(EdgetlError, match="seq2seq reads csv or jsonl"):
        recipe_from_dict({**recipe, "data": {**recipe["data"], "kind": "rotten_tomatoes"}})


def test_runtime_greedy_loop_equals_transformers_generate(built):
    """runner.Generator (encoder + merged decoder, KV cache, numpy) gives transformers' greedy ids, token for
    token, on the test texts; the INT8 decoder is really quantized."""
    import onnx
    import torch

    from edgetl.measure import model_inputs
    from edgetl.runner import Generator, session

    state, out = built
    feed = model_inputs(state.modality.feeds(state.data.test, batch=16)[0])
    want = state.models["fp32"](*(torch.from_numpy(feed[k]) for k in ("input_ids", "attention_mask"))).numpy()
    gen = session(out / "model.fp32.onnx")
    assert isinstance(gen, Generator)
    assert (want != gen.pad).any()  # it generates something
    np.testing.assert_array_equal(gen.run(None, feed)[0], want)
    ops = {n.op_type for n in onnx.load(str(out / "model.decoder.onnx")).graph.node}
    sub = {
        n.op_type
        for node in onnx.load(str(out / "model.decoder.onnx")).graph.node
        for a in node.attribute
        if a.g is not None
        for n in a.g.node
    }
    assert "MatMulInteger" in ops | sub or "DynamicQuantizeLinear" in ops | sub


def test_runtime_beam_search_equals_transformers_beam_search(built):
    """num_beams 3: the runtime's numpy beam search (cache reordered with the beams) gives transformers' output."""
    import torch

    from edgetl.measure import model_inputs
    from edgetl.runner import session

    state, out = built
    feed = model_inputs(state.modality.feeds(state.data.test, batch=16)[0])
    ids, mask = (torch.from_numpy(feed[k]) for k in ("input_ids", "attention_mask"))
    want = state.models["fp32"].generate(ids, mask, num_beams=3).numpy()
    got = session(out / "model.fp32.onnx").run(None, feed, num_beams=3)[0]
    np.testing.assert_array_equal(got, want)
    greedy = state.models["fp32"](ids, mask).numpy()
    assert not np.array_equal(want, greedy)  # the beams found other outputs than greedy search on some inputs


def test_sampling_filters_are_transformers_warpers():
    """The runtime's temperature / top-k / top-p filter keeps the tokens transformers' logits warpers keep, with the
    same scaled logits (the two differ only in how the remaining tokens are drawn)."""
    import torch
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from edgetl.runner import sample_filter

    logits = np.random.default_rng(0).standard_normal((4, 50)).astype(np.float32) * 3
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.9), (0.5, 20, 0.6), (2.0, 5, 0.3)]:
        want = torch.from_numpy(logits)
        want = TemperatureLogitsWarper(temperature)(None, want)
        if top_k:
            want = TopKLogitsWarper(top_k)(None, want)
        if top_p < 1:
            want = TopPLogitsWarper(top_p)(None, want)
        got = sample_filter(logits, temperature, top_k, top_p)
        np.testing.assert_array_equal(np.isinf(got), torch.isinf(want).numpy())
        np.testing.assert_allclose(got[~np.isinf(got)], want.numpy()[~np.isinf(got)], rtol=1e-6)


def test_sampled_generation_is_seeded_and_top_k_1_is_greedy(built):
    from edgetl.measure import model_inputs
    from edgetl.runner import session

    state, out = built
    feed = model_inputs(state.modality.feeds(state.data.test, batch=16)[0])
    gen = session(out / "model.fp32.onnx")
    greedy = gen.run(None, feed)[0]
    np.testing.assert_array_equal(gen.run(None, feed, sampling={"top_k": 1, "seed": 3})[0], greedy)
    hot = {"temperature": 3.0, "seed": 1}
    first = gen.run(None, feed, sampling=hot)[0]
    np.testing.assert_array_equal(gen.run(None, feed, sampling=hot)[0], first)  # the seed fixes the draw
    assert not np.array_equal(first, greedy)  # a flat distribution picks other tokens
    text = state.data.test.texts[0]
    cmd = [sys.executable, str(out / "runner.py"), str(out), "generate", text, "--json", "--sample", "--seed", "0"]
    runs = [json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout) for _ in range(2)]
    assert runs[0] == runs[1] and runs[0][0]["text"] == text
    bad = subprocess.run(cmd + ["--top-p", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ") and len(bad.stderr.splitlines()) == 1


def test_bundle_generates_and_verifies_on_the_device(built):
    state, out = built
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"model.onnx", "model.decoder.onnx", "generation.json", "tokenizer.json"} <= set(manifest["files"])
    report = json.loads((out / "report.json").read_text())
    assert "unsaved" not in report["metrics"]["cache"]  # every stage's models pickle: a rebuild resumes
    rows = {r["stage"]: r for r in report["rows"]}
    assert rows["ptq"]["shipped"] and {"chrf", "rougeL", "exact_match"} <= set(rows["ptq"])
    assert rows["ptq"]["size_mb"] < rows["fp32"]["size_mb"]  # encoder + decoder, both INT8
    for part in ("encoder", "decoder"):
        assert rows["ptq"]["component_mb"][part] < rows["fp32"]["component_mb"][part]
    assert rows["ptq"]["tokens_per_s"] > 0 and rows["ptq"]["ttft_ms"] > 0
    # the device path (tokenize, generate, detokenize) gives what the build decodes from the same model's ids; one
    # text at a time: dynamic INT8 quantizes activations per batch, so padding in a batch may change a token
    from edgetl.runner import session

    text = state.data.test.texts[0]
    feed = state.modality.feeds(state.data.test, batch=1, limit=1)[0]
    want = state.task.texts(state.task.decode(session(out / "model.onnx").run(None, feed)[0]))
    run = subprocess.run(
        [sys.executable, str(out / "runner.py"), str(out), "generate", text, "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    got = json.loads(run.stdout)
    assert [g["output"] for g in got] == want and got[0]["text"] == text
    assert len(report["metrics"]["verify"]["examples"]) == state.task.n_examples
    ok = subprocess.run([sys.executable, str(out / "runner.py"), str(out), "verify"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PASS" in ok.stdout


def test_golden_tokens_are_compared_exactly(built, tmp_path):
    import shutil

    from edgetl.runner import Bundle

    _, out = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    spec = json.loads((copy / "golden.json").read_text())
    assert spec["compare"] == "tokens"
    blob = bytearray((copy / "golden.bin").read_bytes())
    o = spec["outputs"]
    ids = np.frombuffer(bytes(blob), np.float32, int(np.prod(o["shape"])), o["offset"]).reshape(o["shape"]).copy()
    ids[:, 0] += 1  # every golden output's first token changed
    blob[o["offset"] : o["offset"] + ids.nbytes] = ids.tobytes()
    (copy / "golden.bin").write_bytes(bytes(blob))
    result = Bundle(copy, check=False).verify_golden()
    assert not result["passed"] and result["top1_agreement"] == 0.0


def test_a_t5_checkpoint_builds_and_its_runtime_loop_equals_generate(tiny, tmp_path):
    """The seq2seq-checkpoint path (AutoModelForSeq2SeqLM; T5: decoder start = pad, relative positions), offline: a
    randomly initialised 2-layer T5 with the tiny BERT's tokenizer, built end to end; its exported encoder + merged
    decoder generate what transformers generates."""
    import torch
    from transformers import BertTokenizerFast, T5Config, T5ForConditionalGeneration

    from edgetl.measure import model_inputs
    from edgetl.pipeline import build
    from edgetl.runner import session

    tok = BertTokenizerFast.from_pretrained(tiny[0])
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=tok.vocab_size,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.sep_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    tok.save_pretrained(tmp_path / "t5")
    recipe = seq2seq_recipe(tmp_path / "t5", tiny[1])
    recipe["finetune"]["epochs"] = 2
    with pytest.raises(EdgetlError, match="seq2seq pruning covers BART-family models") as refused:
        build(recipe_from_dict({**recipe, "prune": {"ratio": 0.5}}), tmp_path / "pruned")
    assert "[finetune]" not in str(refused.value) and not (tmp_path / "pruned").exists()  # refused at load
    state = build(recipe_from_dict(recipe), tmp_path / "out")
    assert (tmp_path / "out" / "model.decoder.onnx").is_file()
    assert json.loads((tmp_path / "out" / "generation.json").read_text())["start_id"] == tok.pad_token_id
    feed = model_inputs(state.modality.feeds(state.data.test, batch=16)[0])
    want = state.models["fp32"](*(torch.from_numpy(feed[k]) for k in ("input_ids", "attention_mask"))).numpy()
    np.testing.assert_array_equal(session(tmp_path / "out" / "model.fp32.onnx").run(None, feed)[0], want)


def test_pruned_and_distilled_encoder_decoder_exports_and_generates(tiny, tmp_path, monkeypatch):
    """prune: heads (self-attention, the decoder's cross-attention) and FFN neurons leave encoder and decoder;
    distill: word-level KD on the teacher's generated outputs (sequence-level KD). The pruned decoder's KV cache has
    the fewer heads in the exported graph, and the runtime's generation loop still gives transformers' ids."""
    import torch

    from edgetl.measure import model_inputs
    from edgetl.pipeline import build
    from edgetl.runner import session

    recipe = seq2seq_recipe(*tiny)
    recipe["finetune"]["epochs"] = 6
    recipe["prune"] = {"ratio": 0.5, "steps": 1, "recovery_epochs": 1, "lr": 0.003, "round_to": 8}
    recipe["distill"] = {"epochs": 2, "lr": 0.003, "sequence_level": True}
    recipe["quantize"] = None
    import edgetl.stages.distill as distill

    relabelled = []
    original = distill.teacher_targets
    monkeypatch.setattr(
        distill, "teacher_targets", lambda st, sp: relabelled.append(original(st, sp)) or relabelled[-1]
    )
    state = build(recipe_from_dict(recipe), tmp_path / "out")
    ((split, info),) = relabelled  # the student's training targets are the teacher's greedy outputs
    teacher = state.teacher.eval()
    want = [
        row
        for feed in state.modality.feeds(split)  # the stage's batches: padding is the same
        for row in state.task.decode(
            teacher.generate(*(torch.from_numpy(feed[k]) for k in ("input_ids", "attention_mask")), num_beams=1).numpy()
        )
    ]
    assert split.targets == state.task.texts(want)
    references = state.task.relabel(state.data.train, state.data.train.targets).targets
    same = [a == b for a, b in zip(split.targets, references, strict=True)]
    assert info["teacher_equals_reference"] == pytest.approx(100.0 * np.mean(same))
    step = state.metrics["prune"]["steps"][-1]
    assert step["heads"] == [1] * 6  # 2 encoder self, 2 x (decoder self + cross): 2 heads -> 1
    assert step["ffn"] == [32] * 4  # 64 -> 32 in every encoder and decoder layer
    assert state.metrics["prune"]["macs_after"] < 0.8 * state.metrics["prune"]["macs_before"]
    hf = state.models["distilled"].model
    assert hf.model.decoder.layers[0].encoder_attn.k_proj.out_features == 16  # one head of 16
    assert state.metrics["distill"]["sequence_level"]
    gen = session(tmp_path / "out" / "model.onnx")  # the distilled model ships (no quantize section)
    assert {shape[1] for shape in gen.past.values()} == {1}  # each cached key / value: 1 head
    feed = model_inputs(state.modality.feeds(state.data.test, batch=16)[0])
    want = state.models["distilled"](*(torch.from_numpy(feed[k]) for k in ("input_ids", "attention_mask"))).numpy()
    assert (want != gen.pad).any()
    np.testing.assert_array_equal(gen.run(None, feed)[0], want)


@pytest.mark.parametrize("bias", [True, False])
def test_seq2seq_pruner_ranks_by_taylor_with_or_without_biases(bias):
    """Taylor importance (|weight x gradient|, from a real loss) on a tiny BART with and without biases: heads and FFN
    neurons go in every encoder and decoder layer, the least important ones first, and the model still runs."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    from edgetl.compress.prune import Seq2SeqPruner, prune_step
    from edgetl.config import PruneCfg
    from edgetl.seq2seq import seq2seq_module
    from edgetl.train import TaskLoss

    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        pad_token_id=0, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0,
    )  # fmt: skip
    hf = BartForConditionalGeneration(config)
    if not bias:
        for m in hf.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias = None
    from edgetl.tasks.seq2seq import Seq2Seq

    task = Seq2Seq(6)
    task.ids = {"start_id": 2, "eos_id": 3, "pad_id": 0}
    model = seq2seq_module()(hf, task.generation())
    x = {
        "input_ids": torch.randint(4, 40, (8, 7)),
        "attention_mask": torch.ones(8, 7, dtype=torch.long),
        "decoder_input_ids": torch.randint(4, 40, (8, 5)),
    }
    y = torch.randint(4, 40, (8, 5))
    fc1 = hf.model.encoder.layers[0].fc1
    pruner = Seq2SeqPruner(model, x, PruneCfg(ratio=0.5, head_ratio=0.5, steps=1, importance="taylor", round_to=None))
    loss = TaskLoss(task)
    model.zero_grad()
    loss(model, x, y).backward()
    score = (fc1.weight * fc1.weight.grad).abs().sum(1) + (
        hf.model.encoder.layers[0].fc2.weight * hf.model.encoder.layers[0].fc2.weight.grad
    ).abs().sum(0)
    if bias:
        score = score + (fc1.bias * fc1.bias.grad).abs()
    keep = sorted(score.argsort()[16:].tolist())
    kept_rows = fc1.weight.detach()[keep].clone()
    prune_step(pruner, model, x, [(x, y)], loss)
    assert torch.equal(hf.model.encoder.layers[0].fc1.weight.detach(), kept_rows)  # the 16 most important neurons
    for layer in (hf.model.encoder.layers[0], hf.model.decoder.layers[0]):
        assert layer.fc1.out_features == 16 and layer.fc2.in_features == 16
        assert layer.self_attn.num_heads == 2 and layer.self_attn.q_proj.out_features == 8
    assert hf.model.decoder.layers[0].encoder_attn.num_heads == 2
    with torch.no_grad():
        assert model(**x).shape == (8, 5, 40)
        assert model(x["input_ids"], x["attention_mask"]).shape == (8, 6)  # generation runs too


def test_a_rebuild_in_a_fresh_process_restores_every_stage(tiny, tmp_path, built):
    rebuilt_from_cache(write_recipe(tmp_path / "r.yaml", seq2seq_recipe(*tiny)), tmp_path / "again")
