// The Alpaca Instruct page: posts {instruction, input, max_tokens, temperature, top_p, num_beams} to
// <endpoint>/instruct, the route serve.py and the fork's trainML endpoint both serve. With "stream" on, it
// adds stream: true and reads serve.py's server-sent events ({"text": delta} ... then [DONE]).
// The settings' defaults and ranges come from the server (GET /health "limits": GenParams and the ranges of
// alpaca_trainml/generation/limits.py); an empty field sends nothing, so the server's default applies.
"use strict";

const STORE_KEY = "alpaca-instruct-config";
const TIMEOUT_MS = 300000; // a long answer on a CPU can take minutes
const DEFAULTS = {
  endpoint: /^https?:$/.test(location.protocol) ? location.origin : "",
  api_key: "", max_tokens: "", temperature: "", top_p: "", num_beams: "", stream: true,
};
const FIELDS = Object.keys(DEFAULTS);
const NUMBERS = { max_tokens: ["Max tokens", true], temperature: ["Temperature", false], top_p: ["Top p", false],
                  num_beams: ["Beams", true] }; // id: [label, whole numbers only]
let LIMITS = null; // the server's {max_tokens: {default, min, max}, top_p: {default, min_exclusive, max}, ...}
const $ = (id) => document.getElementById(id);

function loadConfig() {
  let saved = {};
  try { saved = JSON.parse(localStorage.getItem(STORE_KEY)) || {}; } catch (e) { saved = {}; }
  setConfig({ ...DEFAULTS, ...saved });
}

function setConfig(values) {
  for (const key of FIELDS) {
    const el = $(key);
    if (el.type === "checkbox") el.checked = Boolean(values[key]); else el.value = values[key];
  }
}

function saveConfig() {
  const values = {};
  for (const key of FIELDS) values[key] = $(key).type === "checkbox" ? $(key).checked : $(key).value;
  try { localStorage.setItem(STORE_KEY, JSON.stringify(values)); } catch (e) { /* private mode: not kept */ }
}

// "0 to 2", "above 0, at most 1"
function rangeText(rule) {
  return rule.min !== undefined ? `${rule.min} to ${rule.max}` : `above ${rule.min_exclusive}, at most ${rule.max}`;
}

// Ask the server for its defaults and ranges; a server without /health (a trainML endpoint) checks them itself.
async function loadLimits() {
  LIMITS = null;
  const endpoint = $("endpoint").value.trim().replace(/\/+$/, "");
  if (/^https?:\/\/\S+$/.test(endpoint)) {
    try {
      const res = await fetch(`${endpoint}/health`, { signal: AbortSignal.timeout(10000) });
      if (res.ok) LIMITS = (await res.json()).limits || null;
    } catch (e) { /* unreachable or no /health: the first request will say so */ }
  }
  for (const id of Object.keys(NUMBERS)) {
    const el = $(id), rule = LIMITS && LIMITS[id];
    el.placeholder = rule ? String(rule.default) : "server default";
    if (rule) {
      el.min = String(rule.min !== undefined ? rule.min : rule.min_exclusive);
      el.max = String(rule.max);
    } else { el.removeAttribute("min"); el.removeAttribute("max"); }
    $(`${id}_range`).textContent = rule ? `${rangeText(rule)}; default ${rule.default}.` : "";
  }
}

// Read and check the settings; throws an Error naming every bad field, as the server would.
function readConfig() {
  const problems = [];
  const num = (id) => {
    const [label, integer] = NUMBERS[id];
    const raw = $(id).value.trim();
    if (raw === "") return undefined; // the server's default
    const value = Number(raw), rule = LIMITS && LIMITS[id];
    const inRange = !rule || (value <= rule.max && (rule.min !== undefined ? value >= rule.min : value > rule.min_exclusive));
    if (!Number.isFinite(value) || (integer && !Number.isInteger(value)) || !inRange) {
      const kind = integer ? "a whole number" : "a number";
      problems.push(`${label} must be ${kind}${rule ? ` ${rule.min !== undefined ? "from " : ""}${rangeText(rule)}` : ""} (got "${raw}")`);
    }
    return value;
  };
  const endpoint = $("endpoint").value.trim().replace(/\/+$/, "");
  if (!/^https?:\/\/\S+$/.test(endpoint)) problems.push(`Endpoint address must start with http:// or https:// (got "${endpoint}")`);
  const config = { endpoint, apiKey: $("api_key").value.trim(), stream: $("stream").checked };
  for (const id of Object.keys(NUMBERS)) config[id] = num(id);
  if (problems.length) throw new Error(problems.join("; "));
  return config;
}

