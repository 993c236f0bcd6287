#!/usr/bin/env node
'use strict';
/**
 * Run an edgetl bundle from Node.js: onnxruntime-node for the model, pngjs (pure JS) to decode PNG, and for text
 * bundles Hugging Face's `tokenizers` Node bindings (the same Rust tokenizer runner.py uses) on the bundle's
 * tokenizer.json.
 *
 *   node index.js BUNDLE_DIR [--top-k 3] [--threads 1] INPUT [INPUT ...]
 *
 * Image bundles: INPUT is a PNG file, or a JSON file {"shape": [crop, crop, 3], "data": [uint8, ...]} holding an
 * image that is already prepared (resized + cropped, HWC RGB): then only normalization runs. Text bundles: INPUT
 * is the text itself ('FIRST<TAB>SECOND' for a sentence-pair bundle, "pair": true in preprocess.json). Prints JSON, one entry per input, in the shape `runner.py` uses:
 * [{"file" | "text", "top": [{"label", "prob"}]}].
 *
 * Preprocessing is a port of edgetl/runner.py prepare() + normalize(), including Pillow's fixed-point resampling
 * (bilinear / bicubic), so an 8-bit PNG prepared here is byte-identical to what Python prepares and the float
 * input is bit-identical to what edgetl verified accuracy with. The manifest (sha256 of every file) is checked
 * before the model is loaded, as runner.py does.
 */

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');

class BundleError extends Error {}

const REQUIRED = ['model.onnx', 'labels.json', 'preprocess.json']; // every bundle's manifest lists these

