// The fedray web view: reads the federation's HTTP API (/api/v1) and nothing else.
// Live: events and rounds arrive as server-sent events; clients, combiners and sessions
// are asked again every few seconds. Its one write is stopping a session (needs the token).
"use strict";

const API = "api/v1";
const REFRESH_MS = 3000;
const MAX_EVENTS = 500;
const state = { selected: null, pinned: false, rounds: new Map(), sessions: [], breakdown: null,
                levels: new Set(["info", "warning", "error"]), events: [] };

function token() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) sessionStorage.setItem("fedray-token", decodeURIComponent(m[1]));
  return sessionStorage.getItem("fedray-token") || "";
}

function headers() {
  const t = token();
  return t ? { Authorization: `Bearer ${t}` } : {};
}

async function get(path, params = {}) {
  const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v != null));
  const url = `${API}${path}${query.toString() ? "?" + query : ""}`;
  const response = await fetch(url, { headers: headers() });
  if (!response.ok) throw new Error((await response.json().catch(() => ({}))).error || response.statusText);
  return response.json();
}

// Server-sent events over fetch (EventSource cannot send the token header).
async function stream(path, params, onDoc) {
  for (;;) {
    try {
      const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v != null));
      const response = await fetch(`${API}${path}?${query}`, { headers: headers() });
      if (!response.ok) throw new Error(response.statusText);
      setLive(true);
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of block.split("\n")) {
            if (line.startsWith("data: ")) onDoc(JSON.parse(line.slice(6)));
          }
        }
      }
    } catch (err) {
      setLive(false);
    }
    await sleep(2000);  // the service restarted or the network went: ask again
    params = { ...params, since: new Date(Date.now() - 10000).toISOString() };
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const el = (id) => document.getElementById(id);

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children.flat()) {
    node.append(child instanceof Node ? child : document.createTextNode(child ?? ""));
  }
  return node;
}

