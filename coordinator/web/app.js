// gpulease dashboard: plain JavaScript, no build step, nothing from another host.
// Loads everything once (one /api/v1/nodes call), then follows /api/v1/stream (server-sent events,
// read with fetch so a token can travel in the Authorization header). Events mark what changed;
// at most every 250 ms the page re-fetches only that (the named nodes, the allocation table, ...)
// and patches the grid cell by cell.
"use strict";

const STATES = ["free", "allocated", "draining", "unhealthy", "foreign", "simulated", "cordoned", "down"];
const FLUSH_MS = 250;
const MAX_EVENTS = 200;
const MANY_NODES = 50; // more dirty nodes than this in one flush: one /nodes call instead

const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("gpulease-token") || "";
let skewMs = 0; // server clock - local clock
const nodes = new Map(); // name -> {el, cellsEl, cells: [el], data}
let allocs = [];
let lastId = 0;
const dirty = { nodes: new Set(), allNodes: false, summary: false, allocs: false, queue: false, quotas: false };
let flushTimer = null;
let streamAbort = null;
// Telemetry changes send no event: while this coordinator has some, the grid is re-read now and then.
let utilizationShown = false;
const TELEMETRY_REFRESH_MS = 10000;

class AuthError extends Error {}

async function api(path) {
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const r = await fetch("api/v1/" + path, { headers, cache: "no-store" });
  if (r.status === 401) throw new AuthError("token refused");
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  const body = await r.json();
  if (body.now_unix_ms) skewMs = body.now_unix_ms - Date.now();
  return body;
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function dur(ms) {
  if (ms < 0) ms = 0;
  const s = Math.floor(ms / 1000);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
  return Math.floor(s / 86400) + "d" + Math.floor((s % 86400) / 3600) + "h";
}
const now = () => Date.now() + skewMs;
const age = (createdMs) => (createdMs ? dur(now() - createdMs) : "-");

function ttlText(a) {
  let t = "lease " + a.ttl_seconds + "s, renewed by keepalive";
  if (a.max_runtime_seconds) t += "; runtime left " + dur(a.created_unix_ms + a.max_runtime_seconds * 1000 - now());
  return t;
}

// --- login -----------------------------------------------------------------------------------

function showLogin(message) {
  if (streamAbort) streamAbort.abort();
  $("app").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token").focus();
}

$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  token = $("token").value.trim();
  sessionStorage.setItem("gpulease-token", token);
  start();
});
$("logout").addEventListener("click", () => {
  token = "";
  sessionStorage.removeItem("gpulease-token");
  showLogin("");
});

// --- rendering -------------------------------------------------------------------------------

function renderLegend() {
  const lg = $("legend");
  for (const s of STATES) {
    const sp = el("span", "", s);
    sp.style.setProperty("--c", "var(--" + s + ")");
    lg.appendChild(sp);
  }
}

function renderSummary(s) {
  const box = $("totals");
  box.replaceChildren();
  const add = (label, value) => {
    const d = el("div", "total");
    d.appendChild(el("b", "", String(value)));
    d.appendChild(document.createTextNode(label));
    box.appendChild(d);
  };
  add("nodes (" + s.nodes.up + " up, " + s.nodes.down + " down, " + s.nodes.cordoned + " cordoned)", s.nodes_total);
  add("GPUs", s.gpus_total);
  for (const st of STATES) if (s.gpus[st]) add(st, s.gpus[st]);
  add("allocations", s.allocations);
  add("pending", s.pending);
  add("CPUs allocated", s.cpus_allocated + " / " + s.cpus_total);
  add("revision", s.revision);
  utilizationShown = !!s.utilization_available;
  $("util-note").hidden = utilizationShown;
}

function nodeEntry(n) {
  let e = nodes.get(n.name);
  if (!e) {
    const box = el("div", "node");
    box.dataset.node = n.name;
    box.id = "node-" + n.name;
    const name = el("span", "name", n.name);
    const cellsEl = el("div", "cells");
    box.append(name, cellsEl);
    e = { el: box, nameEl: name, cellsEl, cells: [], data: n };
    nodes.set(n.name, e);
    insertSorted(e);
  }
  return e;
}

