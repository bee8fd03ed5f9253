// keyhive dashboard: renders snapshots pushed over a WebSocket; no build step, no dependencies.
"use strict";
(function () {
  const SERIES = ["started", "thawed", "hibernated", "failed"];
  const COLORS = { started: "#3b82f6", thawed: "#10b981", hibernated: "#8b5cf6", failed: "#ef4444" };
  let snap = null, receivedAt = 0, retry = 500;

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }
  function ago(s) { return s < 1 ? "just now" : secs(s) + " ago"; }
  function secs(s) {
    if (s === null || s === undefined) return "—";
    if (s < 1) return "0 s";
    if (s < 60) return Math.floor(s) + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }
  function elapsed() { return (performance.now() - receivedAt) / 1000; }
  function svg(tag, attrs) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    return node;
  }

  function chart(history, bucketSeconds) {
    const n = history.started.length, W = 600, H = 120, pad = 2;
    let max = 1;
    for (let i = 0; i < n; i++) max = Math.max(max, SERIES.reduce((a, s) => a + history[s][i], 0));
    const root = svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none",
                              role: "img", "aria-label": "lifecycle events over time" });
    const bw = (W - 2) / n;
    for (let i = 0; i < n; i++) {
      let y = H - pad;
      for (const s of SERIES) {
        const v = history[s][i];
        if (!v) continue;
        const h = (v / max) * (H - pad - 8);
        y -= h;
        const r = svg("rect", { x: 1 + i * bw + 0.5, y: y, width: Math.max(1, bw - 1), height: h, fill: COLORS[s] });
        r.append(svg("title", {}));
        r.firstChild.textContent = `${v} ${s}`;
        root.append(r);
      }
    }
    root.append(svg("line", { x1: 0, y1: H - pad, x2: W, y2: H - pad, stroke: "#d1d5db" }));
    const axis = el("div", { class: "axis" },
      el("span", {}, `-${Math.round(n * bucketSeconds / 60)} min`),
      el("span", {}, `bars: events per ${bucketSeconds} s (max ${max})`), el("span", {}, "now"));
    return el("div", {}, root, axis);
  }

  async function stopAgent(id, key, button) {
    if (!confirm(`Stop agent ${key}?\n\nIt hibernates (its state is saved) and stops; ` +
                 "the next get thaws it.")) return;
    button.disabled = true;
    try {
      const r = await fetch(new URL("api/stop", location.href), {
        method: "POST", headers: { "Content-Type": "application/json", "X-Keyhive-Dashboard": "1" },
        body: JSON.stringify({ id }) });
      if (!r.ok) { const b = await r.json().catch(() => ({})); alert(b.detail || r.statusText); }
    } finally { button.disabled = false; }
  }

  function managerCard(m, allowStop, bucketSeconds) {
    const c = m.counters || {};
    const card = el("section", { class: "card manager", "data-manager": m.name });
    card.append(el("div", { class: "mhead" },
      el("h2", {}, m.name),
      el("span", { class: "meta" }, `${m.agent} · ${m.running ? "running" : "not running"} · idle timeout ${
        m.idle_timeout === null ? "none" : m.idle_timeout + " s"} · storage ${m.storage || "off"}`)));
    const stats = el("div", { class: "mhead" });
    const add = (v, label, cls) => stats.append(el("div", { class: "stat" }, el("span", { class: cls || "big" }, v), el("span", {}, label)));
    add(m.count, "live agents"); add(m.attached, "agents with someone attached");
    add(c.started || 0, "started", "big k-started"); add(c.thawed || 0, "thawed", "big k-thawed");
    add(c.hibernated || 0, "hibernated", "big k-hibernated");
    add((c.thaw_failures || 0) + (c.hibernate_failures || 0), "failures", "big k-thaw_failed");
    card.querySelector(".mhead").after(stats);

    const left = el("div", {});
    left.append(el("h3", {}, "Lifecycle events over time"), chart(m.history, bucketSeconds));
    const legend = el("div", { class: "legend" });
    for (const s of SERIES) legend.append(el("span", {}, el("i", { style: "" }), s));
    legend.querySelectorAll("i").forEach((i, n) => { i.style.background = COLORS[SERIES[n]]; });
    left.append(legend);

    const right = el("div", {});
    right.append(el("h3", {}, `Live agents (${m.count})`));
    const t = el("table", { class: "agents" });
    t.append(el("thead", {}, el("tr", {}, ...["key", "partition", "attachments (owners)", "idle timeout in", "last activity", ""].map(h => el("th", {}, h)))));
    const tb = el("tbody", {});
    if (!m.agents.length) tb.append(el("tr", {}, el("td", { class: "empty", colSpan: 6 }, "no live agents")));
    for (const a of m.agents) {
      const idle = el("td", { class: "idle" });
      if (a.idle_in === null) idle.append(a.attachments ? el("span", { class: "pill att" }, "attached") : "never");
      else idle.setAttribute("data-deadline", a.idle_in);
      const last = el("td", { class: "last" });
      if (a.last_activity_ago !== null) last.setAttribute("data-ago", a.last_activity_ago);
      const action = el("td", {});
      if (allowStop) {
        const b = el("button", { class: "stop", title: "hibernate and stop this agent" }, "stop");
        b.addEventListener("click", () => stopAgent(a.id, a.key, b));
        action.append(b);
      }
      tb.append(el("tr", { class: "agent", "data-key": a.key },
        el("td", { class: "key", title: a.key }, a.key), el("td", {}, a.partition || "—"),
        el("td", { class: "attachments" }, a.attachments), idle, last, action));
    }
    t.append(tb);
    right.append(el("div", { class: "scroll" }, t));
    if (m.truncated) right.append(el("div", { class: "meta" }, `… and ${m.truncated} more`));

    right.append(el("h3", {}, "Recently stopped"));
    const st = el("table", { class: "stopped" });
    st.append(el("thead", {}, el("tr", {}, ...["key", "partition", "reason", "state", "when"].map(h => el("th", {}, h)))));
    const sb = el("tbody", {});
    if (!m.stopped.length) sb.append(el("tr", {}, el("td", { class: "empty", colSpan: 5 }, "none yet")));
    for (const s of m.stopped) {
      sb.append(el("tr", { class: "stopped-agent", "data-key": s.key },
        el("td", { class: "key", title: s.key }, s.key), el("td", {}, s.partition || "—"),
        el("td", {}, s.reason), el("td", { class: s.saved ? "k-hibernated" : "k-thaw_failed" }, s.saved ? "hibernated" : "not saved"),
        el("td", { "data-ago": s.ago })));
    }
    st.append(sb);
    right.append(el("div", { class: "scroll" }, st));
    card.append(el("div", { class: "row" }, left, right));
    return card;
  }

  function render() {
    if (!snap) return;
    document.getElementById("mode").textContent = snap.allow_stop ? "stop enabled" : "read-only";
    const box = document.getElementById("managers");
    box.replaceChildren(...snap.managers.map(m => managerCard(m, snap.allow_stop, snap.bucket_seconds)));
    const ev = document.getElementById("events");
    ev.replaceChildren(...(snap.events.length ? snap.events.map(e =>
      el("tr", { class: "event", "data-kind": e.kind, "data-key": e.key },
        el("td", { "data-ago": e.ago }), el("td", {}, e.manager), el("td", { class: "k-" + e.kind }, e.kind),
        el("td", { class: "key", title: e.key }, e.key), el("td", {}, e.partition || "—"),
        el("td", {}, [e.reason, e.error].filter(Boolean).join(" · ")))) :
      [el("tr", {}, el("td", { class: "empty", colSpan: 6 }, "no events yet"))]));
    tick();
  }

  function tick() {
    const dt = elapsed();
    document.querySelectorAll("[data-deadline]").forEach(n => {
      n.textContent = secs(Math.max(0, parseFloat(n.getAttribute("data-deadline")) - dt)); });
    document.querySelectorAll("[data-ago]").forEach(n => {
      n.textContent = ago(parseFloat(n.getAttribute("data-ago")) + dt); });
  }

  function connect() {
    const url = new URL("ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(url);
    const conn = document.getElementById("conn");
    ws.onopen = () => { retry = 500; conn.textContent = "live"; conn.className = "conn on"; };
    ws.onmessage = (msg) => { snap = JSON.parse(msg.data); receivedAt = performance.now(); render(); };
    ws.onclose = () => {
      conn.textContent = "reconnecting…"; conn.className = "conn off";
      setTimeout(connect, retry); retry = Math.min(retry * 2, 5000);
    };
  }
  setInterval(tick, 250);
  connect();
})();