const badge = (text) => h("span", { class: `badge ${text}` }, text);
const num = (v, d = 4) => (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(d)) : v ?? "");
function bytes(n) {
  if (typeof n !== "number") return "";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
function ago(iso) {
  if (!iso) return "";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  return s < 60 ? `${s.toFixed(0)} s ago` : s < 3600 ? `${(s / 60).toFixed(0)} min ago` : new Date(iso).toLocaleString();
}
function setLive(on) {
  el("live").className = on ? "live" : "live off";
  el("live").textContent = on ? "● live" : "● reconnecting";
}

// ------------------------------------------------------------------ federation

async function loadFederation() {
  const f = await get("/federation");
  el("federation").textContent = f.federation || "";
  document.title = `fedray · ${f.federation}`;
  const parts = [f.gateway && `gateway ${f.gateway}`, f.tracking && `tracking ${f.tracking}`,
                 f.ray_address && `Ray ${f.ray_address}`];
  el("where").textContent = parts.filter(Boolean).join(" · ");
}

async function loadClients() {
  const [combiners, clients] = await Promise.all([get("/combiners"), get("/clients")]);
  el("combiners").replaceChildren(...combiners.map((c) => h("div", { class: "card" },
    h("b", {}, c.name), badge(c.status), " ", `${c.clients ?? 0} client(s)`,
    h("br"), h("small", {}, c.address))));
  const online = clients.filter((c) => c.status !== "offline").length;
  el("client-count").textContent = `· ${online} of ${clients.length} clients connected`;
  el("clients").tBodies[0].replaceChildren(...clients.map((c) => h("tr", { "data-client": c.client_id },
    h("td", {}, c.name || c.client_id), h("td", { class: "opt" }, c.combiner),
    h("td", {}, badge(c.status)),
    h("td", { class: "opt" }, Object.entries(c.attrs || {}).map(([k, v]) => `${k}=${v}`).join(" ")),
    h("td", {}, ago(c.last_seen)))));
}

// ------------------------------------------------------------------ sessions

async function loadSessions() {
  const sessions = await get("/sessions", { limit: 50 });
  state.sessions = sessions;
  const live = sessions.find((s) => ["running", "waiting", "created"].includes(s.status));
  const shown = sessions.find((s) => s.session_id === state.selected);
  const ended = !shown || ["finished", "failed", "stopped"].includes(shown.status || shown.state);
  if (sessions.length && (!state.selected || (!state.pinned && ended && live && live !== shown))) {
    select((live || sessions.find((s) => s.status) || sessions[0]).session_id);
  }
  el("sessions").replaceChildren(...sessions.map((s) => {
    const status = s.status || s.state;
    return h("li", { class: s.session_id === state.selected ? "selected" : "",
                     "data-session": s.session_id,
                     onclick: () => { state.pinned = true; select(s.session_id).then(loadSessions); } },
      h("span", {}, h("code", {}, s.session_id.slice(0, 10)), " ", s.strategy || ""),
      h("span", {}, `${s.rounds_done ?? 0}/${s.rounds_planned ?? "?"} `, badge(status)));
  }));
  renderSessionHead();
}

function current() {
  return state.sessions.find((s) => s.session_id === state.selected);
}

function renderSessionHead() {
  const s = current();
  if (!s) return;
  const status = s.status || s.state;
  el("session-title").textContent = `Session ${s.session_id}`;
  el("session-state").replaceChildren(badge(status));
  el("session-state").className = "";
  el("stop").hidden = !["running", "waiting", "created", "queued"].includes(status);
  const facts = [s.strategy && `strategy ${s.strategy}`, s.mode && `mode ${s.mode}`,
                 `${s.rounds_done ?? 0} of ${s.rounds_planned ?? "?"} rounds`,
                 s.submitted_by && `by ${s.submitted_by}`,
                 s.continued_from && `continues ${s.continued_from.slice(0, 10)}`,
                 s.reason && `reason: ${s.reason}`, s.stopped_by && `stopped by ${s.stopped_by}`];
  el("session-facts").textContent = facts.filter(Boolean).join(" · ");
}

let roundStream = 0;
async function select(sessionId) {
  if (state.selected === sessionId && state.rounds.size) return;
  state.selected = sessionId;
  state.rounds = new Map();
  state.breakdown = null;
  renderSessionHead();
  const s = current();
  if (s && s.status) {
    for (const r of await get(`/sessions/${sessionId}/rounds`).catch(() => [])) state.rounds.set(r.round, r);
  }
  renderRounds();
  const mine = ++roundStream;
  stream("/rounds/stream", { session: sessionId.length >= 6 ? sessionId : null,
                             since: new Date(Date.now() - 2000).toISOString() }, (r) => {
    if (mine !== roundStream || r.session_id !== state.selected) return;
    state.rounds.set(r.round, r);
    renderRounds();
  }).catch(() => {});
  document.querySelectorAll("#sessions li").forEach((li) =>
    li.classList.toggle("selected", li.dataset.session === sessionId));
}

function metricsOf(r) {
  return { ...Object.fromEntries(Object.entries(r.train_metrics || {}).map(([k, v]) => [`train ${k}`, v])),
           ...Object.fromEntries(Object.entries(r.validation_metrics || {}).map(([k, v]) => [`val ${k}`, v])) };
}

function renderRounds() {
  const rounds = [...state.rounds.values()].sort((a, b) => a.round - b.round);
  el("rounds").tBodies[0].replaceChildren(...rounds.slice().reverse().map((r) => h("tr",
    { onclick: () => { state.breakdown = r.round; renderBreakdown(rounds); }, "data-round": r.round },
    h("td", {}, String(r.round)), h("td", {}, badge(r.status)), h("td", {}, num(r.updates)),
    h("td", { class: "opt" }, num(r.rejected)), h("td", {}, num(r.seconds, 2)),
    h("td", { class: "opt" }, bytes(Object.values(r.combiners || {}).reduce((a, c) => a + (c.bytes_in || 0), 0))),
    h("td", {}, Object.entries(metricsOf(r)).map(([k, v]) => `${k} ${num(v)}`).join(" · ")))));
  renderChart(rounds);
  renderBreakdown(rounds);
}

function renderBreakdown(rounds) {
  const done = rounds.filter((r) => r.combiners && Object.keys(r.combiners).length);
  const r = done.find((x) => x.round === state.breakdown) || done[done.length - 1];
  el("breakdown-title").textContent = r ? `Per combiner, round ${r.round}` : "Per combiner";
  el("breakdown").tBodies[0].replaceChildren(...(r ? Object.entries(r.combiners) : []).map(([name, c]) => h("tr", {},
    h("td", {}, name), h("td", {}, num(c.asked)), h("td", {}, num(c.updates)),
    h("td", {}, Object.entries(c.rejections || {}).map(([k, v]) => `${k} ${v}`).join(", ") || "0"),
    h("td", { class: "opt" }, bytes(c.bytes_in)), h("td", { class: "opt" }, bytes(c.bytes_out)),
    h("td", {}, num(c.seconds, 2)))));
}

function median(values) {
  if (!values.length) return null;
  const v = values.slice().sort((a, b) => a - b);
  return v[Math.floor(v.length / 2)];
}

function renderChart(rounds) {
  const finished = rounds.filter((r) => r.status === "finished");
  el("chart").hidden = !finished.length;
  if (!window.Plotly || !finished.length) return;
  const names = new Set(finished.flatMap((r) => Object.keys(metricsOf(r))));
  const traces = [...names].sort().map((name) => ({
    x: finished.filter((r) => name in metricsOf(r)).map((r) => r.round),
    y: finished.filter((r) => name in metricsOf(r)).map((r) => metricsOf(r)[name]),
    name, mode: "lines+markers", line: { dash: name.startsWith("train") ? "dot" : "solid" } }));
  const eps = finished.filter((r) => r.report && typeof r.report.epsilon === "number");
  if (eps.length) traces.push({ x: eps.map((r) => r.round), y: eps.map((r) => r.report.epsilon),
                                name: "ε (DP)", yaxis: "y2", mode: "lines" });
  const stale = finished.filter((r) => (r.contributions || []).length);
  if (stale.length) traces.push({ x: stale.map((r) => r.round),
                                  y: stale.map((r) => median(r.contributions.map((c) => c.staleness))),
                                  name: "median staleness", yaxis: "y2", mode: "lines" });
  const layout = { margin: { l: 44, r: 44, t: 10, b: 36 }, legend: { orientation: "h", y: -0.2 },
                   xaxis: { title: { text: "round" }, dtick: finished.length < 15 ? 1 : undefined },
                   yaxis: { zeroline: false }, paper_bgcolor: "rgba(0,0,0,0)",
                   yaxis2: { overlaying: "y", side: "right", showgrid: false } };
  Plotly.react(el("chart"), traces, layout, { displayModeBar: false, responsive: true });
}

async function stopSelected() {
  let t = token();
  if (!t) {
    t = prompt("The API token (in <data_dir>/api-token) to stop this session:") || "";
    if (!t) return;
    sessionStorage.setItem("fedray-token", t.trim());
  }
  const response = await fetch(`${API}/sessions/${state.selected}/stop`, {
    method: "POST", headers: { ...headers(), "Content-Type": "application/json" },
    body: JSON.stringify({ reason: "stopped from the web view", by: "web view" }) });
  if (!response.ok) alert((await response.json().catch(() => ({}))).error || response.statusText);
  loadSessions();
}

// ------------------------------------------------------------------ events

function eventLine(e) {
  const when = e.ts ? new Date(e.ts).toLocaleTimeString() : "";
  return h("li", { class: e.level, "data-level": e.level }, h("span", { class: "t" }, when),
           h("span", { class: "lv" }, e.level), h("span", { class: "m" }, e.message));
}

function renderEvents() {
  const shown = state.events.filter((e) => state.levels.has(e.level));
  el("events").replaceChildren(...shown.slice().reverse().map(eventLine));
}

async function loadEvents() {
  state.events = await get("/events", { limit: 200 });
  renderEvents();
  const last = state.events.length ? state.events[state.events.length - 1].ts : null;
  stream("/events/stream", { since: last }, (e) => {
    state.events.push(e);
    if (state.events.length > MAX_EVENTS) state.events.splice(0, state.events.length - MAX_EVENTS);
    if (state.levels.has(e.level)) el("events").prepend(eventLine(e));
  });
}

// ------------------------------------------------------------------ start

async function refresh() {
  for (;;) {
    await Promise.all([loadClients(), loadSessions()]).then(() => setLive(true), () => setLive(false));
    await sleep(REFRESH_MS);
  }
}

document.addEventListener("DOMContentLoaded", async () => {
  el("stop").addEventListener("click", stopSelected);
  el("levels").addEventListener("change", (ev) => {
    ev.target.checked ? state.levels.add(ev.target.value) : state.levels.delete(ev.target.value);
    renderEvents();
  });
  await loadFederation().catch((err) => { el("federation").textContent = `(${err.message})`; });
  refresh();
  loadEvents();
});
