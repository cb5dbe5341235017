"use strict";
// The sessions page. Every request carries the operator's token in a header (never a cookie),
// so other sites cannot act on the operator's behalf. Data is only ever set as text, never as HTML.
(() => {
  const $ = (id) => document.getElementById(id);
  const sessions = new Map();
  const selected = new Set();
  let token = sessionStorage.getItem("bastion-token") || "";
  let stream = null;

  const setStatus = (text, error = false) => {
    $("status").textContent = text;
    $("status").className = error ? "error" : "";
  };

  async function api(method, path, body) {
    const res = await fetch(path, {
      method,
      headers: Object.assign({ Authorization: "Bearer " + token }, body ? { "Content-Type": "application/json" } : {}),
      body: body ? JSON.stringify(body) : undefined,
      cache: "no-store",
      credentials: "omit",
    });
    const data = await res.json().catch(() => ({}));
    if (!res.ok) {
      const err = new Error(data.message || res.statusText);
      err.status = res.status;
      throw err;
    }
    return data;
  }

  const fmtBytes = (n) => {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  };
  const fmtDuration = (s) => {
    s = Math.floor(s);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    return (h ? h + "h " : "") + (h || m ? m + "m " : "") + sec + "s";
  };

  function render() {
    const body = $("rows");
    body.replaceChildren();
    const list = [...sessions.values()].sort((a, b) => a.started_at.localeCompare(b.started_at));
    for (const id of [...selected]) if (!sessions.has(id)) selected.delete(id);
    if (!list.length) {
      const tr = document.createElement("tr");
      const td = document.createElement("td");
      td.colSpan = 12; td.className = "empty"; td.textContent = "No sessions.";
      tr.append(td); body.append(tr);
    }
    const now = Date.now();
    for (const s of list) {
      const tr = document.createElement("tr");
      tr.dataset.id = s.id;
      const box = document.createElement("input");
      box.type = "checkbox"; box.checked = selected.has(s.id);
      box.setAttribute("aria-label", "Select session of " + s.user + " on " + s.vm);
      box.addEventListener("change", () => { box.checked ? selected.add(s.id) : selected.delete(s.id); updateButtons(); });
      const cell = (text, cls) => { const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; return td; };
      const first = document.createElement("td"); first.append(box);
      const started = new Date(s.started_at);
      tr.append(first, cell(s.user), cell(s.vm), cell(s.source_ip), cell(s.protocol), cell(s.login || "-"),
        cell(started.toLocaleTimeString()), cell(fmtDuration((now - started.getTime()) / 1000), "num"),
        cell(fmtBytes(s.bytes_up), "num"), cell(fmtBytes(s.bytes_down), "num"), cell(s.node),
        cell(s.state === "terminating" && s.ends_at ? "terminating (ends " + new Date(s.ends_at).toLocaleTimeString() + ")" : s.state));
      body.append(tr);
    }
    updateButtons();
  }

  function updateButtons() {
    $("disconnect").disabled = selected.size === 0;
    $("all").checked = sessions.size > 0 && selected.size === sessions.size;
  }

  async function refresh(quiet = false) {
    try {
      const data = await api("GET", "/v1/sessions");
      sessions.clear();
      for (const s of data.sessions) sessions.set(s.id, s);
      render();
      if (quiet !== true) setStatus("Updated " + new Date().toLocaleTimeString());
    } catch (e) {
      if (e.status === 401) return signOut("That token was not accepted.");
      setStatus("Refresh failed: " + e.message, true);
    }
  }

  async function follow() {
    if (stream) stream.abort();
    if (!$("live").checked) return;
    stream = new AbortController();
    try {
      const res = await fetch("/v1/events", { headers: { Authorization: "Bearer " + token }, signal: stream.signal, cache: "no-store", credentials: "omit" });
      if (!res.ok) throw new Error(res.statusText);
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const chunk = buf.slice(0, cut); buf = buf.slice(cut + 2);
          let kind = "message", data = "";
          for (const line of chunk.split("\n")) {
            if (line.startsWith("event: ")) kind = line.slice(7);
            else if (line.startsWith("data: ")) data += line.slice(6);
          }
          if (data) onEvent(kind, JSON.parse(data));
        }
      }
    } catch (e) {
      if (e.name === "AbortError") return;
    }
    if ($("live").checked) setTimeout(follow, 2000);  // reconnect after a drop
  }

  function onEvent(kind, data) {
    if (kind === "snapshot") { sessions.clear(); for (const s of data.sessions) sessions.set(s.id, s); }
    else if (kind === "opened" || kind === "updated") sessions.set(data.session.id, data.session);
    else if (kind === "closed") { sessions.delete(data.session.id); selected.delete(data.session.id); }
    else if (kind === "progress") {
      for (const p of data.sessions) {
        const s = sessions.get(p.id);
        if (s) { s.bytes_up = p.bytes_up; s.bytes_down = p.bytes_down; }
      }
    }
    render();
  }

  function askDisconnect() {
    const n = selected.size;
    $("confirm-text").textContent = "Disconnect " + n + " session" + (n === 1 ? "" : "s") + "? The users will see your reason.";
    $("reason").value = "";
    $("grace").value = "0";
    $("confirm").showModal();
  }

  async function doDisconnect() {
    const ids = [...selected];
    const grace = Number($("grace").value || 0);
    try {
      const data = await api("POST", "/v1/sessions/disconnect", { ids, reason: $("reason").value, grace_s: grace });
      const done = Object.values(data.results).filter((r) => r === "disconnected").length;
      setStatus("Disconnected " + done + " of " + ids.length + (grace ? " (after " + grace + " s)" : ""));
      selected.clear();
      await refresh(true);
    } catch (e) {
      setStatus("Disconnect failed: " + e.message, true);
    }
  }

  function signOut(message) {
    token = ""; sessionStorage.removeItem("bastion-token");
    if (stream) stream.abort();
    $("main").hidden = true; $("login").hidden = false;
    setStatus(message || "", !!message);
    if (message) alert(message);
  }

  async function signIn(t) {
    token = t;
    try {
      const me = await api("GET", "/v1/whoami");
      sessionStorage.setItem("bastion-token", token);
      $("login").hidden = true; $("main").hidden = false;
      $("whoami").textContent = me.name + " (" + me.role + ")";
      $("node").textContent = "· " + me.node;
      if (me.role !== "operator") $("disconnect").hidden = true;
      await refresh();
      follow();
    } catch (e) {
      token = "";
      $("login").hidden = false;
      const msg = e.status === 401 ? "That token was not accepted." : "Sign-in failed: " + e.message;
      $("token").setCustomValidity(msg); $("token").reportValidity(); $("token").setCustomValidity("");
    }
  }

  $("login").addEventListener("submit", (ev) => { ev.preventDefault(); signIn($("token").value.trim()); });
  $("refresh").addEventListener("click", () => refresh());
  $("live").addEventListener("change", follow);
  $("disconnect").addEventListener("click", askDisconnect);
  $("confirm").addEventListener("close", () => { if ($("confirm").returnValue === "ok") doDisconnect(); });
  $("all").addEventListener("change", () => {
    selected.clear();
    if ($("all").checked) for (const id of sessions.keys()) selected.add(id);
    render();
  });
  setInterval(() => { if (sessions.size) render(); }, 1000);  // durations tick
  if (token) signIn(token);
})();
