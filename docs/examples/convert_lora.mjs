// A LoRA format converter in plain JavaScript (Node.js, no packages), graded by reflora's golden cases.
//
//   node convert_lora.mjs PEFT_DIR OUT --to mlx|kohya
//
// Reads a PEFT folder (adapter_config.json + adapter_model.safetensors) and writes an mlx-lm folder
// (adapters.safetensors with lora_a = A^T (I, R), lora_b = B^T (R, O); adapter_config.json with the
// *scale*) or a kohya file (lora_down = A, lora_up = B, alpha). Tensors are copied bit for bit: elements
// are moved as raw bytes, never decoded. Refuses (exit 1) what the target cannot hold.
import fs from "node:fs";
import path from "node:path";

const SIZE = { F64: 8, F32: 4, F16: 2, BF16: 2 };

function readSafetensors(file) {                 // {name: {dtype, shape, bytes}}
  const buf = fs.readFileSync(file);
  const n = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + n).toString("utf8"));
  const out = {};
  for (const [name, t] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    const [b, e] = t.data_offsets;
    out[name] = { dtype: t.dtype, shape: t.shape, bytes: buf.subarray(8 + n + b, 8 + n + e) };
  }
  return out;
}

function writeSafetensors(file, tensors, metadata) {
  const header = metadata ? { __metadata__: metadata } : {};
  let offset = 0;
  for (const [name, t] of Object.entries(tensors)) {
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.bytes.length] };
    offset += t.bytes.length;
  }
  let json = JSON.stringify(header);
  json += " ".repeat((8 - (Buffer.byteLength(json) % 8)) % 8);   // the header is padded to 8 bytes
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(Buffer.byteLength(json)));
  fs.writeFileSync(file, Buffer.concat([len, Buffer.from(json), ...Object.values(tensors).map((t) => t.bytes)]));
}

function transpose(t) {                          // (rows, cols) -> (cols, rows), element bytes moved as they are
  const [rows, cols] = t.shape, size = SIZE[t.dtype], out = Buffer.alloc(t.bytes.length);
  for (let i = 0; i < rows; i++)
    for (let j = 0; j < cols; j++)
      t.bytes.copy(out, (j * rows + i) * size, (i * cols + j) * size, (i * cols + j + 1) * size);
  return { dtype: t.dtype, shape: [cols, rows], bytes: out };
}

function patternValue(patterns, module, fallback) {   // PEFT's get_pattern_key: first p matching (.*\.)?(p)$
  for (const [p, v] of Object.entries(patterns || {})) if (new RegExp(`^(.*\\.)?(${p})$`).test(module)) return v;
  return fallback;
}

function refuse(why) {
  console.error(`refused: ${why}`);
  process.exit(1);
}

const [peftDir, out, flag, to] = process.argv.slice(2);
if (flag !== "--to" || !["mlx", "kohya"].includes(to)) refuse("usage: node convert_lora.mjs PEFT_DIR OUT --to mlx|kohya");
const cfg = JSON.parse(fs.readFileSync(path.join(peftDir, "adapter_config.json"), "utf8"));
const tensors = readSafetensors(path.join(peftDir, "adapter_model.safetensors"));
if (cfg.use_dora || cfg.lora_bias) refuse(`${to} cannot hold DoRA or lora_bias`);
const modules = [];
for (const name of Object.keys(tensors)) {
  const m = name.match(/^base_model\.model\.(.+)\.lora_A\.weight$/);
  if (!m) continue;
  const A = tensors[name], B = tensors[`base_model.model.${m[1]}.lora_B.weight`];
  const R = A.shape[0], alpha = patternValue(cfg.alpha_pattern, m[1], cfg.lora_alpha);
  const scale = alpha / (cfg.use_rslora ? Math.sqrt(R) : R);     // IEEE double, as Python computes it
  modules.push({ path: m[1], A, B, R, alpha, scale });
}

if (to === "mlx") {
  const ranks = new Set(modules.map((m) => m.R)), scales = new Set(modules.map((m) => m.scale));
  if (ranks.size > 1 || scales.size > 1) refuse("mlx-lm holds one rank and one scale for all modules");
  const weights = {}, keys = [];
  for (const m of modules) {
    weights[`${m.path}.lora_a`] = transpose(m.A);
    weights[`${m.path}.lora_b`] = transpose(m.B);
    const key = m.path.replace(/^model\.layers\.\d+\./, "");
    if (!keys.includes(key)) keys.push(key);
  }
  fs.mkdirSync(out, { recursive: true });
  writeSafetensors(path.join(out, "adapters.safetensors"), weights, { format: "mlx" });
  const lora_parameters = { rank: modules[0].R, scale: modules[0].scale, dropout: 0.0, keys };
  fs.writeFileSync(path.join(out, "adapter_config.json"),
    JSON.stringify({ fine_tune_type: "lora", num_layers: -1, lora_parameters }, null, 2));
} else {
  const sd = {};
  for (const m of modules) {
    const name = "lora_unet_" + m.path.replaceAll(".", "_");
    const alpha = m.scale * m.R;                                    // kohya: s = alpha / R
    if (alpha / m.R !== m.scale) refuse(`${m.path}: no alpha gives scale ${m.scale} exactly`);
    const f32 = Math.fround(alpha) === alpha, bytes = Buffer.alloc(f32 ? 4 : 8);
    f32 ? bytes.writeFloatLE(alpha) : bytes.writeDoubleLE(alpha);
    sd[`${name}.lora_down.weight`] = m.A;
    sd[`${name}.lora_up.weight`] = m.B;
    sd[`${name}.alpha`] = { dtype: f32 ? "F32" : "F64", shape: [], bytes };
  }
  writeSafetensors(out, sd, null);
}
console.log(`wrote ${out} (${to}, ${modules.length} modules)`);