function insertSorted(e) {
  const grid = $("grid");
  const name = e.data.name;
  const last = grid.lastElementChild;
  if (!last || last.dataset.node < name) { grid.appendChild(e.el); return; } // the load's sorted list: O(1)
  let before = null;
  for (const child of grid.children) {
    if (child.dataset.node > name) { before = child; break; }
  }
  if (before) grid.insertBefore(e.el, before); else grid.appendChild(e.el);
}

function patchNode(n) {
  const e = nodeEntry(n);
  e.data = n;
  e.el.classList.toggle("down", n.state === "down");
  e.nameEl.title = n.name + " (" + n.state + (n.reconciling ? ", reconciling" : "") + ")";
  e.nameEl.textContent = n.name + (n.state !== "up" ? " · " + n.state : "");
  if (e.cells.length !== n.gpus.length) {
    e.cells = n.gpus.map((g) => {
      const c = el("div", "gpu");
      c.dataset.node = n.name;
      c.dataset.gpu = String(g.index);
      c.id = "gpu-" + n.name + "-" + g.index;
      return c;
    });
    e.cellsEl.replaceChildren(...e.cells);
  }
  n.gpus.forEach((g, i) => {
    const c = e.cells[i];
    const cls = "gpu " + g.state + (c.classList.contains("selected") ? " selected" : "");
    if (c.className !== cls) c.className = cls;
    c.dataset.gpu = String(g.index);
    c.dataset.state = g.state;
    c.dataset.allocation = g.allocation_id;
    const u = g.utilization_percent;
    if (u == null) {
      if (c.dataset.util !== undefined) { delete c.dataset.util; c.style.removeProperty("--util"); c.classList.remove("util"); }
    } else if (c.dataset.util !== String(u)) {
      c.dataset.util = String(u);
      c.style.setProperty("--util", u + "%");
      c.classList.add("util");
    }
  });
}

function renderNodes(list) {
  const seen = new Set();
  for (const n of list) { patchNode(n); seen.add(n.name); }
  for (const [name, e] of nodes) if (!seen.has(name)) { e.el.remove(); nodes.delete(name); }
  $("nodes-count").textContent = "(" + nodes.size + ")";
}

function gpuText(node, g) {
  const lines = [node.name + " GPU " + g.index + " — " + g.state, g.model + "  " + g.uuid];
  if (g.allocation_id) {
    lines.push("allocation " + g.allocation_id, "owner " + (g.owner || "-") + "   tenant " + (g.tenant || "-"),
      "principal " + (g.principal || "-"), "age " + age(g.created_unix_ms), "TTL " + ttlText(g));
  }
  if (!g.healthy) lines.push("unhealthy: " + (g.health_detail || "-"));
  if (g.foreign) lines.push("foreign use: " + (g.foreign_detail || "-"));
  if (g.utilization_percent == null) lines.push("utilization: not reported to this coordinator");
  else {
    const mem = g.memory_used_bytes == null ? "-" : (g.memory_used_bytes / 2 ** 30).toFixed(1) + " / " +
      (g.memory_total_bytes / 2 ** 30).toFixed(1) + " GiB";
    lines.push("utilization: " + g.utilization_percent + "%   memory used: " + mem,
      "temperature: " + (g.temperature_c == null ? "-" : g.temperature_c + " °C") +
      "   power: " + (g.power_draw_mw == null ? "-" : Math.round(g.power_draw_mw / 1000) + " W"));
  }
  return lines.join("\n");
}

function setupTip() {
  const grid = $("grid"), tip = $("tip");
  let pinned = null;
  const show = (cell, x, y) => {
    const e = nodes.get(cell.dataset.node);
    if (!e) return;
    const g = e.data.gpus.find((x) => String(x.index) === cell.dataset.gpu);
    if (!g) return;
    tip.textContent = gpuText(e.data, g);
    tip.hidden = false;
    tip.style.left = Math.min(x + 12, window.innerWidth - 380) + "px";
    tip.style.top = (y + 12) + "px";
  };
  grid.addEventListener("mouseover", (ev) => {
    if (!pinned && ev.target.classList.contains("gpu")) show(ev.target, ev.clientX, ev.clientY);
  });
  grid.addEventListener("mouseout", (ev) => { if (!pinned && ev.target.classList.contains("gpu")) tip.hidden = true; });
  grid.addEventListener("click", (ev) => {
    if (pinned) pinned.classList.remove("selected");
    if (ev.target.classList.contains("gpu") && ev.target !== pinned) {
      pinned = ev.target;
      pinned.classList.add("selected");
      show(pinned, ev.clientX, ev.clientY);
    } else {
      pinned = null;
      tip.hidden = true;
    }
  });
}

