// The agentstream operator console: reads the worker's snapshot stream and shows it.
// No framework, no build step, nothing loaded from elsewhere (the page's CSP allows only
// this worker). Every value from the stream is set with textContent, never as HTML: dead
// letters and reasons are bytes someone else wrote.
"use strict";

const KEY = "agentstream.console.token";
const $ = (sel) => document.querySelector(sel);
let token = null;
let abort = null;
let latest = null;
let backoff = 1000;
let dlSearched = null; // the result of a dead-letter search, or null while live
const rateHistory = []; // [accepted, rejected, dead-lettered] per frame, newest last

// -- connecting -------------------------------------------------------------------------
// The token goes in the Authorization header of fetch(): an EventSource cannot send
// headers, and a token in the URL would end up in access logs and the browser history.
// It is kept in sessionStorage: this tab only, gone when it closes.
function start() {
  const saved = sessionStorage.getItem(KEY);
  $("#login").addEventListener("submit", (e) => {
    e.preventDefault();
    const value = $("#token").value.trim();
    if (!value) return;
    sessionStorage.setItem(KEY, value);
    $("#token").value = "";
    connect(value);
  });
  $("#logout").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    disconnect("Token forgotten");
  });
  $("#agent-search").addEventListener("input", () => latest && renderAgents(latest));
  $("#dl-filter").addEventListener("submit", (e) => { e.preventDefault(); searchDeadLetters(); });
  $("#dl-live").addEventListener("click", () => { dlSearched = null; latest && renderDeadLetters(latest); });
  $("#dl-copy").addEventListener("click", copyReplay);
  $("#dl-close").addEventListener("click", () => { $("#dl-detail").hidden = true; });
  if (saved) connect(saved);
}

function setConn(state, text) {
  const el = $("#conn");
  el.dataset.state = state;
  el.textContent = text;
}

function disconnect(message) {
  if (abort) abort.abort();
  abort = null;
  token = null;
  $("#main").hidden = true;
  $("#login").hidden = false;
  setConn("off", message);
  $("#token").focus();
}

function authHeaders() {
  return { Authorization: "Bearer " + token };
}

async function connect(value) {
  token = value;
  if (abort) abort.abort();
  abort = new AbortController();
  const signal = abort.signal;
  $("#login-error").textContent = "";
  setConn("connecting", "Connecting…");
  let resp;
  try {
    resp = await fetch("/ui/api/stream", { headers: authHeaders(), cache: "no-store", signal });
  } catch (err) {
    if (signal.aborted) return;
    return retry(`Cannot reach the worker (${err.message || err})`);
  }
  if (resp.status === 401 || resp.status === 403) {
    let reason = "";
    try { reason = (await resp.json()).reason || ""; } catch (_) { /* not JSON */ }
    sessionStorage.removeItem(KEY);
    disconnect("Not connected");
    $("#login-error").textContent = `The worker refused the token (HTTP ${resp.status}) ${reason}`;
    return;
  }
  if (!resp.ok || !resp.body) return retry(`The worker answered HTTP ${resp.status}`);
  $("#login").hidden = true;
  $("#main").hidden = false;
  setConn("live", "Live");
  backoff = 1000;
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value: chunk, done } = await reader.read();
      if (done) break;
      buffer += chunk;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        onFrame(frame);
      }
    }
  } catch (err) {
    if (signal.aborted) return;
  }
  if (!signal.aborted && token) retry("The stream ended");
}

function retry(message) {
  setConn("stale", `${message}; retrying in ${Math.round(backoff / 1000)} s`);
  const again = token;
  setTimeout(() => { if (token === again) connect(again); }, backoff);
  backoff = Math.min(backoff * 2, 30000);
}

function onFrame(frame) {
  let event = "message";
  const data = [];
  for (const line of frame.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (event === "end") { sessionStorage.removeItem(KEY); disconnect(data.join(" ") || "Ended"); return; }
  if (event !== "snapshot" || !data.length) return;
  const doc = JSON.parse(data.join("\n"));
  latest = doc;
  render(doc);
  setConn("live", `Live — ${doc.at}`);
}

// -- helpers ----------------------------------------------------------------------------
function get(doc, path) {
  let v = doc;
  for (const part of path.split(".")) {
    if (v === null || v === undefined) return undefined;
    v = v[part];
  }
  return v;
}

function fmt(v) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(2);
  if (typeof v === "boolean") return v ? "yes" : "no";
  return String(v);
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = fmt(text);
  if (cls) e.className = cls;
  return e;
}