function sha256(file) {
  return crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

/** The file `name` inside the bundle: only plain relative names below it (no absolute paths, '..', backslashes
 * or symlinks out), so a manifest can never make the runner read outside its directory (runner.py safe_name). */
function safeName(dir, name) {
  const parts = typeof name === 'string' ? name.split('/') : [];
  if (!parts.length || name.startsWith('/') || name.includes('\\') || name.includes(':')
      || parts.some((p) => p === '' || p === '.' || p === '..')) {
    throw new BundleError(`manifest.json lists ${JSON.stringify(String(name).slice(0, 80))}: only plain file names inside the bundle are valid`);
  }
  const f = path.join(dir, name);
  let real = null;
  try {
    if (fs.lstatSync(f).isSymbolicLink()) real = '';
    else real = fs.realpathSync(f);
  } catch {
    return f; // missing: the caller says so
  }
  const root = fs.realpathSync(dir);
  if (!real || !(real === root || real.startsWith(root + path.sep))) {
    throw new BundleError(`bundle file ${name} points outside the bundle`);
  }
  return f;
}

function readJson(file, what) {
  try {
    if (fs.statSync(file).size > 16 * 1024 * 1024) throw new Error('too large');
    return JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    throw new BundleError(`cannot read the bundle's ${what} ${path.basename(file)}: ${e.name || 'Error'}`);
  }
}

function verifyManifest(dir) {
  const file = path.join(dir, 'manifest.json');
  if (!fs.existsSync(file)) throw new BundleError(`${dir} has no manifest.json: not an edgetl bundle`);
  let manifest;
  try {
    manifest = readJson(file, 'manifest');
  } catch {
    manifest = null;
  }
  if (!manifest || typeof manifest.files !== 'object' || manifest.files === null || Array.isArray(manifest.files)
      || !Object.values(manifest.files).every((v) => typeof v === 'string')) {
    throw new BundleError(`${file} is not a valid edgetl manifest (corrupt JSON or no 'files' map)`);
  }
  if ((manifest.format || 'edgetl-bundle') !== 'edgetl-bundle') {
    throw new BundleError(`${file} is not an edgetl manifest (format ${JSON.stringify(String(manifest.format).slice(0, 40))})`);
  }
  const unlisted = REQUIRED.filter((name) => !(name in manifest.files));
  if (unlisted.length) {
    throw new BundleError(`manifest.json does not list ${unlisted.join(', ')}: incomplete or tampered bundle`);
  }
  for (const name of Object.keys(manifest.files)) safeName(dir, name);
  // reference material (FP32 model, report, golden set) may be left out of a slim device copy (runner.py too)
  const optional = new Set((manifest.reference || []).filter((name) => !REQUIRED.includes(name)));
  for (const [name, digest] of Object.entries(manifest.files)) {
    const f = safeName(dir, name);
    if (!fs.existsSync(f)) {
      if (optional.has(name)) continue;
      throw new BundleError(`bundle file missing: ${name}`);
    }
    if (sha256(f) !== digest) throw new BundleError(`bundle file changed since build (sha256 mismatch): ${name}`);
  }
  return manifest;
}

async function loadBundle(dir, { threads = 1, check = true, model = 'model.onnx' } = {}) {
  const ort = require('onnxruntime-node'); // loaded here so the preprocessing can be used without it
  const manifest = check ? verifyManifest(dir) : null;
  const read = (name) => readJson(safeName(dir, name), name.replace('.json', ''));
  const preprocess = read('preprocess.json');
  if (!preprocess || typeof preprocess !== 'object' || !['image', 'text'].includes(preprocess.kind)) {
    throw new BundleError("preprocess.json: expected an object with kind 'image' or 'text'");
  }
  if (preprocess.kind === 'text') safeName(dir, preprocess.tokenizer);
  else {
    for (const key of ['resize', 'crop']) {
      if (!Number.isInteger(preprocess[key]) || preprocess[key] < 1 || preprocess[key] > 8192) {
        throw new BundleError(`preprocess.json: ${key} must be an integer between 1 and 8192`);
      }
    }
  }
  const labels = read('labels.json');
  const generates = preprocess.task === 'seq2seq'; // generates text: no class names
  if (!Array.isArray(labels) || !(labels.length || generates) || !labels.every((x) => typeof x === 'string')) {
    throw new BundleError('labels.json must be a non-empty list of class names');
  }
  if (manifest && preprocess.kind === 'text' && !(preprocess.tokenizer in manifest.files)) {
    throw new BundleError(`manifest.json does not list ${preprocess.tokenizer}: incomplete or tampered bundle`);
  }
  if ((preprocess.layout || 'NCHW') !== 'NCHW' || (preprocess.channels || 3) !== 3) {
    throw new BundleError(`unsupported preprocess layout ${preprocess.layout} / channels ${preprocess.channels}`);
  }
  const options = {
    executionProviders: ['cpu'], intraOpNumThreads: threads, interOpNumThreads: 1, graphOptimizationLevel: 'all',
  };
  const session = await ort.InferenceSession.create(safeName(dir, model), options);
  let [decoder, generation] = [null, null]; // seq2seq: the merged decoder beside the encoder, and its token ids
  if (generates) {
    const name = model.replace(/\.onnx$/, '.decoder.onnx');
    for (const file of [name, preprocess.generation]) {
      if (manifest && !(file in manifest.files)) {
        throw new BundleError(`manifest.json does not list ${file}: incomplete or tampered bundle`);
      }
    }
    decoder = await ort.InferenceSession.create(safeName(dir, name), options);
    generation = readJson(safeName(dir, preprocess.generation), 'generation settings');
  }
  const tokenizer = preprocess.kind === 'text' ? loadTokenizer(path.join(dir, preprocess.tokenizer), preprocess) : null;
  let crf = null; // token classification with a CRF: its scores, for Viterbi decoding (runner.py does the same)
  if (preprocess.crf) {
    if (manifest && !(preprocess.crf in manifest.files)) {
      throw new BundleError(`manifest.json does not list ${preprocess.crf}: incomplete or tampered bundle`);
    }
    crf = readJson(safeName(dir, preprocess.crf), 'CRF scores');
  }
  let detection = null; // a detector's anchors and NMS settings, or in_graph: its graph decodes (runner.py Bundle)
  if (preprocess.detection) {
    if (manifest && !(preprocess.detection in manifest.files)) {
      throw new BundleError(`manifest.json does not list ${preprocess.detection}: incomplete or tampered bundle`);
    }
    detection = readJson(safeName(dir, preprocess.detection), 'detection settings');
    const valid = detection && typeof detection === 'object'
      && ['size', 'score_thresh', 'nms'].every((k) => Number.isFinite(detection[k]))
      && (detection.in_graph === true || Array.isArray(detection.anchors)); // in_graph: no anchors
    if (!valid) throw new BundleError(`${preprocess.detection} is not a valid set of detection settings`);
  }
  return { dir, labels, preprocess, session, ort, tokenizer, crf, detection, decoder, generation };
}

// ------------------------------------------------------------------------------------------------------------
// text: the bundle's tokenizer.json, truncated to max_length, padded to the longest text in the batch (runner.py
// load_tokenizer / encode_texts)

function loadTokenizer(file, pre) {
  const { Tokenizer } = require('tokenizers');
  const tok = Tokenizer.fromFile(file);
  tok.disablePadding();
  tok.setTruncation(pre.max_length);
  return tok;
}

/** Texts -> {name: BigInt64Array, dims} for the bundle's inputs (input_ids, attention_mask[, token_type_ids]). */
/** A word as CoNLL files hold them (runner.py WORD): whitespace-separated, leading / trailing punctuation split off. */
const WORD = /[(\[{"'\u201c\u2018]|[^\s]+?(?=[.,;:!?)\]}"'\u201d\u2019]*(?:\s|$))|[.,;:!?)\]}"'\u201d\u2019]/g;

/** The [start, end] character spans of a text's words (runner.py split_words): a token-classification model was
 * trained on pre-split words, and its tokenizer's own pre-tokenizer splits raw text elsewhere. */
function splitWords(text) {
  return [...text.matchAll(WORD)].map((m) => [m.index, m.index + m[0].length]);
}

/** A list of words encoded as Python's `encode_batch(..., is_pretokenized=True)` does (this binding takes strings
 * only): each word's tokens without special tokens, truncated to max_length, inside the post-processor's special
 * tokens; word ids index the words. */
async function encodeWords(tokenizer, words, maxLength) {
  const probe = await tokenizer.encode('a'); // where the post-processor puts its special tokens around one sequence
  const seq = probe.getSequenceIds().map((v) => v !== null && v !== undefined);
  const [first, last] = [seq.indexOf(true), seq.lastIndexOf(true)];
  const [head, tail] = [probe.getIds().slice(0, first), probe.getIds().slice(last + 1)];
  const [ids, wordIds] = [[], []];
  for (const [w, word] of words.entries()) {
    const e = await tokenizer.encode(word, null, { addSpecialTokens: false });
    for (const id of e.getIds()) {
      ids.push(id);
      wordIds.push(w);
    }
  }
  const room = Math.max(0, maxLength - head.length - tail.length);
  const all = [...head, ...ids.slice(0, room), ...tail];
  const nulls = (a) => a.map(() => null);
  return {
    getIds: () => all,
    getTypeIds: () => all.map(() => 0),
    getWordIds: () => [...nulls(head), ...wordIds.slice(0, room), ...nulls(tail)],
  };
}

/** Texts -> int64 feeds; `words`: each text is a list of words (encoded pre-tokenized, as in training). */
async function encodeTexts(tokenizer, texts, pre, words = false) {
  if (pre.pair) { // a sentence-pair bundle: each input is 'FIRST<TAB>SECOND' (runner.py text_inputs)
    const bad = texts.find((t) => t.split('\t').length !== 2 || t.split('\t').some((half) => !half.trim()));
    if (bad !== undefined) {
      throw new BundleError(`this bundle classifies sentence pairs: give each input as 'FIRST<TAB>SECOND' (got ${JSON.stringify(bad)})`);
    }
  }
  const encode = (t) => {
    if (words) return encodeWords(tokenizer, t, pre.max_length);
    return pre.pair ? tokenizer.encode(...t.split('\t')) : tokenizer.encode(t);
  };
  const encs = await Promise.all(texts.map(encode));
  const length = Math.max(...encs.map((e) => e.getIds().length));
  const n = texts.length * length;
  const out = {
    input_ids: new BigInt64Array(n).fill(BigInt(pre.pad_id || 0)),
    attention_mask: new BigInt64Array(n),
    token_type_ids: new BigInt64Array(n),
  };
  encs.forEach((e, i) => {
    const [ids, types] = [e.getIds(), e.getTypeIds()];
    for (let j = 0; j < ids.length; j++) {
      out.input_ids[i * length + j] = BigInt(ids[j]);
      out.attention_mask[i * length + j] = 1n;
      out.token_type_ids[i * length + j] = BigInt(types[j]);
    }
  });
  return { arrays: Object.fromEntries(pre.inputs.map((name) => [name, out[name]])), dims: [texts.length, length], encs };
}

// ------------------------------------------------------------------------------------------------------------
// Pillow's Image.resize for 8-bit images (libImaging/Resample.c): separable passes, coefficients normalized and
// rounded to 22-bit fixed point, accumulated in integers with a rounding offset, clipped to 0..255.

const PRECISION_BITS = 32 - 8 - 2;
const FILTERS = {
  bilinear: { support: 1, fn: (x) => (Math.abs(x) < 1 ? 1 - Math.abs(x) : 0) },
  bicubic: {
    support: 2,
    fn: (x) => {
      const a = -0.5;
      x = Math.abs(x);
      if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
      if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
      return 0;
    },
  },
};

function coefficients(inSize, outSize, filter) {
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1);
  const support = filter.support * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const kk = new Float64Array(outSize * ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const ss = 1 / filterscale;
    const xmin = Math.max(0, Math.trunc(center - support + 0.5));
    const xmax = Math.min(inSize, Math.trunc(center + support + 0.5)) - xmin;
    let ww = 0;
    for (let x = 0; x < xmax; x++) {
      const w = filter.fn((x + xmin - center + 0.5) * ss);
      kk[xx * ksize + x] = w;
      ww += w;
    }
    for (let x = 0; x < xmax; x++) {
      const k = ww !== 0 ? kk[xx * ksize + x] / ww : kk[xx * ksize + x];
      const fixed = k * (1 << PRECISION_BITS);
      kk[xx * ksize + x] = Math.trunc(k < 0 ? fixed - 0.5 : fixed + 0.5);
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, bounds, kk };
}

function clip8(v) {
  if (v >= 2 ** (PRECISION_BITS + 8)) return 255;
  return v <= 0 ? 0 : Math.floor(v / 2 ** PRECISION_BITS);
}

/** One pass along x (horizontal) or y of an RGB HWC image; returns the new image. */
function resamplePass(src, w, h, outSize, filter, horizontal) {
  const { ksize, bounds, kk } = coefficients(horizontal ? w : h, outSize, filter);
  const ow = horizontal ? outSize : w;
  const oh = horizontal ? h : outSize;
  const out = new Uint8Array(ow * oh * 3);
  for (let y = 0; y < oh; y++) {
    for (let x = 0; x < ow; x++) {
      const o = horizontal ? x : y;
      const [min, n] = [bounds[o * 2], bounds[o * 2 + 1]];
      for (let c = 0; c < 3; c++) {
        let ss = 1 << (PRECISION_BITS - 1);
        for (let i = 0; i < n; i++) {
          const idx = horizontal ? (y * w + min + i) * 3 + c : ((min + i) * w + x) * 3 + c;
          ss += src[idx] * kk[o * ksize + i];
        }
        out[(y * ow + x) * 3 + c] = clip8(ss);
      }
    }
  }
  return out;
}

function resize(rgb, w, h, nw, nh, interpolation) {
  const filter = FILTERS[interpolation];
  if (!filter) throw new BundleError(`interpolation ${interpolation} is not supported here (bilinear, bicubic)`);
  let img = rgb;
  // Pillow >= 13 runs the vertical pass first when the height shrinks by more than twice what the width does
  if (h - nh > 0 && h - nh > (w - nw) * 2) {
    img = resamplePass(img, w, h, nh, filter, false);
    return nw !== w ? resamplePass(img, w, nh, nw, filter, true) : img;
  }
  if (nw !== w) img = resamplePass(img, w, h, nw, filter, true);
  if (nh !== h) img = resamplePass(img, nw, h, nh, filter, false);
  return img;
}

/** Python's round(): halves go to the even neighbour. */
function pyRound(x) {
  const f = Math.floor(x);
  const d = x - f;
  return d > 0.5 ? f + 1 : d < 0.5 ? f : f % 2 === 0 ? f : f + 1;
}

/** RGB uint8 HWC of any size -> uint8 HWC crop x crop: runner.py prepare() (shorter side to `resize`, center crop). */
function prepare(rgb, w, h, pre) {
  if (pre.fit === 'stretch') return resize(rgb, w, h, pre.crop, pre.crop, pre.interpolation || 'bilinear'); // detection
  const short = pre.resize;
  const [nw, nh] = w <= h
    ? [short, Math.max(1, pyRound((h * short) / w))]
    : [Math.max(1, pyRound((w * short) / h)), short];
  const img = resize(rgb, w, h, nw, nh, pre.interpolation || 'bilinear');
  const c = pre.crop;
  const [left, top] = [Math.floor((nw - c) / 2), Math.floor((nh - c) / 2)];
  const out = new Uint8Array(c * c * 3); // Pillow's crop fills outside the image with 0
  for (let y = 0; y < c; y++) {
    for (let x = 0; x < c; x++) {
      const [sx, sy] = [x + left, y + top];
      if (sx < 0 || sy < 0 || sx >= nw || sy >= nh) continue;
      for (let k = 0; k < 3; k++) out[(y * c + x) * 3 + k] = img[(sy * nw + sx) * 3 + k];
    }
  }
  return out;
}

/** uint8 HWC (crop x crop) -> float32 CHW, (x / 255 - mean) / std with float32 rounding at each step like numpy. */
function normalize(u8, pre) {
  const hw = u8.length / 3;
  const out = new Float32Array(u8.length);
  const f = Math.fround;
  for (let c = 0; c < 3; c++) {
    const [mean, std] = [f(pre.mean[c]), f(pre.std[c])];
    for (let i = 0; i < hw; i++) out[c * hw + i] = f(f(f(u8[i * 3 + c] / 255) - mean) / std);
  }
  return out;
}

/** A PNG file -> {rgb, width, height}: alpha dropped, grey expanded, like PIL's convert("RGB"). */
function readPng(file) {
  const { PNG } = require('pngjs');
  let png;
  try {
    png = PNG.sync.read(fs.readFileSync(file));
  } catch (e) {
    throw new BundleError(`cannot read image ${file}: ${e.message}`);
  }
  const rgb = new Uint8Array(png.width * png.height * 3);
  for (let i = 0; i < png.width * png.height; i++) for (let k = 0; k < 3; k++) rgb[i * 3 + k] = png.data[i * 4 + k];
  return { rgb, width: png.width, height: png.height };
}

/** An input file (PNG, or prepared JSON) -> uint8 HWC crop x crop. */
function loadInput(file, pre) {
  if (!fs.existsSync(file)) throw new BundleError(`no such file: ${file}`);
  if (file.toLowerCase().endsWith('.json')) {
    let parsed;
    try {
      parsed = JSON.parse(fs.readFileSync(file, 'utf8'));
    } catch (e) {
      throw new BundleError(`cannot read ${file}: ${e.message}`);
    }
    const { shape, data } = parsed;
    const c = pre.crop;
    if (!shape || shape[0] !== c || shape[1] !== c || shape[2] !== 3 || !data || data.length !== c * c * 3) {
      throw new BundleError(`${file}: expected {"shape": [${c}, ${c}, 3], "data": [...]} (prepared uint8 HWC)`);
    }
    return Uint8Array.from(data);
  }
  const { rgb, width, height } = readPng(file);
  return prepare(rgb, width, height, pre);
}

function softmax(logits) {
  const m = Math.max(...logits);
  const e = Array.from(logits, (v) => Math.exp(v - m));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / s);
}

/** Whether the session's first input has its batch dimension fixed at 1 (runner.py run_batch): one image per run. */
function onePer(session) {
  const meta = session.inputMetadata && session.inputMetadata[0];
  return Boolean(meta && Array.isArray(meta.shape) && meta.shape[0] === 1);
}

/** Prepared uint8 HWC images -> logits (array of Float32Array, one per image), one batch through the session; a
 * model whose batch dimension is fixed at 1 (a two-stage detector) runs one image per run (runner.py run_batch), its
 * rows as long as each image's output (no -1 padding needed: the rows stay apart). */
async function logits(bundle, images) {
  if (images.length > 1 && onePer(bundle.session)) {
    const rows = [];
    for (const img of images) rows.push(...(await logits(bundle, [img])));
    return rows;
  }
  const c = bundle.preprocess.crop;
  const size = 3 * c * c;
  const x = new Float32Array(images.length * size);
  images.forEach((u8, i) => x.set(normalize(u8, bundle.preprocess), i * size));
  const feeds = { [bundle.session.inputNames[0]]: new bundle.ort.Tensor('float32', x, [images.length, 3, c, c]) };
  const out = (await bundle.session.run(feeds))[bundle.session.outputNames[0]];
  const n = out.data.length / images.length; // classes, or anchors x (4 + 1 + classes) for a detector
  return images.map((_, i) => out.data.slice(i * n, (i + 1) * n));
}

/** Texts -> logits (array of Float32Array), one batch through the session. */
async function textLogits(bundle, texts) {
  if (texts.some((t) => !t.trim())) throw new BundleError('empty text');
  const { arrays, dims } = await encodeTexts(bundle.tokenizer, texts, bundle.preprocess);
  const feeds = {};
  for (const [name, data] of Object.entries(arrays)) feeds[name] = new bundle.ort.Tensor('int64', data, dims);
  const out = (await bundle.session.run(feeds))[bundle.session.outputNames[0]];
  const n = out.dims[out.dims.length - 1];
  return texts.map((_, i) => out.data.slice(i * n, (i + 1) * n));
}

function topLabels(bundle, names, all, topK, key) {
  return names.map((name, i) => {
    const p = softmax(all[i]);
    const order = p.map((v, j) => j).sort((a, b) => p[b] - p[a]).slice(0, topK);
    return { [key]: name, top: order.map((j) => ({ label: bundle.labels[j], prob: p[j] })) };
  });
}

async function predictFiles(bundle, files, topK = 3) {
  const images = files.map((f) => loadInput(f, bundle.preprocess));
  return topLabels(bundle, files, await logits(bundle, images), topK, 'file');
}

async function predictTexts(bundle, texts, topK = 3) {
  return topLabels(bundle, texts, await textLogits(bundle, texts), topK, 'text');
}

/** The best tag path of a linear-chain CRF over emissions [words][tags] (runner.py viterbi). */
function viterbi(emissions, { start, end, transitions }) {
  const c = start.length;
  let score = start.map((s, j) => s + emissions[0][j]);
  const back = [];
  for (const em of emissions.slice(1)) {
    const next = new Array(c);
    const arg = new Array(c);
    for (let j = 0; j < c; j++) {
      let best = -Infinity;
      for (let i = 0; i < c; i++) {
        const v = score[i] + transitions[i][j];
        if (v > best) [best, arg[j]] = [v, i];
      }
      next[j] = best + em[j];
    }
    back.push(arg);
    score = next;
  }
  let last = 0;
  score.forEach((v, j) => { if (v + end[j] > score[last] + end[last]) last = j; });
  const path = [last];
  for (let b = back.length - 1; b >= 0; b--) path.push(back[b][path[path.length - 1]]);
  return path.reverse();
}

/** Named entities (token-classification bundles), as runner.py predict_entities: the argmax tag of each word's first
 * token, IOB2 tags joined into spans with character offsets, each scored by the mean probability of its words. */
async function predictEntities(bundle, texts) {
  if (texts.some((t) => !t.trim())) throw new BundleError('empty text');
  const where = texts.map(splitWords);
  const wordLists = texts.map((t, i) => where[i].map(([a, b]) => t.slice(a, b)));
  const { arrays, dims, encs } = await encodeTexts(bundle.tokenizer, wordLists, bundle.preprocess, true);
  const feeds = {};
  for (const [name, data] of Object.entries(arrays)) feeds[name] = new bundle.ort.Tensor('int64', data, dims);
  const out = (await bundle.session.run(feeds))[bundle.session.outputNames[0]];
  const [, length, c] = out.dims;
  return texts.map((text, i) => {
    const words = new Map(); // word -> its first token (words cut by truncation have none)
    encs[i].getWordIds().forEach((w, t) => {
      if (w !== null && w !== undefined && !words.has(w)) words.set(w, t);
    });
    const spans = [];
    const order = [...words.keys()].sort((a, b) => a - b);
    const rows = order.map((w) => Array.from(out.data.slice((i * length + words.get(w)) * c, (i * length + words.get(w) + 1) * c)));
    const path = bundle.crf && rows.length ? viterbi(rows, bundle.crf) : rows.map((r) => r.reduce((b, x, j) => (x > r[b] ? j : b), 0));
    for (const [k, w] of order.entries()) {
      const p = softmax(Float32Array.from(rows[k]));
      const best = path[k];
      const tag = bundle.labels[best];
      const [[start, end], kind] = [where[i][w], tag.slice(2)];
      const prev = spans[spans.length - 1];
      if (tag.startsWith('I-') && prev && prev.label === kind && prev.open) {
        prev.end = end;
        prev.probs.push(p[best]);
      } else if (tag !== 'O') {
        spans.push({ label: kind, start, end, probs: [p[best]], open: true });
      }
      if (tag === 'O' && prev) prev.open = false;
    }
    const entities = spans.map((s) => ({
      label: s.label, start: s.start, end: s.end, text: text.slice(s.start, s.end),
      score: s.probs.reduce((a, b) => a + b, 0) / s.probs.length,
    }));
    return { text, entities };
  });
}

// detection: raw head outputs per anchor -> boxes, as runner.py decode_detections (torchvision SSD's BoxCoder and
// postprocess: per-class score threshold and top-k, NMS per class, the best max_det kept); a two-stage detector
// (Faster R-CNN, "in_graph": true) decodes in its graph: its output rows are the boxes
const BOX_CLIP = Math.log(1000 / 16);

/** Greedy NMS over boxes [[x1, y1, x2, y2]] with scores: kept indices, best first (runner.py nms). */
function nms(boxes, scores, iou, limit = Infinity) {
  let order = scores.map((_, i) => i).sort((a, b) => scores[b] - scores[a] || a - b);
  const area = boxes.map((b) => (b[2] - b[0]) * (b[3] - b[1]));
  const keep = [];
  while (order.length && keep.length < limit) {
    const [i, ...rest] = order;
    keep.push(i);
    order = rest.filter((j) => {
      const w = Math.max(0, Math.min(boxes[i][2], boxes[j][2]) - Math.max(boxes[i][0], boxes[j][0]));
      const h = Math.max(0, Math.min(boxes[i][3], boxes[j][3]) - Math.max(boxes[i][1], boxes[j][1]));
      return (w * h) / Math.max(area[i] + area[j] - w * h, 1e-12) <= iou;
    });
  }
  return keep;
}

/** One image's raw outputs (Float32Array [anchors * (4 + 1 + classes)]) -> {boxes, scores, labels}; in_graph: rows
 * [N * 6] of x1, y1, x2, y2 (model-input pixels), score, class id, those scoring below 0 (padding) dropped. */
function decodeDetections(row, params) {
  if (params.in_graph) {
    const [boxes, scores, labels] = [[], [], []];
    for (let o = 0; o + 6 <= row.length; o += 6) {
      if (!(row[o + 4] >= 0)) continue;
      boxes.push(Array.from(row.subarray(o, o + 4)));
      scores.push(row[o + 4]);
      labels.push(Math.trunc(row[o + 5]));
    }
    return { boxes, scores, labels };
  }
  const { anchors, size } = params;
  const width = row.length / anchors.length;
  const [cands, found, scores, labels] = [[], [], [], []];
  const perClass = Array.from({ length: width - 5 }, () => []);
  const boxes = anchors.map((a, k) => {
    const o = k * width;
    const [w, h] = [a[2] - a[0], a[3] - a[1]];
    const [cx, cy] = [a[0] + 0.5 * w, a[1] + 0.5 * h];
    const [dx, dy] = [row[o] / 10, row[o + 1] / 10];
    const [dw, dh] = [Math.min(row[o + 2] / 5, BOX_CLIP), Math.min(row[o + 3] / 5, BOX_CLIP)];
    const [px, py, pw, ph] = [dx * w + cx, dy * h + cy, Math.exp(dw) * w, Math.exp(dh) * h];
    const p = softmax(row.subarray(o + 4, o + width));
    p.slice(1).forEach((v, c) => { if (v > params.score_thresh) perClass[c].push([v, k]); });
    return [px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph].map((v) => Math.min(Math.max(v, 0), size));
  });
  perClass.forEach((hits, c) => {
    hits.sort((x, y) => y[0] - x[0] || x[1] - y[1]);
    for (const [v, k] of hits.slice(0, params.topk)) {
      cands.push(boxes[k].map((x) => x + c * (size + 1))); // classes moved apart: NMS per class in one pass
      found.push(boxes[k]);
      scores.push(v);
      labels.push(c);
    }
  });
  const keep = nms(cands, scores, params.nms, params.max_det);
  return {
    boxes: keep.map((i) => found[i]),
    scores: keep.map((i) => scores[i]),
    labels: keep.map((i) => labels[i]),
  };
}

/** IoU of two boxes [x1, y1, x2, y2] (runner.py box_iou). */
function boxIou(a, b) {
  const w = Math.max(0, Math.min(a[2], b[2]) - Math.max(a[0], b[0]));
  const inter = w * Math.max(0, Math.min(a[3], b[3]) - Math.max(a[1], b[1]));
  const area = (x) => Math.max(0, x[2] - x[0]) * Math.max(0, x[3] - x[1]);
  return inter / Math.max(area(a) + area(b) - inter, 1e-12);
}

/** How far `got`'s detections ([{boxes, scores, labels}] per image) are from `reference`'s (runner.py detection_diff):
 * boxes matched one to one (same class, IoU >= `iou`, the reference's best first); the largest |difference| of a
 * matched pair's coordinates and score, a box left unmatched on either side counting its own score. */
function detectionDiff(reference, got, iou = 0.5, minScore = 0, relative = false) {
  if (reference.length !== got.length) {
    throw new BundleError(`detections of ${got.length} images, expected ${reference.length}`);
  }
  let [diff, hits, total] = [0, 0, 0];
  reference.forEach((r, k) => {
    const g = got[k];
    const pairs = new Map(); // reference index -> got index
    const taken = new Set();
    const desc = (v) => v.map((_, i) => i).sort((a, b) => v[b] - v[a]); // stable: ties keep index order
    for (const i of desc(r.scores)) {
      const ious = g.boxes.map((b, j) => (r.labels[i] === g.labels[j] ? boxIou(r.boxes[i], b) : 0));
      for (const j of desc(ious)) {
        if (ious[j] < iou) break;
        if (!taken.has(j)) {
          pairs.set(i, j);
          taken.add(j);
          break;
        }
      }
    }
    // pairs and lone boxes under minScore are matched but not counted (runner.py detection_diff)
    for (const [i, j] of pairs) {
      if (Math.max(r.scores[i], g.scores[j]) < minScore) continue;
      hits += 1;
      total += 2;
      if (relative) diff = Math.max(diff, 1 - boxIou(r.boxes[i], g.boxes[j])); // runner.py: 1 - IoU, not pixels
      else r.boxes[i].forEach((v, c) => { diff = Math.max(diff, Math.abs(v - g.boxes[j][c])); });
      diff = Math.max(diff, Math.abs(r.scores[i] - g.scores[j]));
    }
    const lone = (scores, used) => scores.forEach((s, i) => {
      if (!used(i) && s >= minScore) {
        total += 1;
        diff = Math.max(diff, s);
      }
    });
    lone(r.scores, (i) => pairs.has(i));
    lone(g.scores, (j) => taken.has(j));
  });
  return { diff, hits, total };
}

/** Objects in image files (detection bundles), as runner.py predict_boxes: boxes in the image's own pixels; a model
 * with its batch dimension fixed at 1 runs one image per run, and an in-graph decoder's boxes are taken as they are. */
async function predictBoxes(bundle, files, minScore = 0.3) {
  const c = bundle.preprocess.crop;
  const images = [];
  const sizes = [];
  for (const f of files) {
    if (!fs.existsSync(f)) throw new BundleError(`no such file: ${f}`);
    const { rgb, width, height } = readPng(f);
    images.push(prepare(rgb, width, height, bundle.preprocess));
    sizes.push([width, height]);
  }
  const rows = await logits(bundle, images);
  return files.map((file, i) => {
    const d = decodeDetections(rows[i], bundle.detection);
    const [w, h] = sizes[i];
    const scale = [w / c, h / c, w / c, h / c];
    const objects = d.boxes.map((b, k) => ({
      label: bundle.labels[d.labels[k]], score: d.scores[k], box: b.map((v, j) => Math.round(v * scale[j] * 10) / 10),
    })).filter((o) => o.score >= minScore);
    return { file, width: w, height: h, objects };
  });
}

/** Image files or texts, whichever this bundle takes (token-classification bundles: entity spans). */
// ------------------------------------------------------------------------------------------------------------
// seq2seq: the encoder once, then optimum's merged decoder one token at a time with its KV cache, greedy
// (runner.py Generator)

/** Generated ids per example for int64 input_ids / attention_mask arrays of shape `dims`: `width` columns, the end
 * token included, then padding (runner.py Generator.run). */
async function generateIds(bundle, inputIds, attentionMask, dims, width) {
  const { ort, session, decoder, generation: g } = bundle;
  const [batch] = dims;
  const mask = new ort.Tensor('int64', attentionMask, dims);
  const enc = await session.run({ input_ids: new ort.Tensor('int64', inputIds, dims), attention_mask: mask });
  const hidden = enc[session.outputNames[0]];
  const past = {}; // empty for the first call (its branch does not read it)
  for (const m of decoder.inputMetadata) {
    if (m.name.startsWith('past_key_values.')) {
      past[m.name] = new ort.Tensor('float32', new Float32Array(0), [batch, m.shape[1], 0, m.shape[3]]);
    }
  }
  const out = Array.from({ length: batch }, () => new Array(width).fill(g.pad_id));
  const done = new Array(batch).fill(false);
  let token = new BigInt64Array(batch).fill(BigInt(g.start_id));
  for (let step = 0; step < width; step++) {
    const res = await decoder.run({
      input_ids: new ort.Tensor('int64', token, [batch, 1]),
      encoder_hidden_states: hidden,
      encoder_attention_mask: mask,
      use_cache_branch: new ort.Tensor('bool', [step > 0], [1]),
      ...past,
    });
    const logits = res[decoder.outputNames[0]];
    const [, steps, vocab] = logits.dims;
    token = new BigInt64Array(batch);
    for (let b = 0; b < batch; b++) {
      const o = (b * steps + steps - 1) * vocab;
      let best = 0;
      for (let v = 1; v < vocab; v++) if (logits.data[o + v] > logits.data[o + best]) best = v;
      if (done[b]) best = g.pad_id;
      out[b][step] = best;
      token[b] = BigInt(best);
      if (best === g.eos_id) done[b] = true;
    }
    if (done.every(Boolean)) break;
    for (const name of decoder.outputNames.slice(1)) {
      const key = name.replace('present.', 'past_key_values.');
      if (step === 0 || key.includes('.decoder.')) past[key] = res[name]; // encoder keys / values: first call's
    }
  }
  return out;
}

/** Each text's generated text (greedy), decoded by the bundle's tokenizer (runner.py Bundle.generate). */
async function generate(bundle, texts, maxNewTokens = null) {
  if (texts.some((t) => !t.trim())) throw new BundleError('empty text');
  const { arrays, dims } = await encodeTexts(bundle.tokenizer, texts, bundle.preprocess);
  const rows = await generateIds(bundle, arrays.input_ids, arrays.attention_mask, dims,
    maxNewTokens || bundle.generation.max_new_tokens);
  const g = bundle.generation;
  const cut = rows.map((r) => { const e = r.indexOf(g.eos_id); return (e < 0 ? r : r.slice(0, e)).filter((x) => x !== g.pad_id); });
  const decoded = await Promise.all(cut.map((ids) => bundle.tokenizer.decode(ids, true)));
  return texts.map((t, i) => ({ text: t, output: decoded[i], tokens: cut[i].length }));
}

async function predict(bundle, inputs, topK = 3) {
  if (bundle.preprocess.task === 'token_classification') return predictEntities(bundle, inputs);
  if (bundle.decoder) return generate(bundle, inputs);
  if (bundle.detection) return predictBoxes(bundle, inputs);
  return bundle.tokenizer ? predictTexts(bundle, inputs, topK) : predictFiles(bundle, inputs, topK);
}

const USAGE = 'usage: node index.js BUNDLE_DIR [--top-k 3] [--threads 1] INPUT... (PNG/JSON files, or texts)\n'
  + '       node index.js BUNDLE_DIR --verify   (the golden set on this machine: PASS exit 0, FAIL exit 1)';

/** The bundle's golden set (golden.json + golden.bin) through this machine's ONNX Runtime, as runner.py verify. */
async function verifyGolden(bundle) {
  const specFile = path.join(bundle.dir, 'golden.json');
  if (!fs.existsSync(specFile)) {
    throw new BundleError('this copy of the bundle has no golden.json (it was left out): copy it to verify');
  }
  const spec = readJson(specFile, 'golden set');
  const raw = fs.readFileSync(safeName(bundle.dir, spec.data));
  const TYPES = { '|u1': Uint8Array, '<i8': BigInt64Array, '<f4': Float32Array };
  const array = (a) => {
    const Type = TYPES[a.dtype];
    if (!Type) throw new BundleError(`golden.json is not a valid golden set: dtype ${a.dtype}`);
    const count = a.shape.reduce((x, y) => x * y, 1);
    const copy = new Uint8Array(raw.subarray(a.offset, a.offset + count * Type.BYTES_PER_ELEMENT)); // aligned copy
    return { data: new Type(copy.buffer), shape: a.shape };
  };
  const arrays = Object.fromEntries(Object.entries(spec.inputs).map(([k, a]) => [k, array(a)]));
  const ref = array(spec.outputs);
  let got;
  if (arrays.images) {
    const [n, c] = arrays.images.shape;
    const size = c * c * 3;
    const imgs = Array.from({ length: n }, (_, i) => arrays.images.data.subarray(i * size, (i + 1) * size));
    const rows = await logits(bundle, imgs);
    if (spec.compare === 'detections') { // final boxes (an in-graph decoder): matched, coordinates and scores compared
      const width = ref.data.length / n; // the reference's rows, padded with -1 to the longest; ours as they came
      const params = { in_graph: true };
      const row = (i) => ref.data.subarray(i * width, (i + 1) * width);
      const want = Array.from({ length: n }, (_, i) => decodeDetections(row(i), params));
      const found = rows.map((r) => decodeDetections(r, params));
      const { diff, hits, total } = detectionDiff(want, found, 0.5, Number(spec.min_score || 0), !!spec.relative);
      const agree = total === 0 ? 1 : (2 * hits) / total;
      return {
        n, max_abs_diff: diff, tolerance: spec.tolerance, top1_agreement: agree, min_agreement: spec.min_agreement,
        passed: diff <= spec.tolerance && agree >= spec.min_agreement, model: spec.model,
      };
    }
    got = new Float32Array(rows.reduce((k, r) => k + r.length, 0));
    rows.forEach((r, i) => got.set(r, i * r.length));
  } else if (spec.compare === 'tokens') { // generated ids: identical outputs, and the share of differing tokens
    const width = ref.shape[1];
    const rows = await generateIds(bundle, arrays.input_ids.data, arrays.attention_mask.data, arrays.input_ids.shape, width);
    let [same, differ] = [0, 0];
    rows.forEach((r, i) => {
      const d = r.filter((x, j) => x !== ref.data[i * width + j]).length;
      differ += d;
      if (d === 0) same += 1;
    });
    const [agree, diff] = [same / rows.length, differ / ref.data.length];
    return {
      n: rows.length, max_abs_diff: diff, tolerance: spec.tolerance, top1_agreement: agree,
      min_agreement: spec.min_agreement, passed: diff <= spec.tolerance && agree >= spec.min_agreement,
      model: spec.model,
    };
  } else {
    const feeds = Object.fromEntries(Object.entries(arrays).map(([k, v]) => [k, new bundle.ort.Tensor('int64', v.data, v.shape)]));
    got = (await bundle.session.run(feeds))[bundle.session.outputNames[0]].data;
  }
  if (got.length !== ref.data.length) throw new BundleError(`the model gives ${got.length} outputs on the golden set, expected ${ref.data.length}`);
  // rows of the last axis; per-token outputs: only the rows at real tokens (spec.positions, runner.py verify_golden)
  const width = ref.shape[ref.shape.length - 1];
  const keep = spec.positions ? arrays[spec.positions].data : null;
  let [diff, agree, rows] = [0, 0, 0];
  const argmax = (v, o) => { let b = 0; for (let j = 1; j < width; j++) if (v[o + j] > v[o + b]) b = j; return b; };
  for (let r = 0; r < ref.data.length / width; r++) {
    if (keep && !keep[r]) continue;
    const o = r * width;
    for (let j = 0; j < width; j++) diff = Math.max(diff, Math.abs(got[o + j] - ref.data[o + j]));
    if (argmax(got, o) === argmax(ref.data, o)) agree += 1;
    rows += 1;
  }
  return {
    n: ref.shape[0], max_abs_diff: diff, tolerance: spec.tolerance, top1_agreement: agree / rows,
    min_agreement: spec.min_agreement, passed: diff <= spec.tolerance && agree / rows >= spec.min_agreement,
    model: spec.model,
  };
}

async function main(argv) {
  const args = { topK: 3, threads: 1, files: [], verify: false };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--top-k') args.topK = Number(argv[++i]);
    else if (argv[i] === '--verify') args.verify = true;
    else if (argv[i] === '--threads') args.threads = Number(argv[++i]);
    else if (argv[i] === '-h' || argv[i] === '--help') return console.log(USAGE), 0;
    else if (!args.bundle) args.bundle = argv[i];
    else args.files.push(argv[i]);
  }
  if (!args.bundle || (args.files.length === 0 && !args.verify)) {
    console.error(`error: ${USAGE.replace('usage: ', 'usage is ').split('\n')[0]}`);
    return 2;
  }
  try {
    const bundle = await loadBundle(args.bundle, { threads: args.threads });
    if (args.verify) {
      const r = await verifyGolden(bundle);
      console.log(JSON.stringify(r, null, 2));
      return r.passed ? 0 : 1;
    }
    console.log(JSON.stringify(await predict(bundle, args.files, args.topK), null, 2));
  } catch (e) {
    if (!(e instanceof BundleError)) throw e;
    console.error(`error: ${e.message}`);
    return 2;
  }
  return 0;
}

module.exports = {
  BundleError, verifyManifest, loadBundle, prepare, normalize, readPng, loadInput, logits, softmax, predictFiles,
  loadTokenizer, encodeTexts, textLogits, predictTexts, predictEntities, predict, verifyGolden, viterbi, splitWords,
  nms, decodeDetections, detectionDiff, predictBoxes, generateIds, generate,
};

if (require.main === module) main(process.argv.slice(2)).then((code) => { process.exitCode = code; });
