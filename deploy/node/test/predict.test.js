'use strict';
// The Node example against Python's runner on the same bundle and images. EDGETL_NODE_FIXTURE names the
// fixture.json that make_fixture.py wrote (run_test.sh does both); without it every test is skipped.

const assert = require('node:assert/strict');
const { spawnSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { test } = require('node:test');

const edgetl = require('..');

const FIXTURE = process.env.EDGETL_NODE_FIXTURE;
const skip = FIXTURE ? false : 'EDGETL_NODE_FIXTURE is not set: run deploy/node/run_test.sh';
const fx = FIXTURE ? JSON.parse(fs.readFileSync(FIXTURE, 'utf8')) : { cases: [] };
const INDEX = path.join(__dirname, '..', 'index.js');
const TOL = 1e-4; // ORT versions differ (npm vs PyPI) and Python's softmax is float32: probabilities, not bits

function preparedFromJson(file) {
  return Uint8Array.from(JSON.parse(fs.readFileSync(file, 'utf8')).data);
}

function assertSameBytes(actual, expected, what) {
  assert.equal(actual.length, expected.length, `${what}: length`);
  let differ = 0;
  let worst = 0;
  for (let i = 0; i < actual.length; i++) {
    if (actual[i] !== expected[i]) differ += 1;
    worst = Math.max(worst, Math.abs(actual[i] - expected[i]));
  }
  assert.equal(differ, 0, `${what}: ${differ} of ${actual.length} bytes differ from Python (max ${worst})`);
}

/** Top-k labels must match unless Python's own top-k+1 holds a near tie (then the order is not meaningful). */
function assertSameTop(labels, c, what) {
  const sorted = [...c.probs].sort((a, b) => b - a).slice(0, fx.top_k + 1);
  const tie = sorted.some((v, i) => i > 0 && sorted[i - 1] - v < TOL);
  if (!tie) assert.deepEqual(labels, c.top, `${what}: top-${fx.top_k} labels`);
  else assert.equal(labels[0], c.top[0], `${what}: top-1 label`);
}

function cli(args) {
  return spawnSync(process.execPath, [INDEX, ...args], { encoding: 'utf8' });
}

test('PNG preprocessing is byte-identical to runner.py prepare()', { skip }, () => {
  for (const c of fx.cases) {
    const { rgb, width, height } = edgetl.readPng(c.png);
    assertSameBytes(edgetl.prepare(rgb, width, height, fx.preprocess), preparedFromJson(c.prepared), c.png);
  }
});

test('other resize / crop / interpolation settings match Pillow byte for byte', { skip }, () => {
  for (const c of fx.cases) {
    const { rgb, width, height } = edgetl.readPng(c.png);
    fx.variants.forEach((v, i) => {
      const expected = Buffer.from(c.variants[i], 'base64');
      const actual = edgetl.prepare(rgb, width, height, { ...fx.preprocess, ...v });
      assertSameBytes(actual, expected, `${c.png} ${JSON.stringify(v)}`);
    });
  }
});

test('normalization is bit-identical to runner.py normalize() (float32 rounding at every step)', { skip }, () => {
  for (const c of fx.cases) {
    const x = edgetl.normalize(preparedFromJson(c.prepared), fx.preprocess);
    assertSameBytes(new Uint8Array(x.buffer), Buffer.from(c.normalized, 'base64'), `${c.png} normalized`);
  }
});

test('prepared arrays give the Python runner\'s probabilities and top-k labels', { skip }, async () => {
  const bundle = await edgetl.loadBundle(fx.bundle);
  const all = await edgetl.logits(bundle, fx.cases.map((c) => preparedFromJson(c.prepared)));
  fx.cases.forEach((c, i) => {
    const p = edgetl.softmax(all[i]);
    p.forEach((v, j) => assert.ok(Math.abs(v - c.probs[j]) < TOL, `${c.png}: class ${j} prob ${v} vs ${c.probs[j]}`));
    const order = p.map((v, j) => j).sort((a, b) => p[b] - p[a]).slice(0, fx.top_k);
    assertSameTop(order.map((j) => bundle.labels[j]), c, c.png);
  });
});

test('the CLI prints the same top-k for PNG and prepared JSON inputs as Python', { skip }, () => {
  const inputs = fx.cases.flatMap((c) => [c.png, c.prepared]);
  const r = cli([fx.bundle, '--top-k', String(fx.top_k), ...inputs]);
  assert.equal(r.status, 0, r.stderr);
  const out = JSON.parse(r.stdout);
  assert.equal(out.length, inputs.length);
  fx.cases.forEach((c, i) => {
    const [png, prepared] = [out[2 * i], out[2 * i + 1]];
    assert.deepEqual(png.top, prepared.top, `${c.png}: PNG and prepared JSON must agree exactly`);
    assertSameTop(png.top.map((t) => t.label), c, c.png);
  });
});

test('a tampered bundle or a bad input is refused with one error line and exit code 2', { skip }, () => {
  const copy = fs.mkdtempSync(path.join(os.tmpdir(), 'edgetl-node-'));
  try {
    fs.cpSync(fx.bundle, copy, { recursive: true });
    const labels = path.join(copy, 'labels.json');
    fs.writeFileSync(labels, JSON.stringify(JSON.parse(fs.readFileSync(labels, 'utf8')).reverse()));
    let r = cli([copy, fx.cases[0].png]);
    assert.equal(r.status, 2);
    assert.match(r.stderr, /^error: .*sha256 mismatch.*labels\.json\n$/);

    const manifestFile = path.join(copy, 'manifest.json');
    const manifest = JSON.parse(fs.readFileSync(manifestFile, 'utf8'));
    delete manifest.files['labels.json']; // the swapped file's entry removed from the manifest too
    fs.writeFileSync(manifestFile, JSON.stringify(manifest));
    r = cli([copy, fx.cases[0].png]);
    assert.equal(r.status, 2);
    assert.match(r.stderr, /^error: manifest\.json does not list labels\.json: incomplete or tampered bundle\n$/);
    fs.writeFileSync(manifestFile, '{not json');
    r = cli([copy, fx.cases[0].png]);
    assert.equal(r.status, 2);
    assert.match(r.stderr, /^error: .*is not a valid edgetl manifest/);

    const bad = path.join(copy, 'not-a.png');
    fs.writeFileSync(bad, 'not a png');
    r = cli([fx.bundle, bad]);
    assert.equal(r.status, 2);
    assert.match(r.stderr, /^error: cannot read image/);
  } finally {
    fs.rmSync(copy, { recursive: true, force: true });
  }
});

test('text: the tokenizer gives runner.py encode_texts() arrays exactly (truncation, padding, type ids)', { skip },
  async () => {
    const bundle = await edgetl.loadBundle(fx.text.bundle);
    const { arrays, dims } = await edgetl.encodeTexts(bundle.tokenizer, fx.text.texts, bundle.preprocess);
    assert.deepEqual(Object.keys(arrays), Object.keys(fx.text.feed));
    for (const [name, rows] of Object.entries(fx.text.feed)) {
      assert.deepEqual(dims, [rows.length, rows[0].length], `${name}: shape`);
      assert.deepEqual(Array.from(arrays[name], Number), rows.flat(), `${name}: values`);
    }
  });

test('text: probabilities and top-k labels equal the Python runner\'s, in the library and the CLI', { skip },
  async () => {
    const bundle = await edgetl.loadBundle(fx.text.bundle);
    const all = await edgetl.textLogits(bundle, fx.text.texts);
    fx.text.texts.forEach((t, i) => {
      const p = edgetl.softmax(all[i]);
      p.forEach((v, j) => assert.ok(Math.abs(v - fx.text.probs[i][j]) < TOL, `${t}: class ${j} ${v}`));
    });
    const r = cli([fx.text.bundle, '--top-k', String(fx.top_k), ...fx.text.texts]);
    assert.equal(r.status, 0, r.stderr);
    const out = JSON.parse(r.stdout);
    fx.text.texts.forEach((t, i) => {
      assert.equal(out[i].text, t);
      assertSameTop(out[i].top.map((x) => x.label), { probs: fx.text.probs[i], top: fx.text.top[i] }, t);
    });
    const empty = cli([fx.text.bundle, '  ']);
    assert.equal(empty.status, 2);
    assert.match(empty.stderr, /^error: empty text\n$/);
  });

test('a manifest naming files outside the bundle is refused before anything is read or hashed', { skip }, () => {
  const copy = fs.mkdtempSync(path.join(os.tmpdir(), 'edgetl-node-'));
  try {
    fs.cpSync(fx.bundle, copy, { recursive: true });
    const manifestFile = path.join(copy, 'manifest.json');
    const good = fs.readFileSync(manifestFile, 'utf8');
    for (const name of ['../../etc/passwd', '/etc/passwd', 'sub/../../x', 'a\\b']) {
      const manifest = JSON.parse(good);
      manifest.files[name] = '0'.repeat(64);
      fs.writeFileSync(manifestFile, JSON.stringify(manifest));
      const r = cli([copy, fx.cases[0].png]);
      assert.equal(r.status, 2, name);
      assert.match(r.stderr, /^error: manifest\.json lists .*only plain file names inside the bundle are valid\n$/, name);
    }
    fs.writeFileSync(manifestFile, good);
    fs.rmSync(path.join(copy, 'labels.json'));
    fs.symlinkSync('/etc/hostname', path.join(copy, 'labels.json'));
    const r = cli([copy, fx.cases[0].png]);
    assert.equal(r.status, 2);
    assert.match(r.stderr, /^error: bundle file labels\.json points outside the bundle\n$/);
  } finally {
    fs.rmSync(copy, { recursive: true, force: true });
  }
});

test('verify: the golden set passes here, and a changed golden output fails (image, text and NER bundles)', { skip }, () => {
  for (const dir of [fx.bundle, fx.text.bundle, fx.ner.bundle]) {
    const r = cli([dir, '--verify']);
    assert.equal(r.status, 0, r.stderr);
    const out = JSON.parse(r.stdout);
    assert.ok(out.passed && out.n >= 4 && out.max_abs_diff <= out.tolerance && out.top1_agreement === 1, dir);
  }
  const copy = fs.mkdtempSync(path.join(os.tmpdir(), 'edgetl-node-'));
  try {
    fs.cpSync(fx.bundle, copy, { recursive: true });
    for (const name of ['model.fp32.onnx', 'report.html', 'report.json', 'recipe.lock.yaml', 'runner.py']) {
      fs.rmSync(path.join(copy, name), { force: true }); // a slim device copy: reference material left behind
    }
    assert.equal(cli([copy, '--verify']).status, 0);
    const spec = JSON.parse(fs.readFileSync(path.join(copy, 'golden.json'), 'utf8')).outputs;
    const bin = path.join(copy, 'golden.bin');
    const raw = fs.readFileSync(bin);
    for (let j = 0; j < spec.shape[spec.shape.length - 1]; j++) { // the first example's outputs negated:
      const at = spec.offset + 4 * j; // what a broken device kernel would give
      raw.writeFloatLE(-raw.readFloatLE(at), at);
    }
    fs.writeFileSync(bin, raw);
    const manifestFile = path.join(copy, 'manifest.json');
    const manifest = JSON.parse(fs.readFileSync(manifestFile, 'utf8'));
    manifest.files['golden.bin'] = require('node:crypto').createHash('sha256').update(raw).digest('hex');
    fs.writeFileSync(manifestFile, JSON.stringify(manifest));
    const r = cli([copy, '--verify']);
    assert.equal(r.status, 1);
    assert.equal(JSON.parse(r.stdout).passed, false);
  } finally {
    fs.rmSync(copy, { recursive: true, force: true });
  }
});

test('token classification: entity spans and offsets equal the Python runner\'s, in the library and the CLI', { skip },
  async () => {
    const bundle = await edgetl.loadBundle(fx.ner.bundle);
    const got = await edgetl.predictEntities(bundle, fx.ner.texts);
    got.forEach((r, i) => {
      const want = fx.ner.results[i];
      assert.equal(r.text, want.text);
      assert.deepEqual(r.entities.map((e) => [e.label, e.start, e.end, e.text]),
        want.entities.map((e) => [e.label, e.start, e.end, e.text]), r.text);
      r.entities.forEach((e, j) => assert.ok(Math.abs(e.score - want.entities[j].score) < TOL, `${r.text}: score`));
    });
    const r = cli([fx.ner.bundle, ...fx.ner.texts]);
    assert.equal(r.status, 0, r.stderr);
    assert.deepEqual(JSON.parse(r.stdout).map((x) => x.entities.length), fx.ner.results.map((x) => x.entities.length));
  });

test('words: a text splits into the words runner.py split_words() gives (punctuation off, "don\'t" whole)', { skip }, () => {
  for (const [text, want] of Object.entries(fx.ner.splits)) assert.deepEqual(edgetl.splitWords(text), want, text);
});

test('CRF: the Viterbi path equals runner.py viterbi(), and the CRF bundle reads its crf.json', { skip }, async () => {
  const v = fx.ner.viterbi;
  assert.deepEqual(edgetl.viterbi(v.emissions, v.scores), v.path);
  const bundle = await edgetl.loadBundle(fx.ner.bundle);
  assert.ok(bundle.crf && bundle.crf.transitions.length === bundle.labels.length);
});

test('detection: boxes, labels and scores equal the Python runner\'s on images of other sizes', { skip }, async () => {
  const d = fx.detection;
  const bundle = await edgetl.loadBundle(d.bundle);
  assert.ok(bundle.detection && bundle.detection.anchors.length > 0);
  const got = await edgetl.predictBoxes(bundle, d.files, 0);
  got.forEach((r, i) => {
    const want = d.results[i];
    assert.deepEqual([r.width, r.height], [want.width, want.height]);
    assert.ok(Math.abs(r.objects.length - want.objects.length) <= 1, r.file); // a near-tie at the NMS threshold
    const n = Math.min(10, want.objects.length); // the best boxes: scores far apart enough to order alike
    for (let k = 0; k < n; k++) {
      const [g, w] = [r.objects[k], want.objects[k]];
      assert.equal(g.label, w.label, `${r.file} #${k}`);
      assert.ok(Math.abs(g.score - w.score) < TOL, `${r.file} #${k}: score`);
      g.box.forEach((v, j) => assert.ok(Math.abs(v - w.box[j]) <= 0.11, `${r.file} #${k}: box ${g.box} vs ${w.box}`));
    }
  });
  const r = cli([d.bundle, ...d.files]);
  assert.equal(r.status, 0, r.stderr);
  assert.equal(JSON.parse(r.stdout).length, d.files.length);
});

test('Faster R-CNN (decoded in its graph, one image per run): boxes equal the Python runner\'s; verify matches boxes',
  { skip }, async () => {
    const d = fx.faster_rcnn;
    const bundle = await edgetl.loadBundle(d.bundle);
    assert.ok(bundle.detection.in_graph && !bundle.detection.anchors);
    assert.equal(bundle.session.inputMetadata[0].shape[0], 1); // batch fixed at 1: predictBoxes runs image by image
    const got = await edgetl.predictBoxes(bundle, d.files, d.min_score);
    const sets = (rs) => rs.map((r) => ({
      boxes: r.objects.map((o) => o.box), scores: r.objects.map((o) => o.score), labels: r.objects.map((o) => o.label),
    }));
    const { hits, total } = edgetl.detectionDiff(sets(d.results), sets(got));
    assert.ok(total > 0, 'the tiny Faster R-CNN found no boxes to compare');
    assert.ok(2 * hits >= 0.95 * total, `${hits} of ${total / 2} boxes matched`); // ties at max_det / the threshold
    let [close, want] = [0, 0]; // each of Python's boxes: one of Node's, same class, within rounding and 1e-4
    got.forEach((r, i) => {
      assert.deepEqual([r.width, r.height], [d.results[i].width, d.results[i].height]);
      assert.ok(Math.abs(r.objects.length - d.results[i].objects.length) <= 2, r.file);
      for (const w of d.results[i].objects) {
        want += 1;
        const near = (g) => g.label === w.label && Math.abs(g.score - w.score) < TOL
          && g.box.every((v, j) => Math.abs(v - w.box[j]) <= 0.11);
        if (r.objects.some(near)) close += 1;
      }
    });
    assert.ok(close >= 0.95 * want, `${close} of Python's ${want} boxes found by Node`);
    const r = cli([d.bundle, ...d.files]);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(JSON.parse(r.stdout).length, d.files.length);

    const v = cli([d.bundle, '--verify']); // compare "detections": boxes matched, not outputs of one shape
    assert.equal(v.status, 0, v.stdout + v.stderr);
    assert.ok(JSON.parse(v.stdout).passed);
    const copy = fs.mkdtempSync(path.join(os.tmpdir(), 'edgetl-node-'));
    try {
      fs.cpSync(d.bundle, copy, { recursive: true });
      const spec = JSON.parse(fs.readFileSync(path.join(copy, 'golden.json'), 'utf8'));
      assert.equal(spec.compare, 'detections');
      const bin = path.join(copy, 'golden.bin');
      const raw = fs.readFileSync(bin);
      const [, boxes, width] = spec.outputs.shape;
      assert.ok(boxes > 0 && width === 6 && spec.min_score < 0.99);
      // the first image's first row becomes a confident box of class 0 that the model does not find (a one-epoch
      // detector's own boxes may all score under min_score, which the comparison leaves uncounted)
      [3, 3, 9, 9, 0.99, 0].forEach((v, j) => raw.writeFloatLE(v, spec.outputs.offset + 4 * j));
      fs.writeFileSync(bin, raw);
      const manifestFile = path.join(copy, 'manifest.json');
      const manifest = JSON.parse(fs.readFileSync(manifestFile, 'utf8'));
      manifest.files['golden.bin'] = require('node:crypto').createHash('sha256').update(raw).digest('hex');
      fs.writeFileSync(manifestFile, JSON.stringify(manifest));
      const bad = cli([copy, '--verify']);
      assert.equal(bad.status, 1, bad.stdout + bad.stderr);
      assert.ok(JSON.parse(bad.stdout).top1_agreement < spec.min_agreement);
    } finally {
      fs.rmSync(copy, { recursive: true, force: true });
    }
  });

test('in-graph detections: -1 padding dropped; detectionDiff matches runner.py detection_diff', () => {
  const rows = Float32Array.from([1, 2, 11, 12, 0.9, 2, -1, -1, -1, -1, -1, -1, 0, 0, 5, 5, 0, 0]);
  assert.deepEqual(edgetl.decodeDetections(rows, { in_graph: true }),
    { boxes: [[1, 2, 11, 12], [0, 0, 5, 5]], scores: [Math.fround(0.9), 0], labels: [2, 0] });
  const ref = [{ boxes: [[0, 0, 10, 10], [20, 20, 30, 30]], scores: [0.9, 0.6], labels: [0, 1] }];
  const same = edgetl.detectionDiff(ref, ref);
  assert.deepEqual(same, { diff: 0, hits: 2, total: 4 });
  // one box moved by 1 px, one of another class: 1 matched pair (diff 1), two lone boxes (their scores count)
  const got = [{ boxes: [[1, 0, 11, 10], [20, 20, 30, 30]], scores: [0.85, 0.7], labels: [0, 0] }];
  const r = edgetl.detectionDiff(ref, got);
  assert.deepEqual([r.hits, r.total], [1, 4]);
  assert.ok(Math.abs(r.diff - 1) < 1e-9);
  assert.deepEqual(edgetl.detectionDiff([{ boxes: [], scores: [], labels: [] }], got),
    { diff: 0.85, hits: 0, total: 2 });
  // with minScore 0.3 (golden.json's min_score): a weak pair 3 px apart and a weak lone box are not counted
  const weak = [{ boxes: [[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], scores: [0.9, 0.2, 0.1], labels: [0, 1, 1] }];
  const moved = [{ boxes: [[0, 0, 10, 10], [23, 20, 33, 30]], scores: [0.9, 0.25], labels: [0, 1] }];
  assert.deepEqual(edgetl.detectionDiff(weak, moved, 0.5, 0.3), { diff: 0, hits: 1, total: 2 });
  assert.deepEqual(edgetl.detectionDiff(weak, moved).total, 5);
  // relative: a pair's coordinates count as 1 - IoU (a 10 x 10 box moved 1 px: 1 - 90/110)
  const r2 = edgetl.detectionDiff(ref, [{ boxes: [[1, 0, 11, 10], [20, 20, 30, 30]], scores: [0.9, 0.6], labels: [0, 1] }],
    0.5, 0, true);
  assert.ok(Math.abs(r2.diff - (1 - 90 / 110)) < 1e-9 && r2.hits === 2);
});

test('NMS keeps the highest-scoring box of each overlapping group (runner.py nms)', () => {
  const boxes = [[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9]];
  assert.deepEqual(edgetl.nms(boxes, [0.9, 0.95, 0.5, 0.2], 0.5), [1, 2]);
  assert.deepEqual(edgetl.nms(boxes, [0.9, 0.95, 0.5, 0.2], 0.5, 1), [1]);
});

test('seq2seq: greedy generation (encoder + merged decoder, KV cache) equals the Python runner\'s; verify passes',
  { skip }, async () => {
    const bundle = await edgetl.loadBundle(fx.seq2seq.bundle);
    const got = await edgetl.generate(bundle, fx.seq2seq.texts);
    assert.deepEqual(got, fx.seq2seq.results);
    const r = cli([fx.seq2seq.bundle, ...fx.seq2seq.texts]);
    assert.equal(r.status, 0, r.stderr);
    assert.deepEqual(JSON.parse(r.stdout), fx.seq2seq.results);
    const v = cli([fx.seq2seq.bundle, '--verify']);
    assert.equal(v.status, 0, v.stdout + v.stderr);
    assert.equal(JSON.parse(v.stdout).top1_agreement, 1);
  });