function row(tbody, cells, attrs) {
  const tr = el("tr");
  for (const c of cells) {
    const td = el("td", c && c.cls, c && typeof c === "object" ? c.text : String(c));
    if (c && c.title) td.title = c.title;
    tr.appendChild(td);
  }
  Object.assign(tr.dataset, attrs || {});
  tbody.appendChild(tr);
}

function renderAllocs() {
  const tbody = $("allocs").tBodies[0];
  tbody.replaceChildren();
  for (const a of allocs) {
    const gpus = a.gpus.map((g) => g.node + ":" + g.index).join(" ");
    row(tbody, [a.id, a.owner || "-", a.tenant || "-", gpus, age(a.created_unix_ms), { text: a.ttl_seconds + "s", title: ttlText(a) },
      a.priority_class || "-"], { allocation: a.id });
  }
  $("allocs-count").textContent = "(" + allocs.length + ")";
}

function renderQueue(q) {
  const tbody = $("queue").tBodies[0];
  tbody.replaceChildren();
  for (const p of q.pending) {
    row(tbody, [p.position, p.id, p.tenant || "-", p.gpus + " " + (p.gpu_model || ""), age(Number(p.queued_unix_ms)),
      { text: p.reason, cls: "detail", title: p.reason }]);
  }
  $("queue-count").textContent = "(" + q.pending.length + ")";
}

function renderQuotas(q) {
  const tbody = $("quotas").tBodies[0];
  tbody.replaceChildren();
  for (const t of q.tenants) {
    const quota = t.quota ? (t.quota.gpus !== undefined ? t.quota.gpus : JSON.stringify(t.quota)) : "none";
    row(tbody, [t.tenant + (t.from_default ? " (default)" : ""), t.used_gpus, quota, t.pending]);
  }
}

function addEvents(list) {
  const tbody = $("events").tBodies[0];
  for (const ev of list) {
    const tr = el("tr");
    tr.dataset.type = ev.type;
    for (const c of [new Date(ev.time_unix_ms).toLocaleTimeString(), ev.revision, ev.type, ev.node || "-",
      ev.allocation_id || "-"]) tr.appendChild(el("td", "", String(c)));
    const d = el("td", "detail", ev.detail);
    d.title = ev.detail;
    tr.appendChild(d);
    tbody.insertBefore(tr, tbody.firstChild);
  }
  while (tbody.rows.length > MAX_EVENTS) tbody.deleteRow(tbody.rows.length - 1);
}

// --- loading and live updates ------------------------------------------------------------------

function allocQuery() {
  const p = new URLSearchParams();
  if ($("f-owner").value.trim()) p.set("owner", $("f-owner").value.trim());
  if ($("f-tenant").value.trim()) p.set("tenant", $("f-tenant").value.trim());
  const s = p.toString();
  return "allocations" + (s ? "?" + s : "");
}

async function loadAllocs() { allocs = (await api(allocQuery())).allocations; renderAllocs(); }
async function loadNodes() { renderNodes((await api("nodes")).nodes); }
async function loadSummary() { renderSummary(await api("summary")); }
async function loadQueue() { renderQueue(await api("queue")); }
async function loadQuotas() { renderQuotas(await api("quotas")); }

function markAll() {
  dirty.allNodes = dirty.summary = dirty.allocs = dirty.queue = dirty.quotas = true;
}

function mark(ev) {
  const touched = new Set();
  if (ev.node) touched.add(ev.node);
  for (const g of ev.gpus || []) {
    const i = g.lastIndexOf(":");
    if (i > 0) touched.add(g.slice(0, i));
  }
  for (const n of touched) dirty.nodes.add(n);
  dirty.summary = true;
  switch (ev.type) {
    case "allocated": case "released": case "expired": case "preempted":
      dirty.allocs = dirty.queue = dirty.quotas = true; break;
    case "queued":
      dirty.queue = dirty.quotas = true; break;
    case "history_gap": case "resync": case "overflow":
      markAll(); break;
  }
  if (!flushTimer) flushTimer = setTimeout(flush, FLUSH_MS);
}

