// A LoRA implementation in plain JavaScript (Node.js, no packages), graded by reflora's golden files.
//
//   node golden_lora.mjs GOLDEN_DIR RESULTS_DIR
//
// For every case in GOLDEN_DIR/manifest.json: read the inputs from the case's safetensors file,
// compute y, dx, dA, dB and the weights after the case's SGD steps, and write them to
// RESULTS_DIR/<case>.safetensors under the manifest's output names. JavaScript numbers are
// float64, so every case is computed in float64 (a float16 case's inputs are float16 values).
// Legend: N rows, I in_features, O out_features, R rank. Matrices are row-major Float64Arrays.
import fs from "node:fs";
import path from "node:path";

// ---------------------------------------------------------------- safetensors
function halfToFloat(h) {                      // IEEE binary16 -> number
  const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
  if (e === 0) return s * f * 2 ** -24;
  if (e === 31) return f ? NaN : s * Infinity;
  return s * (1 + f / 1024) * 2 ** (e - 15);
}
function readSafetensors(file) {
  const buf = fs.readFileSync(file);
  const n = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + n).toString("utf8"));
  const base = 8 + n, out = {};
  for (const [name, t] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    const [begin, end] = t.data_offsets, data = buf.subarray(base + begin, base + end);
    const size = { F64: 8, F32: 4, F16: 2, BF16: 2 }[t.dtype];
    const v = new Float64Array((end - begin) / size);
    for (let i = 0; i < v.length; i++) {
      if (t.dtype === "F64") v[i] = data.readDoubleLE(8 * i);
      else if (t.dtype === "F32") v[i] = data.readFloatLE(4 * i);
      else if (t.dtype === "F16") v[i] = halfToFloat(data.readUInt16LE(2 * i));
      else { const b = Buffer.alloc(4); b.writeUInt16LE(data.readUInt16LE(2 * i), 2); v[i] = b.readFloatLE(0); } // BF16
    }
    out[name] = { shape: t.shape, data: v };
  }
  return out;
}
function writeSafetensors(file, tensors) {      // every tensor as F64
  const header = {}; let offset = 0;
  for (const [name, t] of Object.entries(tensors)) {
    header[name] = { dtype: "F64", shape: t.shape, data_offsets: [offset, offset + 8 * t.data.length] };
    offset += 8 * t.data.length;
  }
  let json = JSON.stringify(header);
  json += " ".repeat((8 - (json.length % 8)) % 8);   // the reference writer pads to 8 bytes
  const buf = Buffer.alloc(8 + json.length + offset);
  buf.writeBigUInt64LE(BigInt(json.length), 0);
  buf.write(json, 8, "utf8");
  let p = 8 + json.length;
  for (const t of Object.values(tensors)) for (const v of t.data) { buf.writeDoubleLE(v, p); p += 8; }
  fs.writeFileSync(file, buf);
}

// ---------------------------------------------------------------- matrices
// matmul(a, b, n, k, m, ta, tb): (n x k) @ (k x m), where a is stored transposed if ta, b if tb.
function matmul(a, b, n, k, m, ta = false, tb = false) {
  const c = new Float64Array(n * m);
  for (let i = 0; i < n; i++)
    for (let j = 0; j < m; j++) {
      let acc = 0;
      for (let l = 0; l < k; l++) acc += (ta ? a[l * n + i] : a[i * k + l]) * (tb ? b[j * k + l] : b[l * m + j]);
      c[i * m + j] = acc;
    }
  return c;
}
function transpose(a, rows, cols) {             // (rows x cols) -> (cols x rows)
  const t = new Float64Array(rows * cols);
  for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) t[j * rows + i] = a[i * cols + j];
  return t;
}