function fill(tableSel, rows, empty) {
  const body = $(tableSel + " tbody");
  const out = [];
  for (const cells of rows) {
    const tr = document.createElement("tr");
    for (const c of cells) tr.append(c instanceof Node ? c : el("td", c));
    out.push(tr);
  }
  if (!out.length) {
    const tr = document.createElement("tr");
    const td = el("td", empty || "nothing yet", "empty");
    td.colSpan = $(tableSel + " thead tr") ? $(tableSel + " thead tr").children.length : 1;
    tr.append(td);
    out.push(tr);
  }
  body.replaceChildren(...out);
}

function statusCell(status) {
  const td = el("td", status, "status status-" + String(status));
  td.dataset.status = String(status);
  return td;
}

// -- rendering --------------------------------------------------------------------------
function render(doc) {
  for (const node of document.querySelectorAll("[data-k]")) {
    node.textContent = fmt(get(doc, node.dataset.k));
  }
  const problems = Object.entries(doc.problems || {});
  $("#problems-box").hidden = !problems.length;
  $("#problems").replaceChildren(...problems.map(([k, v]) => el("li", `${k}: ${v}`)));
  renderAgents(doc);
  renderMessages(doc);
  renderDeadLetters(doc);
  renderLlm(doc);
  renderPipeline(doc);
  renderPolicies(doc);
}

function renderAgents(doc) {
  const q = $("#agent-search").value.trim().toLowerCase();
  const hit = (id) => !q || String(id).toLowerCase().includes(q);
  const agents = doc.agents.list.filter((a) => hit(a.agent_id));
  fill("#agent-table", agents.map((a) => {
    const row = [a.agent_id, statusCell(a.status), a.seconds_since_heartbeat, a.status_changed_at];
    return row;
  }), q ? "no agent matches" : "no agent has sent a heartbeat yet");
  for (const tr of $("#agent-table tbody").children) {
    if (tr.firstChild && tr.children.length > 1) tr.dataset.agent = tr.firstChild.textContent;
  }
  const changes = doc.agents.timeline.filter((t) => hit(t.agent_id));
  fill("#timeline-table", changes.map((t) => [
    t.changed_at, t.agent_id, `${t.previous || "new"} → ${t.current}`, t.reason,
  ]), "no status change yet");
}

function renderMessages(doc) {
  const m = doc.messages;
  rateHistory.push([m.accepted_per_s, m.rejected_per_s, m.dead_lettered_per_s]);
  if (rateHistory.length > 120) rateHistory.shift();
  drawRates();
  fill("#rules-table", m.top_rules, "no rejection");
  fill("#policies-top-table", m.top_policies, "no rejection in the recent decisions");
  fill("#decisions-table", m.recent.map((d) => [
    d.at, d.message_id, `${d.sender_id} → ${d.recipient_id || "–"}`,
    statusCell(d.verdict), d.rules.join(", ") || "–", d.reasons.join("; ") || "–",
  ]), "no decision yet");
}

function drawRates() {
  const NS = "http://www.w3.org/2000/svg";
  const w = 600, h = 80;
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("aria-hidden", "true");
  const max = Math.max(1, ...rateHistory.flat());
  ["accepted", "rejected", "dead"].forEach((name, i) => {
    const pts = rateHistory.map((r, x) =>
      `${(x * w) / 119},${h - 2 - ((r[i] || 0) * (h - 4)) / max}`).join(" ");
    const line = document.createElementNS(NS, "polyline");
    line.setAttribute("points", pts);
    line.setAttribute("class", "line-" + name);
    svg.append(line);
  });
  const legend = el("p", `scale: 0 – ${max.toFixed(1)} per second; accepted (solid), rejected (dashed), dead-lettered (dotted)`, "legend");
  $("#rate-chart").replaceChildren(svg, legend);
}

function renderDeadLetters(doc) {
  const d = doc.dead_letters;
  syncOptions("#dl-reason", Object.keys(d.by_reason));
  syncOptions("#dl-topic", Object.keys(d.by_topic));
  if (dlSearched) return;
  const reason = $("#dl-reason").value, topic = $("#dl-topic").value;
  const [since, until] = dlRange();
  const rows = d.recent.filter((x) =>
    (!reason || x.reason === reason) && (!topic || x.topic === topic)
    && (since === null || x.at_ms >= since) && (until === null || x.at_ms < until));
  $("#dl-mode").textContent = "Showing the newest, live.";
  showDeadLetters(rows);
}

function syncOptions(sel, values) {
  const select = $(sel);
  const have = new Set([...select.options].map((o) => o.value));
  for (const v of values) {
    if (!have.has(v)) select.append(new Option(v, v));
  }
}

function dlRange() {
  const parse = (v) => (v ? Date.parse(v + "Z") : null);
  return [parse($("#dl-since").value), parse($("#dl-until").value)];
}