function showError(message) {
  $("error-text").textContent = message;
  $("error-bar").hidden = false;
}

function hideError() { $("error-bar").hidden = true; }

function setLoading(on) {
  const button = $("send");
  button.disabled = on;
  button.setAttribute("aria-busy", String(on));
  button.querySelector(".label").textContent = on ? "Sending…" : "Send";
  if (on) $("response").dataset.state = "loading";
}

function showResponse(text, state) {
  const panel = $("response");
  panel.textContent = text;
  panel.dataset.state = state;
}

// The message of an error answer: {"error": {"message"}} from serve.py, anything else as text.
async function describeError(res) {
  const raw = await res.text();
  let detail = raw;
  try {
    const body = JSON.parse(raw);
    detail = (body && body.error && body.error.message) || (body && body.detail) || raw;
    if (typeof detail !== "string") detail = JSON.stringify(detail);
  } catch (e) { /* not JSON: keep the text */ }
  return `The server answered ${res.status}${res.statusText ? " " + res.statusText : ""}: ${detail || "(no message)"}`;
}

// Server-sent events: "data: {json}" blocks separated by a blank line, ending with "data: [DONE]".
async function readEvents(res, onEvent) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) onEvent(JSON.parse(data));
    }
    if (done) return;
  }
}

async function send(event) {
  event.preventDefault();
  hideError();
  const instruction = $("instruction").value;
  $("instruction").setAttribute("aria-invalid", String(!instruction.trim()));
  let config;
  try {
    if (!instruction.trim()) throw new Error("Instruction is required: say what the model should do.");
    config = readConfig();
  } catch (e) {
    showError(e.message);
    return;
  }
  saveConfig();
  const input = $("input").value;
  const body = { instruction };
  for (const id of Object.keys(NUMBERS)) if (config[id] !== undefined) body[id] = config[id];
  if (input.trim()) body.input = input;
  if (config.stream) body.stream = true;
  const headers = { "Content-Type": "application/json" };
  if (config.apiKey) headers.Authorization = `Bearer ${config.apiKey}`;

  setLoading(true);
  showResponse("", "loading");
  $("stats").textContent = "";
  const started = performance.now();
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), TIMEOUT_MS);
  let text = "";
  try {
    const res = await fetch(`${config.endpoint}/instruct`, { method: "POST", headers, body: JSON.stringify(body),
                                                            signal: controller.signal });
    if (!res.ok) throw new Error(await describeError(res));
    let usage = null;
    if ((res.headers.get("content-type") || "").startsWith("text/event-stream")) {
      await readEvents(res, (ev) => {
        if (ev.error) throw new Error(`The server failed while answering: ${ev.error.message}`);
        if (ev.text) { text += ev.text; showResponse(text, "loading"); }
        if (ev.usage) usage = ev.usage;
      });
    } else {
      const data = await res.json(); // the trainML route answers with the text as a JSON string
      text = typeof data === "string" ? data : (data.text ?? data.response ?? JSON.stringify(data));
    }
    showResponse(text || "(the model returned an empty answer)", text ? "done" : "empty");
    const secs = ((performance.now() - started) / 1000).toFixed(1);
    $("stats").textContent = usage ? `${usage.completion_tokens} tokens · ${secs} s` : `${secs} s`;
  } catch (e) {
    showResponse(text, text ? "done" : "empty");
    if (e.name === "AbortError") showError(`No answer from ${config.endpoint} within ${TIMEOUT_MS / 1000} s.`);
    else if (e instanceof TypeError) showError(`Could not reach ${config.endpoint}: is the server running, and does it ` +
                                              "accept requests from this page (CORS)?");
    else showError(e.message);
  } finally {
    clearTimeout(timer);
    setLoading(false);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  loadConfig();
  $("ask").addEventListener("submit", send);
  $("instruction").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("ask").requestSubmit(); });
  $("input").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("ask").requestSubmit(); });
  $("config").addEventListener("change", saveConfig);
  $("reset").addEventListener("click", () => { setConfig(DEFAULTS); saveConfig(); loadLimits(); });
  $("endpoint").addEventListener("change", loadLimits);
  loadLimits();
  $("error-close").addEventListener("click", hideError);
});