// ---------------------------------------------------------------- LoRA
// y = x W^T + bias + s ((x * m) A^T) B^T ; A (R, I), B (O, R)
function forward(x, A, B, W, bias, mask, s, N, I, O, R) {
  const xm = mask ? x.map((v, i) => v * mask[i]) : x;
  const hs = matmul(xm, A, N, I, R, false, true).map((v) => s * v);      // s (xm A^T), N x R
  const y = matmul(hs, B, N, R, O, false, true);                          // hs B^T, N x O
  if (W) { const base = matmul(x, W, N, I, O, false, true); y.forEach((_, i) => (y[i] += base[i])); }
  if (bias) y.forEach((_, i) => (y[i] += bias[i % O]));
  return { y, xm, hs };
}
// dB = dy^T hs ; dh = s dy B ; dA = dh^T xm ; dx = (dh A) * m + dy W
function backward(dy, c, A, B, W, mask, s, N, I, O, R) {
  const dB = matmul(dy, c.hs, O, N, R, true, false);
  const dh = matmul(dy, B, N, O, R).map((v) => s * v);
  const dA = matmul(dh, c.xm, R, N, I, true, false);
  const dx = matmul(dh, A, N, R, I);
  if (mask) dx.forEach((_, i) => (dx[i] *= mask[i]));
  if (W) { const base = matmul(dy, W, N, O, I); dx.forEach((_, i) => (dx[i] += base[i])); }
  return { dx, dA, dB };
}
// torch.optim.SGD on one tensor; buf === null before the first step
function sgdUpdate(p, g, buf, o) {
  let d = g.map((v, i) => (o.maximize ? -v : v) + o.weight_decay * p[i]);
  if (o.momentum !== 0) {
    buf = buf === null ? d.slice() : buf.map((b, i) => o.momentum * b + (1 - o.dampening) * d[i]);
    d = o.nesterov ? d.map((v, i) => v + o.momentum * buf[i]) : buf;
  }
  return { p: p.map((v, i) => v - o.lr * d[i]), buf };
}

// ---------------------------------------------------------------- one case
function runCase(golden, c) {
  const t = readSafetensors(path.join(golden, c.file));
  const [I, O, R, s] = [c.I, c.O, c.R, c.scale], N = c.lead.reduce((a, b) => a * b, 1);
  const seed = c.layout === "seed", nA = seed ? "lora_a" : "lora_A", nB = seed ? "lora_b" : "lora_B";
  // the seed layout stores a = A^T (I, R) and b = B^T (R, O)
  const A = seed ? transpose(t[nA].data, I, R) : t[nA].data, B = seed ? transpose(t[nB].data, R, O) : t[nB].data;
  const toFile = (m, rows, cols) => (seed ? transpose(m, rows, cols) : m);   // back to the file's layout
  const W = t.W?.data, bias = t.bias?.data, mask = t.dropout_mask?.data, x = t.x.data;
  const f = forward(x, A, B, W, bias, mask, s, N, I, O, R);
  const g = backward(t.dy.data, f, A, B, W, mask, s, N, I, O, R);
  const shapeA = seed ? [I, R] : [R, I], shapeB = seed ? [R, O] : [O, R];
  const out = {
    y: { shape: [...c.lead, O], data: f.y },
    dx: { shape: [...c.lead, I], data: g.dx },
    ["d_" + nA]: { shape: shapeA, data: toFile(g.dA, R, I) },
    ["d_" + nB]: { shape: shapeB, data: toFile(g.dB, O, R) },
  };
  // training: forward without dropout, L = mean((y - target)^2), backward, SGD on A and B
  let pA = A, pB = B, bufA = null, bufB = null;
  for (let step = 0; step < c.sgd.steps; step++) {
    const fs_ = forward(x, pA, pB, W, bias, null, s, N, I, O, R);
    const dy = fs_.y.map((v, i) => (2 * (v - t.target.data[i])) / fs_.y.length);
    const gs = backward(dy, fs_, pA, pB, W, null, s, N, I, O, R);
    ({ p: pA, buf: bufA } = sgdUpdate(pA, gs.dA, bufA, c.sgd));
    ({ p: pB, buf: bufB } = sgdUpdate(pB, gs.dB, bufB, c.sgd));
  }
  out["sgd." + nA] = { shape: shapeA, data: toFile(pA, R, I) };
  out["sgd." + nB] = { shape: shapeB, data: toFile(pB, O, R) };
  return out;
}

const [golden, results] = process.argv.slice(2);
fs.mkdirSync(results, { recursive: true });
const manifest = JSON.parse(fs.readFileSync(path.join(golden, "manifest.json"), "utf8"));
for (const c of manifest.cases) writeSafetensors(path.join(results, c.name + ".safetensors"), runCase(golden, c));
console.log(`wrote results for ${manifest.cases.length} cases`);
