// Bridge ops dashboard: renders the server-sent snapshots of /api/events and sends admin actions.
// Plain ES2020, no build step, no external resources; every value reaches the DOM as text.
"use strict";

(() => {
  const view = { q: "", state: "", sort: "connected_at", order: "desc", offset: 0, limit: 50 };
  const rows = new Map(); // connection id -> <tr>
  let stream = null;
  let lastPage = null;
  const kickArmed = new Map(); // connection id -> timer

  const $ = (id) => document.getElementById(id);

  function csrfToken() {
    for (const part of document.cookie.split(";")) {
      const [name, ...rest] = part.trim().split("=");
      if (name === "bridge_csrf") return decodeURIComponent(rest.join("="));
    }
    return "";
  }

  // ---- formatting ------------------------------------------------------------------------

  function fmtInt(n) {
    return typeof n === "number" ? n.toLocaleString("en-US") : "–";
  }
  function fmtMs(ms) {
    if (typeof ms !== "number") return "–";
    return ms < 10 ? `${ms.toFixed(1)} ms` : `${Math.round(ms).toLocaleString("en-US")} ms`;
  }
  function fmtAge(seconds) {
    if (typeof seconds !== "number" || !isFinite(seconds)) return "–";
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  }
  function fmtTime(ts) {
    return typeof ts === "number" ? new Date(ts * 1000).toLocaleString() : "";
  }
  function fmtBytes(n) {
    if (typeof n !== "number") return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
  }
  function stateClass(state) {
    const s = String(state || "").toLowerCase();
    if (["open", "connected", "ok", "running", "ready"].includes(s)) return "badge badge-ok";
    if (["closing", "reconnecting", "connecting", "starting", "degraded"].includes(s)) return "badge badge-warn";
    if (["closed", "failed", "disconnected", "error", "down"].includes(s)) return "badge badge-bad";
    return "badge";
  }
  function rttClass(ms) {
    if (typeof ms !== "number") return "";
    if (ms >= 500) return "rtt-bad";
    if (ms >= 150) return "rtt-warn";
    return "rtt-ok";
  }
  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function setText(node, text) {
    const value = String(text);
    if (node.textContent !== value) node.textContent = value;
  }

  function toast(message, bad) {
    const box = $("toast");
    box.textContent = message;
    box.className = bad ? "toast toast-bad" : "toast";
    box.hidden = false;
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { box.hidden = true; }, 4000);
  }

  // ---- connections table -----------------------------------------------------------------

  const COLS = ["id", "session", "remote", "connected", "pong", "rtt", "topics", "sent", "received", "state", "action"];

  function makeRow(id) {
    const tr = document.createElement("tr");
    tr.dataset.connId = id;
    const cells = {};
    for (const col of COLS) {
      const td = el("td");
      if (["id", "session"].includes(col)) td.className = "mono";
      if (["rtt", "sent", "received"].includes(col)) td.className = "num";
      if (col === "topics") td.className = "topics";
      cells[col] = td;
      tr.appendChild(td);
    }
    const button = el("button", "btn btn-kick", "Kick");
    button.type = "button";
    button.dataset.action = "kick";
    button.setAttribute("aria-label", `Kick connection ${id}`);
    cells.action.appendChild(button);
    tr._cells = cells;
    return tr;
  }

  function updateRow(tr, row, now) {
    const c = tr._cells;
    setText(c.id, row.id);
    setText(c.session, row.session || "–");
    setText(c.remote, row.remote || "–");
    setText(c.connected, typeof row.connected_at === "number" ? fmtAge(now - row.connected_at) : "–");
    c.connected.title = fmtTime(row.connected_at);
    setText(c.pong, typeof row.last_pong_at === "number" ? `${fmtAge(now - row.last_pong_at)} ago` : "never");
    c.pong.title = fmtTime(row.last_pong_at);
    setText(c.rtt, fmtMs(row.rtt_ms));
    c.rtt.className = `num ${rttClass(row.rtt_ms)}`;
    const topics = (row.topics || []).join(" ");
    if (c.topics.dataset.value !== topics) {
      c.topics.dataset.value = topics;
      c.topics.replaceChildren(...(row.topics || []).map((t) => el("span", "chip", t)));
      c.topics.title = topics;
    }
    setText(c.sent, fmtInt(row.sent));
    setText(c.received, fmtInt(row.received));
    const state = kickArmed.get(row.id) === "sent" ? "closing" : row.state;
    if (c.state.textContent !== state) {
      c.state.replaceChildren(el("span", stateClass(state), state));
    }
  }

  function renderPage(page, now) {
    lastPage = page;
    const body = $("connections-body");
    const seen = new Set();
    let cursor = body.firstElementChild;
    for (const row of page.connections) {
      seen.add(row.id);
      let tr = rows.get(row.id);
      if (!tr) { tr = makeRow(row.id); rows.set(row.id, tr); }
      updateRow(tr, row, now);
      if (tr !== cursor) body.insertBefore(tr, cursor); else cursor = cursor.nextElementSibling;
    }
    for (const [id, tr] of rows) {
      if (!seen.has(id)) { tr.remove(); rows.delete(id); }
    }
    $("connections-empty").hidden = page.connections.length > 0;
    const first = page.total ? page.offset + 1 : 0;
    const last = page.offset + page.connections.length;
    setText($("page-info"), `${fmtInt(first)}–${fmtInt(last)} of ${fmtInt(page.total)}`);
    $("prev-page").disabled = page.offset <= 0;
    $("next-page").disabled = last >= page.total;
    renderCounts(page.counts || {});
  }

  function renderCounts(counts) {
    setText($("stat-connections"), fmtInt(counts.all));
    const states = Object.entries(counts.states || {}).map(([k, v]) => `${fmtInt(v)} ${k}`);
    setText($("stat-states"), states.join(" · "));
    setText($("stat-slow"), fmtInt(counts.slow));
    setText($("stat-rtt"), `${fmtMs(counts.rtt_p50_ms)} / ${fmtMs(counts.rtt_p95_ms)}`);
    setText($("stat-frames"), `${fmtInt(counts.sent)} frames out · ${fmtInt(counts.received)} in`);
    const select = $("state-filter");
    for (const state of Object.keys(counts.states || {})) {
      if (![...select.options].some((o) => o.value === state)) {
        select.appendChild(new Option(state, state));
      }
    }
  }

  // ---- panels ----------------------------------------------------------------------------

  function renderEngine(engine) {
    engine = engine || {};
    const ready = $("engine-ready");
    ready.className = engine.ready ? "badge badge-ok" : "badge badge-warn";
    setText(ready, engine.ready ? "ready" : (engine.reason || "not ready"));
    const replicas = engine.replicas || {};
    const devices = engine.devices || [...new Set((engine.workers || []).map((w) => w.device))];
    const pairs = [
      ["Model", engine.model || "–"],
      ["Dtype", engine.dtype || "–"],
      ["Devices", devices.length ? devices.join(", ") : "–"],
      ["Replicas", replicas.total !== undefined ? `${replicas.alive} alive / ${replicas.total}` : fmtInt((engine.workers || []).length)],
      ["Queue", `${fmtInt(engine.queue_depth)} / ${fmtInt(engine.queue_capacity)}`],
      ["Tokens / s", typeof engine.tokens_per_s === "number" ? engine.tokens_per_s.toFixed(1) : "–"],
    ];
    // While the model loads: phase, shards / bytes / weights and elapsed seconds, one line.
    if (engine.loading && engine.loading.text) pairs.unshift(["Loading", engine.loading.text]);
    const kv = $("engine-kv");
    kv.replaceChildren(...pairs.flatMap(([k, v]) => [el("dt", "", k), el("dd", "", v)]));
    setText($("stat-queue"), `${fmtInt(engine.queue_depth)} / ${fmtInt(engine.queue_capacity)}`);
    setText($("stat-tps"), typeof engine.tokens_per_s === "number" ? `${engine.tokens_per_s.toFixed(1)} tokens/s` : "");

    const sizes = Object.entries(engine.batch_sizes || {}).map(([k, v]) => [Number(k), Number(v)]).sort((a, b) => a[0] - b[0]);
    const max = Math.max(1, ...sizes.map(([, v]) => v));
    const bars = $("batch-bars");
    if (!sizes.length) {
      bars.replaceChildren(el("span", "muted small", "No batches yet."));
    } else {
      bars.replaceChildren(...sizes.map(([size, count]) => {
        const row = el("div", "bar-row");
        const track = el("div", "bar-track");
        const fill = el("div", "bar-fill");
        fill.style.width = `${(100 * count) / max}%`;
        track.appendChild(fill);
        row.append(el("span", "muted", `×${size}`), track, el("span", "num", fmtInt(count)));
        return row;
      }));
    }
    const gpu = Object.entries(engine.gpu_memory || {});
    setText($("gpu-memory"), gpu.length ? gpu.map(([d, b]) => `${d}: ${fmtBytes(b)}`).join(" · ") : "No GPU in use.");
  }

  function renderAdapters(adapters, now) {
    const box = $("adapters");
    if (!adapters || !adapters.length) {
      box.replaceChildren(el("p", "muted", "No IM adapter configured."));
      return;
    }
    box.replaceChildren(...adapters.map((a) => {
      const card = el("div", "adapter");
      card.dataset.adapter = a.name || "";
      const head = el("div", "adapter-head");
      head.append(el("span", "", `${a.name || a.platform || "adapter"} · ${a.mode || "?"}`), el("span", stateClass(a.state), a.state || "unknown"));
      const kv = el("dl", "kv");
      const pairs = [];
      if (typeof a.since === "number") {
        const state = String(a.state || "in this state");
        pairs.push([`${state.charAt(0).toUpperCase()}${state.slice(1)} for`, fmtAge(now - a.since)]);
      }
      if (a.attempts !== undefined) pairs.push(["Attempts", fmtInt(a.attempts)]);
      pairs.push(["Last event", typeof a.last_event_at === "number" ? `${fmtAge(now - a.last_event_at)} ago` : "never"]);
      if (a.last_error) pairs.push(["Last error", a.last_error]);
      kv.append(...pairs.flatMap(([k, v]) => [el("dt", "", k), el("dd", "", v)]));
      card.append(head, kv);
      return card;
    }));
  }

  // Each client token's topic grants, under the token's label (the dashboard never sees tokens).
  function renderGrants(grants) {
    const box = $("grants");
    if (!box || !Array.isArray(grants)) return;
    if (!grants.length) {
      box.replaceChildren(el("dt", "", "–"), el("dd", "muted", "No grants: only admin tokens may follow chat topics."));
      return;
    }
    box.replaceChildren(...grants.flatMap((g) => [el("dt", "mono", g.token || "?"), el("dd", "", (g.patterns || []).join(", "))]));
  }

  // The HTTP API's running and recently finished jobs, under the token's label (never the token).
  function renderHttpJobs(http) {
    const body = $("api-jobs");
    if (!body || !http) return;
    setText($("api-live"), `${fmtInt(http.live || 0)} running`);
    const jobs = http.jobs || [];
    if (!jobs.length) {
      const td = el("td", "muted", "No HTTP API jobs.");
      td.colSpan = 7;
      const tr = el("tr");
      tr.append(td);
      body.replaceChildren(tr);
      return;
    }
    body.replaceChildren(...jobs.map((j) => {
      const tr = el("tr");
      tr.dataset.job = j.id;
      const duration = typeof j.duration_s === "number" ? fmtMs(j.duration_s * 1000) : "–";
      tr.append(
        el("td", "mono", j.id), el("td", "mono", j.token || "?"), el("td", "", j.origin || ""),
        el("td", j.state === "running" ? "" : "code", j.state || ""),
        el("td", "muted", `${fmtAge(j.age_s || 0)} ago`), el("td", "", duration),
        el("td", "", fmtInt(j.chunks || 0)),
      );
      return tr;
    }));
  }

  function renderErrors(errors, now) {
    const list = $("errors");
    if (!errors || !errors.length) {
      list.replaceChildren(el("li", "muted", "None."));
      return;
    }
    list.replaceChildren(...errors.map((e) => {
      const li = el("li");
      const when = el("span", "muted", `${fmtAge(now - e.ts)} ago`);
      when.title = fmtTime(e.ts);
      li.append(when, el("span", "", e.source || ""), el("span", "code", e.code || ""), el("span", "", e.message || ""));
      return li;
    }));
  }

  function drawChart(canvasId, lastId, points, unit) {
    const canvas = $(canvasId);
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || 300;
    const h = canvas.clientHeight || 90;
    if (canvas.width !== w * dpr) { canvas.width = w * dpr; canvas.height = h * dpr; }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const values = points.filter((v) => typeof v === "number");
    const last = values.length ? values[values.length - 1] : null;
    setText($(lastId), last === null ? "–" : `${Number.isInteger(last) ? fmtInt(last) : last.toFixed(1)}${unit}`);
    ctx.strokeStyle = "#263142";
    ctx.lineWidth = 1;
    for (const y of [0.25, 0.5, 0.75]) { ctx.beginPath(); ctx.moveTo(0, h * y); ctx.lineTo(w, h * y); ctx.stroke(); }
    if (values.length < 2) {
      ctx.fillStyle = "#8b9bb0"; ctx.font = "12px system-ui"; ctx.fillText("collecting…", 8, h / 2);
      return;
    }
    const max = Math.max(...values) * 1.15 || 1;
    const step = w / Math.max(1, points.length - 1);
    const y = (v) => h - 4 - ((h - 8) * v) / max;
    ctx.beginPath();
    let started = false;
    points.forEach((v, i) => {
      if (typeof v !== "number") return;
      if (!started) { ctx.moveTo(i * step, y(v)); started = true; } else ctx.lineTo(i * step, y(v));
    });
    ctx.strokeStyle = "#3b82f6";
    ctx.lineWidth = 2;
    ctx.stroke();
    ctx.lineTo(w, h); ctx.lineTo(0, h); ctx.closePath();
    ctx.fillStyle = "rgba(59,130,246,0.12)";
    ctx.fill();
    ctx.fillStyle = "#8b9bb0"; ctx.font = "10px system-ui";
    ctx.fillText(Number.isInteger(max) ? fmtInt(Math.round(max)) : max.toFixed(1), 4, 11);
  }

  // The samples are taken every few seconds; the connections chart ends at (and its header shows)
  // the live count of this same snapshot, so it always agrees with the Connections card.
  function renderTimeline(samples, liveConnections) {
    samples = samples || [];
    const connections = samples.map((s) => s.connections);
    if (typeof liveConnections === "number") connections.push(liveConnections);
    drawChart("chart-connections", "last-connections", connections, "");
    drawChart("chart-events", "last-events", samples.map((s) => s.events_per_s), "/s");
    drawChart("chart-p95", "last-p95", samples.map((s) => s.p95_ms), " ms");
  }

  function render(data) {
    const now = data.now;
    setText($("clock"), `server time ${new Date(now * 1000).toLocaleTimeString()}`);
    renderPage(data.page, now);
    renderEngine(data.engine);
    renderAdapters(data.adapters, now);
    renderGrants(data.grants);
    renderHttpJobs(data.http);
    renderErrors(data.errors, now);
    renderTimeline(data.timeline, ((data.page || {}).counts || {}).all);
  }

  // ---- live stream -----------------------------------------------------------------------

  function setLive(cls, text) {
    const live = $("live");
    live.className = `live ${cls}`;
    setText(live, text);
  }

  function query() {
    const p = new URLSearchParams();
    if (view.q) p.set("q", view.q);
    if (view.state) p.set("state", view.state);
    p.set("sort", view.sort);
    p.set("order", view.order);
    p.set("offset", String(view.offset));
    p.set("limit", String(view.limit));
    return p.toString();
  }

  function openStream() {
    if (stream) stream.close();
    stream = new EventSource(`/api/events?${query()}`);
    stream.addEventListener("open", () => setLive("live-ok", "live"));
    stream.addEventListener("snapshot", (event) => {
      setLive("live-ok", "live");
      try { render(JSON.parse(event.data)); } catch (err) { console.error("bad snapshot", err); }
    });
    stream.addEventListener("logout", () => { window.location.assign("/dashboard/login"); });
    stream.addEventListener("bye", () => setLive("live-down", "server restarting"));
    stream.addEventListener("error", async (event) => {
      const source = event.target;
      if (source !== stream) return;
      setLive("live-connecting", "reconnecting…");
      if (source.readyState === EventSource.CLOSED) {
        // The server refused the stream: find out whether the session ended.
        const answer = await fetch("/api/status", { credentials: "same-origin" }).catch(() => null);
        if (answer && answer.status === 401) { window.location.assign("/dashboard/login"); return; }
        setTimeout(openStream, 2000);
      }
    });
  }

  function changeView(patch) {
    Object.assign(view, patch);
    updateSortHeaders();
    openStream();
  }

  function updateSortHeaders() {
    for (const th of document.querySelectorAll("th[data-sort]")) {
      const active = th.dataset.sort === view.sort;
      if (active) th.setAttribute("aria-sort", view.order === "asc" ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    }
  }

  // ---- actions ---------------------------------------------------------------------------

  async function api(method, path, body) {
    const headers = { "X-CSRF-Token": csrfToken() };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const answer = await fetch(path, {
      method, headers, credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    let data = null;
    try { data = await answer.json(); } catch (err) { data = null; }
    if (answer.status === 401) window.location.assign("/dashboard/login");
    return { ok: answer.ok, status: answer.status, data };
  }

  async function kick(button, id) {
    if (kickArmed.get(id) !== "armed") {
      button.textContent = "Confirm";
      button.classList.add("confirm");
      kickArmed.set(id, "armed");
      setTimeout(() => {
        if (kickArmed.get(id) === "armed") {
          kickArmed.delete(id);
          button.textContent = "Kick";
          button.classList.remove("confirm");
        }
      }, 4000);
      return;
    }
    kickArmed.set(id, "sent");
    button.disabled = true;
    const result = await api("DELETE", `/api/connections/${encodeURIComponent(id)}`);
    if (result.ok) toast(`Closed connection ${id} (code 4000).`);
    else toast((result.data && result.data.error && result.data.error.message) || `Kick failed (${result.status}).`, true);
    setTimeout(() => kickArmed.delete(id), 3000);
  }

  function wire() {
    $("logout-csrf").value = csrfToken();
    $("connections-body").addEventListener("click", (event) => {
      const button = event.target.closest("button[data-action='kick']");
      if (!button) return;
      kick(button, button.closest("tr").dataset.connId);
    });
    for (const th of document.querySelectorAll("th[data-sort]")) {
      th.addEventListener("click", () => {
        const sort = th.dataset.sort;
        const order = view.sort === sort && view.order === "asc" ? "desc" : view.sort === sort ? "asc" : (sort === "connected_at" ? "desc" : "asc");
        changeView({ sort, order, offset: 0 });
      });
    }
    let debounce = null;
    $("search").addEventListener("input", (event) => {
      clearTimeout(debounce);
      debounce = setTimeout(() => changeView({ q: event.target.value.trim(), offset: 0 }), 250);
    });
    $("state-filter").addEventListener("change", (event) => changeView({ state: event.target.value, offset: 0 }));
    $("page-size").addEventListener("change", (event) => changeView({ limit: Number(event.target.value), offset: 0 }));
    $("prev-page").addEventListener("click", () => changeView({ offset: Math.max(0, view.offset - view.limit) }));
    $("next-page").addEventListener("click", () => {
      if (lastPage && view.offset + view.limit < lastPage.total) changeView({ offset: view.offset + view.limit });
    });
    $("swap-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const name = $("swap-model").value.trim();
      if (!name) return;
      toast(`Loading ${name}…`);
      const result = await api("POST", "/api/admin/model", { model: name });
      if (result.ok) toast(`Now serving ${name}.`);
      else toast((result.data && result.data.error && result.data.error.message) || `Swap failed (${result.status}).`, true);
    });
    // A hidden tab stops streaming: with 10,000 connections every snapshot costs the server.
    document.addEventListener("visibilitychange", () => {
      if (document.hidden) {
        if (stream) { stream.close(); stream = null; }
        setLive("live-connecting", "paused");
      } else if (!stream) {
        openStream();
      }
    });
    updateSortHeaders();
    openStream();
  }

  document.addEventListener("DOMContentLoaded", wire);
})();