function showDeadLetters(rows) {
  fill("#dl-table", rows.map((x) => {
    const open = el("button", x.reason);
    open.type = "button";
    open.className = "link";
    open.setAttribute("aria-label", `Open dead letter ${x.id}: ${x.reason}`);
    open.addEventListener("click", () => showDetail(x));
    const td = document.createElement("td");
    td.append(open);
    return [x.at, td, x.topic, `${x.partition}:${x.offset}`, x.message];
  }), "no dead letter");
}

function showDetail(x) {
  $("#dl-detail-meta").textContent =
    `${x.at} — ${x.reason} — ${x.topic} partition ${x.partition} offset ${x.offset}`
    + ` — consumer ${x.consumer} — ${x.original_size} bytes${x.original_truncated ? " (truncated)" : ""}`;
  $("#dl-original").value = x.original;
  $("#dl-replay").value = x.replay;
  $("#dl-copied").textContent = "";
  $("#dl-detail").hidden = false;
  $("#dl-detail").focus();
}

async function copyReplay() {
  const input = $("#dl-replay");
  try {
    await navigator.clipboard.writeText(input.value);
  } catch (_) {
    // no clipboard API outside a secure context (plain HTTP): select it for the user
    input.select();
    document.execCommand && document.execCommand("copy");
  }
  $("#dl-copied").textContent = "Copied";
}

async function searchDeadLetters() {
  const params = new URLSearchParams({ limit: "1000" });  // every kept one (TAILED, 1,000)
  const [since, until] = dlRange();
  if ($("#dl-reason").value) params.set("reason", $("#dl-reason").value);
  if ($("#dl-topic").value) params.set("topic", $("#dl-topic").value);
  if (since !== null) params.set("since", String(since));
  if (until !== null) params.set("until", String(until));
  const resp = await fetch("/ui/api/deadletters?" + params, { headers: authHeaders(), cache: "no-store" });
  if (!resp.ok) { $("#dl-mode").textContent = `Search failed: HTTP ${resp.status}`; return; }
  const body = await resp.json();
  dlSearched = body.dead_letters;
  $("#dl-mode").textContent = `Search: ${dlSearched.length} of the ${body.kept} kept; not live.`;
  showDeadLetters(dlSearched);
}

function renderLlm(doc) {
  const l = doc.llm;
  fill("#latency-table", Object.entries(l.latency).map(([p, v]) =>
    [p, v.p50, v.p90, v.p99, v.count, v.window === "recent" ? "last minute" : "since start"]),
    "no LLM call yet");
  fill("#breaker-table", Object.entries(l.breakers).map(([p, b]) => [
    p, statusCell(b.state), b.failures,
    b.transitions.map((t) => `${t.at} ${t.previous} → ${t.current}`).join("; ") || "none",
  ]), "no provider");
  for (const kind of ["agent", "provider", "model"]) usageTable(kind, l.usage[kind] || {});
}

function usageTable(kind, data) {
  const names = Object.keys(data).sort();
  const fields = [...new Set(names.flatMap((n) => Object.keys(data[n])))].sort();
  const head = document.createElement("tr");
  head.append(el("th", kind));
  for (const f of fields) head.append(el("th", f.replaceAll("_", " ")));
  for (const th of head.children) th.scope = "col";
  $(`#usage-${kind} thead`).replaceChildren(head);
  fill(`#usage-${kind}`, names.map((n) => [n, ...fields.map((f) => data[n][f])]), "no usage yet");
}

function renderPipeline(doc) {
  const p = doc.pipeline;
  fill("#throughput-table", Object.entries(p.throughput), "measuring (two samples needed)");
  fill("#lag-table", p.lag.map((r) => [r.topic, r.partition, r.lag, r.worker]), "no partition assigned");
  fill("#health-table", Object.entries(p.health).map(([url, h]) => [
    url, statusCell(h.status),
    Object.entries(h.components).map(([n, c]) => `${n}: ${c.status}`).join(", "),
  ]), "no worker answered");
  fill("#checkpoint-table", p.checkpoints.map((c) => [c.worker_id, c.taken_at, c.age_s, c.tables]),
    "no checkpoint yet");
}

function renderPolicies(doc) {
  const ps = doc.policies;
  fill("#policy-table", ps.policies.map((p) => [
    p.policy_id, p.version, p.level, p.signed_by || "–", p.broken || "–",
    ps.patterns_shown ? (p.allowed_patterns || []).join(", ") || "–" : "(scope admin)",
    ps.patterns_shown ? (p.blocked_patterns || []).join(", ") || "–" : "(scope admin)",
  ]), "no policy");
}

document.addEventListener("DOMContentLoaded", start);
