// The Tandem dashboard: the control plane's API, read every two seconds
// and drawn with plain SVG. No framework, no build step.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const REFRESH_MS = 2000;
let selected = decodeURIComponent(location.hash.slice(1)) || null;

function el(tag, attrs, text) {
  const e = tag.startsWith("svg:")
    ? document.createElementNS(SVG, tag.slice(4))
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

async function get(path) {
  const r = await fetch(path, { credentials: "same-origin" });
  if (!r.ok) throw new Error(`${path}: ${r.status}`);
  return r.json();
}

// Green when healthy, amber when some calls fail or are slow, red when
// many fail.
function health(p) {
  if (p.success_rate < 0.95) return "bad";
  if (p.success_rate < 0.995 || p.p99_ms > 500) return "warn";
  return "ok";
}

function fmt(x, digits) {
  return Number(x).toFixed(digits);
}

function drawGraph(services, pairs) {
  const svg = document.getElementById("graph");
  svg.replaceChildren();
  const defs = el("svg:defs");
  for (const h of ["ok", "warn", "bad"]) {
    const m = el("svg:marker", { id: `arrow-${h}`, viewBox: "0 0 10 10", refX: "10", refY: "5",
      markerWidth: "7", markerHeight: "7", orient: "auto-start-reverse" });
    m.append(el("svg:path", { d: "M 0 0 L 10 5 L 0 10 z", fill: `var(--${h})` }));
    defs.append(m);
  }
  svg.append(defs);
  const W = 900, H = 560, R = 34;
  const names = [...services].sort();
  const pos = {};
  names.forEach((n, i) => {
    const a = (2 * Math.PI * i) / Math.max(names.length, 1) - Math.PI / 2;
    pos[n] = [W / 2 + (W / 2 - 110) * Math.cos(a), H / 2 + (H / 2 - 70) * Math.sin(a)];
  });
  for (const p of pairs) {
    const a = pos[p.source], b = pos[p.destination];
    if (!a || !b) continue;
    const dx = b[0] - a[0], dy = b[1] - a[1], d = Math.hypot(dx, dy) || 1;
    const x1 = a[0] + (dx / d) * R, y1 = a[1] + (dy / d) * R;
    const x2 = b[0] - (dx / d) * (R + 4), y2 = b[1] - (dy / d) * (R + 4);
    const h = health(p);
    const g = el("svg:g", { class: `edge ${h}`, "data-edge": `${p.source}->${p.destination}` });
    g.append(el("svg:line", { x1, y1, x2, y2, "marker-end": `url(#arrow-${h})` }));
    const label = `${fmt(p.rps, 1)} rps · ${fmt(p.success_rate * 100, 2)}% · p99 ${fmt(p.p99_ms, 1)} ms`;
    g.append(el("svg:text", { x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 6 }, label));
    svg.append(g);
  }
  for (const n of names) {
    const [x, y] = pos[n];
    const g = el("svg:g", { class: "node" + (n === selected ? " selected" : ""), "data-service": n });
    g.append(el("svg:circle", { cx: x, cy: y, r: R }));
    g.append(el("svg:text", { x, y: y + 4 }, n));
    g.addEventListener("click", () => {
      selected = n;
      location.hash = encodeURIComponent(n);
      refresh();
    });
    svg.append(g);
  }
}

function chart(title, points, key, unit, scale) {
  const f = el("figure", { class: "chart" });
  f.append(el("figcaption", {}, title));
  const svg = el("svg:svg", { viewBox: "0 0 300 110", preserveAspectRatio: "none" });
  const vals = points.map((p) => (p[key] === null || p[key] === undefined ? null : p[key] * scale));
  const present = vals.filter((v) => v !== null);
  const max = Math.max(...present, key === "success_rate" ? 100 : 0.001);
  const min = key === "success_rate" ? Math.min(...present, 90) : 0;
  const xy = [];
  vals.forEach((v, i) => {
    if (v === null) return;
    const x = (i / Math.max(vals.length - 1, 1)) * 296 + 2;
    const y = 100 - ((v - min) / (max - min || 1)) * 90;
    xy.push(`${fmt(x, 1)},${fmt(y, 1)}`);
  });
  svg.append(el("svg:polyline", { points: xy.join(" ") }));
  svg.append(el("svg:text", { class: "axis", x: 4, y: 12 }, `${fmt(max, key === "success_rate" ? 1 : 2)} ${unit}`));
  svg.append(el("svg:text", { class: "axis", x: 4, y: 106 }, `${fmt(min, 1)} ${unit}`));
  const last = present.length ? present[present.length - 1] : null;
  f.append(svg);
  f.append(el("div", { class: "muted", "data-last": key }, last === null ? "no calls" : `now ${fmt(last, 2)} ${unit}`));
  return f;
}

async function drawService() {
  const charts = document.getElementById("charts");
  if (!selected) return;
  document.getElementById("service-title").textContent = `Calls to ${selected}`;
  const points = await get(`/api/v1/stats/series?service=${encodeURIComponent(selected)}&window=5m&step=10s`);
  charts.replaceChildren(
    chart("requests / s", points, "rps", "rps", 1),
    chart("success", points, "success_rate", "%", 100),
    chart("p99", points, "p99_ms", "ms", 1),
  );
}

function drawProxies(proxies) {
  const t = document.getElementById("proxies");
  t.replaceChildren();
  const head = el("tr");
  for (const h of ["service", "instance", "connected", "config version", "acknowledged", "certificate expires", "identity"]) head.append(el("th", {}, h));
  t.append(head);
  const now = Date.now() / 1000;
  for (const p of proxies.sort((a, b) => (a.service + a.instance).localeCompare(b.service + b.instance))) {
    const tr = el("tr", { "data-proxy": `${p.service}/${p.instance}` });
    const left = p.cert_not_after ? p.cert_not_after - now : null;
    const expiry = left === null ? "–" : left < 0 ? "expired" : left > 3600 ? `in ${fmt(left / 3600, 1)} h` : `in ${fmt(left / 60, 0)} min`;
    for (const [v, cls] of [[p.service], [p.instance], [p.connected ? "yes" : "no"], [p.config_version, "num"],
      [p.config_acked ? "yes" : (p.nack_reason ? `refused: ${p.nack_reason}` : "not yet")], [expiry], [p.spiffe_id || "–"]]) {
      tr.append(el("td", cls ? { class: cls } : {}, String(v)));
    }
    t.append(tr);
  }
}

function drawRollouts(rollouts) {
  const box = document.getElementById("rollouts");
  if (!rollouts.length) {
    box.replaceChildren(el("p", { class: "muted" }, "none"));
    return;
  }
  box.replaceChildren();
  for (const r of rollouts) {
    const s = r.state || {};
    const div = el("div", { "data-rollout": `${r.namespace}/${r.name}` });
    const share = s.history && s.history.length ? s.history[s.history.length - 1].canary_percent : 0;
    div.append(el("h3", {}, `${r.namespace}/${r.name}: ${r.stable} → ${r.canary} — ${s.phase || "pending"}, canary at ${share}%`));
    if (r.waiting) div.append(el("p", { class: "muted" }, `waiting: ${r.waiting}`));
    const ul = el("ul", { class: "decisions" });
    for (const d of (s.history || []).slice(-8).reverse()) {
      ul.append(el("li", {}, `${new Date(d.at_ms).toLocaleTimeString()} ${d.action} → ${d.canary_percent}%: ${d.reason}`));
    }
    div.append(ul);
    box.append(div);
  }
}

async function refresh() {
  try {
    const [pairs, proxies, rollouts] = await Promise.all([
      get("/api/v1/stats?window=10s"), get("/api/v1/proxies"), get("/api/v1/rollouts"),
    ]);
    const services = new Set(proxies.map((p) => p.service));
    for (const p of pairs) { services.add(p.source); services.add(p.destination); }
    drawGraph(services, pairs);
    drawProxies(proxies);
    drawRollouts(rollouts);
    await drawService();
    document.getElementById("status").textContent = `live · ${proxies.length} proxies · updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    document.getElementById("status").textContent = `cannot reach the control plane: ${e.message}`;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