async function flush() {
  const d = { ...dirty, nodes: dirty.nodes };
  dirty.nodes = new Set();
  dirty.allNodes = dirty.summary = dirty.allocs = dirty.queue = dirty.quotas = false;
  const work = [];
  if (d.allNodes || d.nodes.size > MANY_NODES) work.push(loadNodes());
  else for (const n of d.nodes) {
    work.push(api("nodes/" + encodeURIComponent(n)).then((r) => patchNode(r.node)).catch((e) => {
      if (e instanceof AuthError) throw e;
      const gone = nodes.get(n); // deleted node: drop its box
      if (gone) { gone.el.remove(); nodes.delete(n); }
    }));
  }
  if (d.summary) work.push(loadSummary());
  if (d.allocs) work.push(loadAllocs());
  if (d.queue) work.push(loadQueue());
  if (d.quotas) work.push(loadQuotas());
  try { await Promise.all(work); } catch (e) { handle(e); }
  // Anything marked meanwhile waits for the next slot.
  flushTimer = null;
  if (dirty.nodes.size || dirty.allNodes || dirty.summary || dirty.allocs || dirty.queue || dirty.quotas) {
    flushTimer = setTimeout(flush, FLUSH_MS);
  }
}

function setLive(on, text) {
  const l = $("live");
  l.className = "live " + (on ? "on" : "off");
  l.textContent = text;
}

async function stream() {
  streamAbort = new AbortController();
  const signal = streamAbort.signal;
  while (!signal.aborted) {
    try {
      const headers = { Accept: "text/event-stream" };
      if (token) headers.Authorization = "Bearer " + token;
      if (lastId) headers["Last-Event-ID"] = String(lastId);
      const r = await fetch("api/v1/stream", { headers, signal, cache: "no-store" });
      if (r.status === 401) throw new AuthError("token refused");
      if (!r.ok || !r.body) throw new Error("stream: HTTP " + r.status);
      setLive(true, "live");
      const reader = r.body.getReader();
      const dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          let data = "", id = "";
          for (const line of block.split("\n")) {
            if (line.startsWith("data:")) data += line.slice(5).trim();
            else if (line.startsWith("id:")) id = line.slice(3).trim();
          }
          if (!data) continue;
          const ev = JSON.parse(data);
          if (id) lastId = Math.max(lastId, Number(id));
          addEvents([ev]);
          mark(ev);
        }
      }
    } catch (e) {
      if (signal.aborted) return;
      if (e instanceof AuthError) { handle(e); return; }
    }
    setLive(false, "reconnecting");
    await new Promise((res) => setTimeout(res, 1000));
  }
}

function handle(e) {
  if (e instanceof AuthError) showLogin(token ? "That token was refused (unknown, revoked or expired)." : "");
  else { setLive(false, "error"); console.warn(e.message || e); }
}

async function start() {
  try {
    const me = await api("whoami");
    $("login").hidden = true;
    $("app").hidden = false;
    $("who").textContent = me.principal + (me.role ? " (" + me.role + ")" : "");
    $("logout").hidden = !me.auth_required;
    const [, , , , , evs] = await Promise.all([loadSummary(), loadNodes(), loadAllocs(), loadQueue(), loadQuotas(),
      api("events?limit=" + MAX_EVENTS)]);
    addEvents(evs.events);
    lastId = evs.revision;
    stream();
  } catch (e) {
    handle(e);
  }
}

let filterTimer = null;
for (const id of ["f-owner", "f-tenant"]) {
  $(id).addEventListener("input", () => {
    clearTimeout(filterTimer);
    filterTimer = setTimeout(() => loadAllocs().catch(handle), 200);
  });
}
setInterval(() => { if (!$("app").hidden) renderAllocs(); }, 5000); // ages move on
setInterval(() => {
  if ($("app").hidden || !utilizationShown) return;
  dirty.allNodes = dirty.summary = true;
  if (!flushTimer) flushTimer = setTimeout(flush, FLUSH_MS);
}, TELEMETRY_REFRESH_MS);

renderLegend();
setupTip();
start();
